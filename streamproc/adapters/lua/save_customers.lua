-- One partition's customers (every key shares the partition's hash tag: one cluster slot).
-- KEYS: the partition's census hash, outbox hash, label maturity index and alert queue; then the customer hashes.
-- ARGV per update: customer id, expected version, feature row ("" keeps the stored one), state blob, census key,
-- model JSON, outputs JSON ("" none), when its oldest pending label matures ("" none), alert queue entries as a
-- JSON array [name, value, ...] ("" none).
-- Returns, per update, the previous census key ("" if none) or false when the version check failed.
local out = {}
local census, outbox, due, queue = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
for i = 1, #KEYS - 4 do
  local key = KEYS[4 + i]
  local a = 9 * i - 7
  local customer = ARGV[a - 1]
  local current = redis.call('HMGET', key, '_v', 'k')
  local version = current[1] or '0'
  if version == ARGV[a] then
    local next_version = tostring(tonumber(version) + 1)
    local s, k, m = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
    if ARGV[a + 1] ~= '' then  -- one HSET with the feature row, or without it (the stored row stays)
      redis.call('HSET', key, '_v', next_version, '_s', s, 'k', k, 'm', m, 'f', ARGV[a + 1])
    else
      redis.call('HSET', key, '_v', next_version, '_s', s, 'k', k, 'm', m)
    end
    local old = current[2] or ''
    if old ~= ARGV[a + 3] then
      if old ~= '' then redis.call('HINCRBY', census, old, -1) end
      redis.call('HINCRBY', census, ARGV[a + 3], 1)
    end
    if ARGV[a + 5] ~= '' then
      redis.call('HSET', outbox, customer .. ':' .. next_version, ARGV[a + 5])
    end
    if ARGV[a + 6] ~= '' then
      redis.call('ZADD', due, ARGV[a + 6], customer)
    else
      redis.call('ZREM', due, customer)
    end
    if ARGV[a + 7] ~= '' then
      local entries = cjson.decode(ARGV[a + 7])
      for j = 1, #entries, 2 do
        redis.call('HSET', queue, entries[j], entries[j + 1])
      end
    end
    out[i] = old
  else
    out[i] = false
  end
end
return out
