-- KEYS, per update: customer hash, its partition's census hash, its partition's outbox hash, its partition's label
-- maturity index, its partition's alert queue; last, the feature schemas hash. ARGV per update: expected version,
-- feature row ("" keeps the stored one), state blob, census key, model JSON, outputs JSON ("" none), when its oldest
-- pending label matures ("" none), alert queue entries as a JSON array [name, value, ...] ("" none);
-- then (schema id, names JSON) for each feature schema the rows use, stored in the same atomic step.
-- Returns, per update, the previous census key ("" if none) or false when the version check failed.
local out = {}
local n = (#KEYS - 1) / 5
for j = 8 * n + 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[#KEYS], ARGV[j], ARGV[j + 1])
end
for i = 1, n do
  local key, census, outbox, due, queue = KEYS[5 * i - 4], KEYS[5 * i - 3], KEYS[5 * i - 2], KEYS[5 * i - 1],
    KEYS[5 * i]
  local a = 8 * i - 7
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
    local customer = string.sub(key, 7, -2)
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
