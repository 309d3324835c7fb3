-- KEYS: offset, latest, current, summary, the version's key. ARGV: fenced, training offset, expected latest
-- version, version, blob, summary, keep. Returns the version; -1 when fenced and stale; -2 when another save
-- took the version number first (the caller retries with the next one).
if tonumber(redis.call('GET', KEYS[2]) or '0') ~= tonumber(ARGV[3]) then return -2 end
if ARGV[1] == '1' then
  local offset = tonumber(ARGV[2])
  if tonumber(redis.call('GET', KEYS[1]) or '-2') >= offset then return -1 end
  redis.call('SET', KEYS[1], offset)
end
local version = tonumber(ARGV[4])
redis.call('SET', KEYS[2], version)
redis.call('SET', KEYS[5], ARGV[5])
redis.call('SET', KEYS[3], version)
redis.call('SET', KEYS[4], ARGV[6])
local keep = tonumber(ARGV[7])
for old = math.max(1, version - keep - 50), version - keep do
  redis.call('DEL', 'sp:{model}:v:' .. old)
end
return version
