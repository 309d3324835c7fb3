-- Close a partition's alert days at once (pipeline/alert_queue.py): KEYS: the partition's alert queue, its open sent
-- alerts hash, its outbox hash, its sweep mark. ARGV: partition (unused), sweep mark, outbox field ("" none), outputs,
-- number of queue entries done, those names, then (customer, alert id or "" to drop) pairs.
local queue, sent, outbox, marks = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local done = tonumber(ARGV[5])
for i = 6, 5 + done do
  redis.call('HDEL', queue, ARGV[i])
end
for i = 6 + done, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', sent, ARGV[i])
  else
    redis.call('HSET', sent, ARGV[i], ARGV[i + 1])
  end
end
if ARGV[3] ~= '' then
  redis.call('HSET', outbox, ARGV[3], ARGV[4])
end
redis.call('SET', marks, ARGV[2])
return done
