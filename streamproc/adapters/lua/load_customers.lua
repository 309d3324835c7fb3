-- One partition's customers. KEYS: customer hashes, then the partition's erasure set. ARGV: the customers' erasure digests, then the fields to read.
-- Returns, per customer: the fields, then erased (1/0) — false for missing fields.
local out = {}
local n = #KEYS - 1
local erased = KEYS[#KEYS]
local fields = {}
for j = n + 1, #ARGV do
  fields[#fields + 1] = ARGV[j]
end
local width = #fields + 1
for i = 1, n do
  local row = redis.call('HMGET', KEYS[i], unpack(fields))
  for j = 1, #fields do
    out[width * (i - 1) + j] = row[j]
  end
  out[width * i] = redis.call('SISMEMBER', erased, ARGV[i])
end
return out
