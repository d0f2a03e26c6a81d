#!lua name=jobMatchingBaseline
-- The baseline the seed plan describes, for the benchmark only: scan the top N jobs of
-- jobs:pending, HGETALL and JSON-decode each, claim the first match. It has the defects the
-- contract lists (head-of-line starvation, non-fenced completion); it is never loaded by the
-- product.

local function matches(job, caps)
  local service = job.service_required or job.job_type
  local ok_service = false
  for _, s in ipairs(caps.job_service_required_map or {}) do
    if s == service then ok_service = true end
  end
  if not ok_service then return false end
  if job.requirements and job.requirements ~= '' then
    local ok, reqs = pcall(cjson.decode, job.requirements)
    if not ok then return false end
    local hw = reqs.hardware
    if type(hw) == 'table' then
      for k, v in pairs(hw) do
        if v ~= 'all' then
          local have = caps.hardware and caps.hardware[k]
          if type(v) == 'number' and (type(have) ~= 'number' or have < v) then return false end
        end
      end
    end
  end
  return true
end

redis.register_function('findMatchingJobBaseline', function(_, args)
  local caps = cjson.decode(args[1])
  local n = tonumber(args[2]) or 100
  local ids = redis.call('ZREVRANGE', 'jobs:pending', 0, n - 1)
  for _, id in ipairs(ids) do
    local flat = redis.call('HGETALL', 'job:' .. id)
    local job = {}
    for i = 1, #flat, 2 do job[flat[i]] = flat[i + 1] end
    if job.payload then pcall(cjson.decode, job.payload) end
    if matches(job, caps) then
      redis.call('ZREM', 'jobs:pending', id)
      local t = redis.call('TIME')
      redis.call('HSET', 'job:' .. id, 'status', 'assigned', 'worker_id', caps.worker_id, 'assigned_at', t[1])
      job.status = 'assigned'
      job.worker_id = caps.worker_id
      redis.call('HSET', 'jobs:active:' .. caps.worker_id, id, cjson.encode(job))
      redis.call('HSET', 'worker:' .. caps.worker_id, 'status', 'busy', 'current_job_id', id)
      redis.call('PUBLISH', 'job_claimed', cjson.encode({ job_id = id, worker_id = caps.worker_id }))
      return cjson.encode({ jobId = id, job = job })
    end
  end
  return nil
end)

redis.register_function('completeJobBaseline', function(_, args)
  local id, worker, result = args[1], args[2], args[3]
  local t = redis.call('TIME')
  redis.call('HSET', 'job:' .. id, 'status', 'completed', 'completed_at', t[1])
  redis.call('HDEL', 'jobs:active:' .. worker, id)
  redis.call('HSET', 'jobs:completed', id, result)
  redis.call('HSET', 'worker:' .. worker, 'status', 'idle', 'current_job_id', '')
  redis.call('PUBLISH', 'complete_job', cjson.encode({ job_id = id, worker_id = worker }))
  return 'ok'
end)
