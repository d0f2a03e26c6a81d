#!lua name=jobMatching
-- The `jobMatching` library: claiming (findMatchingJob), the job lifecycle, leases and the
-- pending-queue index. Every function is atomic (Redis runs one at a time), so concurrent
-- claimers and reapers on many machines never see half a change. docs/redis-protocol.md
-- describes every key and argument; docs/matching.md the matching rules.
--
-- Every function except findMatchingJob takes a key prefix as its first argument ('' in
-- production) so that `machine functions test` can run a self-check on scratch keys.

local VERSION = '__MATCHER_VERSION__'

-- Requirement keys that describe a job but are not capabilities (defect 3).
local DESCRIPTIVE = { service_type = true, component = true, workflow = true, timeout_minutes = true,
  quality_level = true }
-- Statuses in which a job belongs to the worker it is assigned to.
local LIVE = { assigned = true, accepted = true, in_progress = true }
-- Statuses a job in jobs:pending may have; anything else there is debris.
local QUEUED = { pending = true, queued = true }
-- Numbers passed to redis.call are formatted with %.17g on every call, which costs more than
-- many whole commands: constants, and times the hot paths pass, go as text (jint).
local TERMINAL_TTL_S = '604800'       -- job hash after completion/failure (7 days)
local PROGRESS_TTL_S = '86400'        -- job:<id>:progress and progress:<id>
local PROGRESS_MAXLEN = 1000          -- entries kept per progress stream (approximate)
local RECORD_TTL_MS = 7 * 86400 * 1000 -- jobs:completed / jobs:failed entries
local RECORD_TRIM = 100               -- records trimmed per completion at most
local DEFAULT_LEASE_MS = 60000
local DEFAULT_HOLDOFF_MS = 30000
local CLAIM_RECONCILE = 32            -- index repair budget of one claim when counts differ
local CLAIM_TIES = 512                -- jobs tied with the top's last score indexed by one claim
local ORPHAN_WATCH_MS = 10000         -- claims re-check an id queued before its hash this long
local SWEEP_MAX = 4000                -- entries one sweep step reads (unpack's limit is 8000)
local DUE_BATCH = 16                  -- retry-delayed jobs released into the index per claim
local CANCEL_ERROR = 'Job cancelled by user'
-- The claim record of our claims, in the job hash next to `worker_id` (the worker it names):
-- when the job's processing began (claim, then start, in ms), the score to restore on a requeue
-- (exact text) and the job's order prefix in the index (its place among equal scores). An
-- original worker's claim has none, so nothing of ours touches its job.
local CLAIM_FIELDS = { 'claim_ms', 'claim_score', 'claim_order' }

local function dbg(msg)
  redis.log(redis.LOG_DEBUG, 'jobMatching: ' .. msg)
end

-- In Redis' Lua every library call is dear next to a command (measured with
-- scripts/profile-broker.py: string.format about 2.3 k instructions, tostring of a number 4.8 k,
-- string.find with a pattern 3.4 k, a table lookup 0.2 k, a whole HSET 4 k), so the hot paths
-- format times and names by table lookups. D3[n] is n (0-999) as three digits; MS3[s] is the
-- same for s, n as Redis writes it without its zero padding ('' for 0: TIME's microseconds
-- without their last three digits); PCT[s] is true for the percentages '0' to '100' as the
-- broker writes them. Filled on first use (the string library is not reachable while the
-- library loads), which also sets Lua's collector step (GC_STEPMUL).
local D3, MS3, PCT, I3 = nil, nil, nil, nil

-- Lua's collector as Redis drives it: after every 50 calls of any script or function Redis runs
-- 50 steps of it, each doing work in proportion to the VM's `stepmul` (200 by default) whatever
-- the calls allocated, so a library that keeps memos between calls (ours: the decoded
-- capabilities of 1,000 workers are a 3 MB heap) pays for walking them over and over. At 50
-- the collector still finishes its cycles (in the matcher bench the heap peaked below twice its
-- live size) and a claim with its completion costs 5 % fewer instructions
-- (scripts/profile-broker.py, 1,000 workers: 380.8 k -> 360.6 k Ir). It is the functions VM's
-- setting (every library in the VM shares it), made with the tables above on the library's
-- first use after a load: collectgarbage, like the string library, cannot be reached while a
-- library loads.
local GC_STEPMUL = 50

local function first_use()
  collectgarbage('setstepmul', GC_STEPMUL)
  D3, MS3, PCT, I3 = {}, { [''] = '000' }, {}, {}
  for i = 0, 999 do
    D3[i] = string.format('%03d', i)
    I3[i] = string.format('%d', i)
    MS3[I3[i]] = D3[i]
  end
  for i = 0, 100 do PCT[string.format('%d', i)] = true end
end

-- The server's time in epoch milliseconds, the same as text (the form every hash and message
-- gets), and TIME's seconds and the milliseconds as three digits (for iso_at): all built from
-- TIME's own digits by lookups, since a tonumber or math.floor costs about 2 k instructions.
local function now_ms()
  local t = redis.call('TIME')
  if not MS3 then first_use() end
  local secs, ms3 = t[1], MS3[string.sub(t[2], 1, -4)]
  local text = secs .. ms3
  return tonumber(text), text, secs, ms3
end

-- ISO-8601 UTC with milliseconds from epoch milliseconds (Lua in Redis has no os.date). The
-- date part is computed once per second: claims and completions at thousands per second
-- share it, and only the milliseconds are looked up per call. iso_at does the same from
-- now_ms's seconds and milliseconds as text (the seconds compared as text, no arithmetic).
local iso_secs, iso_prefix, iso_secs_text = nil, nil, nil
local function iso(ms)
  local secs = math.floor(ms / 1000)
  local milli = ms - secs * 1000
  if not D3 then first_use() end
  if secs == iso_secs then return iso_prefix .. D3[milli] .. 'Z' end
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  iso_prefix = string.format('%04d-%02d-%02dT%02d:%02d:%02d.', y, m, d, math.floor(rem / 3600),
    math.floor((rem % 3600) / 60), rem % 60)
  iso_secs, iso_secs_text = secs, nil
  return iso_prefix .. D3[milli] .. 'Z'
end

local function iso_at(secs, ms3)
  if secs ~= iso_secs_text then
    iso(tonumber(secs) * 1000)
    iso_secs_text = secs
  end
  return iso_prefix .. ms3 .. 'Z'
end

-- The names of keys and channels under a key prefix, each concatenated once per prefix (a
-- concatenation costs about 0.6 k instructions, a table lookup 0.2 k): names(p)['jobs:pending'].
-- Bounded like the memos (prefixes other than '' are self-checks' scratch ones). Hot paths
-- write `names_memo[p] or names(p)`: a call costs about what a concatenation does.
local names_memo, names_n = {}, 0
local function names(p)
  local n = names_memo[p]
  if n then return n end
  n = setmetatable({}, { __index = function(t, name)
    local v = p .. name
    rawset(t, name, v)
    return v
  end })
  if names_n >= 64 then names_memo, names_n = {}, 0 end
  names_memo[p] = n
  names_n = names_n + 1
  return n
end

-- A worker's jobs:active hash and worker hash under a prefix, concatenated once per worker
-- (every claim and completion names both; a concatenation costs more than the lookups):
-- worker_keys(p, worker) -> active key, worker key. Bounded like the other memos.
local wkeys_memo, wkeys_n = {}, 0
local function worker_keys(p, worker)
  local by_worker = wkeys_memo[p]
  local k = by_worker and by_worker[worker]
  if k then return k[1], k[2] end
  if wkeys_n >= 4096 then wkeys_memo, wkeys_n, by_worker = {}, 0, nil end
  if not by_worker then
    by_worker = {}
    wkeys_memo[p] = by_worker
  end
  k = { p .. 'jobs:active:' .. worker, p .. 'worker:' .. worker }
  by_worker[worker] = k
  wkeys_n = wkeys_n + 1
  return k[1], k[2]
end

-- A job hash as a table. The table starts sized for the fields the API always writes (a
-- constructor's names size its hash part; their nil values add nothing), so filling it does
-- not grow it five times over (1, 2, 4, 8, 16 entries): about 3 k instructions a claim.
local function hgetall(key)
  local flat = redis.call('HGETALL', key)
  local t = { id = nil, service_required = nil, priority = nil, payload = nil, requirements = nil,
    customer_id = nil, created_at = nil, status = nil, retry_count = nil, max_retries = nil }
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t, #flat > 0
end

local function publish(p, channel, doc)
  redis.call('PUBLISH', p .. channel, cjson.encode(doc))
end

-- The messages and records every job sends (claim, completion, idle worker) are written as
-- text: encoding a table costs more than the rest of their publishing. `jstr` encodes a
-- string value (cjson's escaping: cheaper than looking for what needs it with a pattern),
-- `jname` one of the short names that recur in every message (workers, services, customers,
-- workflows, messages), memoised (bounded like the other memos: dropped whole when full; job
-- ids and results are not names: they would only fill it), `jint` an integer; ISO times and
-- fixed words need no escaping.
local function jstr(v) return cjson.encode(v) end
local JNAME_MAX = 4096
local jname_memo, jname_n = {}, 0
local function jname(v)
  local e = jname_memo[v]
  if e then return e end
  e = cjson.encode(v)
  if jname_n >= JNAME_MAX then jname_memo, jname_n = {}, 0 end
  jname_memo[v] = e
  jname_n = jname_n + 1
  return e
end
local function jint(n) return string.format('%d', n) end

-- A whole number below a billion as text by lookups in three-digit groups (I3 unpadded, D3
-- padded), for what is written on every job (processing_time): string.format costs about
-- 2.3 k instructions, the arithmetic and lookups a tenth of that. Anything else goes to jint.
local function int_text(n)
  if not I3 then first_use() end
  local t = I3[n]
  if t then return t end
  if n > 0 and n < 1e9 then
    local lo = n % 1000
    local hi = (n - lo) / 1000
    t = I3[hi]
    if t and D3[lo] then return t .. D3[lo] end
    local mid = hi % 1000
    t = I3[(hi - mid) / 1000]
    if t and D3[mid] and D3[lo] then return t .. D3[mid] .. D3[lo] end
  end
  return jint(n)
end

-- Epoch milliseconds as text, the seconds formatted once per second (leases expire at
-- thousands of claims per second; string.format costs about 2.3 k instructions).
local msx_secs, msx_prefix = nil, nil
local function ms_text(ms)
  local secs = math.floor(ms / 1000)
  if secs ~= msx_secs then msx_secs, msx_prefix = secs, jint(secs) end
  if not D3 then first_use() end
  return msx_prefix .. D3[ms - secs * 1000]
end

-- ---------------------------------------------------------------------------------------------
-- Matching (mirrored exactly by src/broker/reference.rs)
-- ---------------------------------------------------------------------------------------------

local function kind(v)
  if v == nil or v == cjson.null then return 'nil' end
  local t = type(v)
  if t == 'table' then
    if next(v) == nil then return 'empty' end
    if v[1] ~= nil then return 'list' end
    return 'object'
  end
  if t == 'string' or t == 'number' or t == 'boolean' then return t end
  return 'nil'
end

local function scalar_eq(a, b)
  local ta = type(a)
  if ta ~= type(b) then return false end
  if ta == 'string' or ta == 'number' or ta == 'boolean' then return a == b end
  return false
end

local function list_has(list, x)
  for _, v in ipairs(list) do
    if scalar_eq(v, x) then return true end
  end
  return false
end

-- A number, or a number written as a string ("16", "-2.5") as the API's and monitor's forms
-- send them; nil otherwise. reference.rs accepts exactly the same strings.
local function as_number(v)
  if type(v) == 'number' then return v end
  if type(v) == 'string' and (string.match(v, '^%-?%d+$') or string.match(v, '^%-?%d+%.%d+$')) then
    return tonumber(v)
  end
  return nil
end

-- A `hardware.gpu_model` name as text: a string as it is, a number (the monitor's form turns a
-- typed 4090 into one) as its decimal text, as JavaScript writes it for integers and short
-- decimals; nil for anything else. capabilities.rs gpu_name reads the same.
local function gpu_name(v)
  if type(v) == 'string' then return v end
  if type(v) ~= 'number' or v ~= v then return nil end
  if v == math.floor(v) and math.abs(v) < 1e15 then return string.format('%d', v) end
  return string.format('%.14g', v)
end

-- `hardware.gpu_model`: a name matches the worker's model case-insensitively as a substring
-- ("A100" matches "NVIDIA A100-SXM4-80GB"); a list matches when any of its names does (a
-- worker has one model).
local function gpu_model_ok(req, have)
  if type(have) ~= 'string' then return false end
  have = string.lower(have)
  local name = gpu_name(req)
  if name then return string.find(have, string.lower(name), 1, true) ~= nil end
  if kind(req) ~= 'list' then return false end
  for _, item in ipairs(req) do
    name = gpu_name(item)
    if name and string.find(have, string.lower(name), 1, true) then return true end
  end
  return false
end

-- Does the worker's value `have` satisfy the requirement `req`?
local function satisfies(req, have)
  local kh = kind(have)
  local kr = kind(req)
  if kh == 'nil' or kr == 'nil' then return false end
  if kr == 'empty' then return kh == 'list' or kh == 'object' or kh == 'empty' end
  if kr == 'object' then
    if kh ~= 'object' then return false end
    for k, v in pairs(req) do
      if not satisfies(v, have[k]) then return false end
    end
    return true
  end
  if kr == 'list' then
    if kh ~= 'list' then return false end
    for _, v in ipairs(req) do
      if not list_has(have, v) then return false end
    end
    return true
  end
  if kh == 'list' then return list_has(have, req) end
  if kr == 'number' or kh == 'number' then
    local nr, nh = as_number(req), as_number(have)
    if nr and nh then return nh >= nr end
  end
  return scalar_eq(req, have)
end

-- Would any single item of `req` match `have`? (negative requirements)
local function any_item(req, have)
  local kr = kind(req)
  if kr == 'list' then
    for _, x in ipairs(req) do
      if any_item(x, have) then return true end
    end
    return false
  end
  if kr == 'object' then
    if kind(have) ~= 'object' then return false end
    for k, x in pairs(req) do
      if any_item(x, have[k]) then return true end
    end
    return false
  end
  if kr == 'empty' then return false end
  return satisfies(req, have)
end

local function lookup(caps, path)
  local v = caps[path]
  if v ~= nil then return v end
  if not string.find(path, '.', 1, true) then return nil end
  v = caps
  for part in string.gmatch(path, '[^%.]+') do
    if type(v) ~= 'table' then return nil end
    v = v[part]
    if v == nil then return nil end
  end
  return v
end

local function hw_value(caps, key)
  local hw = caps.hardware
  if type(hw) ~= 'table' then return nil end
  return hw[key]
end

local function worker_models(caps, service)
  local m = caps.models
  if type(m) ~= 'table' then return nil end
  return m[service]
end

-- The models a requirement lists, as a list (nil = no constraint).
local function model_list(req, service)
  if req == 'all' then return nil end
  local k = kind(req)
  if k == 'object' then
    req = req[service]
    if req == nil or req == cjson.null or req == 'all' then return nil end
    k = kind(req)
  end
  if k == 'string' then return { req } end
  if k == 'empty' or k == 'nil' then return nil end
  if k == 'list' then return req end
  return false
end

local function strict_worker(caps)
  local ca = caps.customer_access
  return type(ca) == 'table' and ca.isolation == 'strict'
end

local function positive_ok(reqs, caps, service)
  for k, v in pairs(reqs) do
    if not DESCRIPTIVE[k] then
      local ok
      if k == 'hardware' then
        local kv = kind(v)
        if v == 'all' or kv == 'empty' then
          ok = true
        elseif kv == 'object' then
          ok = true
          for hk, hv in pairs(v) do
            local fits
            if hv == 'all' then
              fits = true
            elseif hk == 'gpu_model' then
              fits = gpu_model_ok(hv, hw_value(caps, hk))
            else
              fits = satisfies(hv, hw_value(caps, hk))
            end
            if not fits then
              ok = false
              break
            end
          end
        else
          ok = satisfies(v, caps.hardware)
        end
      elseif k == 'models' then
        local list = model_list(v, service)
        if list == nil then
          ok = true
        elseif list == false then
          ok = false
        else
          local have = worker_models(caps, service)
          ok = kind(have) == 'list'
          if ok then
            for _, m in ipairs(list) do
              if not list_has(have, m) then
                ok = false
                break
              end
            end
          end
        end
      elseif k == 'customer_isolation' then
        ok = v ~= 'strict' or strict_worker(caps)
      elseif k == 'hardware.gpu_model' then
        ok = gpu_model_ok(v, hw_value(caps, 'gpu_model'))
      else
        ok = satisfies(v, lookup(caps, k))
      end
      if not ok then return false end
    end
  end
  return true
end

local function negative_hit(reqs, caps, service)
  for k, v in pairs(reqs) do
    if not DESCRIPTIVE[k] then
      if k == 'hardware' then
        if kind(v) == 'object' then
          for hk, hv in pairs(v) do
            if hk == 'gpu_model' then
              if hv ~= 'all' and gpu_model_ok(hv, hw_value(caps, hk)) then return true end
            elseif hv ~= 'all' and any_item(hv, hw_value(caps, hk)) then
              return true
            end
          end
        end
      elseif k == 'models' then
        local list = model_list(v, service)
        local have = worker_models(caps, service)
        if list and kind(have) == 'list' then
          for _, m in ipairs(list) do
            if list_has(have, m) then return true end
          end
        end
      elseif k == 'customer_isolation' then
        if v == 'strict' and strict_worker(caps) then return true end
      elseif k == 'hardware.gpu_model' then
        if gpu_model_ok(v, hw_value(caps, 'gpu_model')) then return true end
      else
        if any_item(v, lookup(caps, k)) then return true end
      end
    end
  end
  return false
end

-- Hardware keys that need a number (or "all").
local HW_NUMBERS = { gpu_memory_gb = true, cpu_cores = true, ram_gb = true, gpu_count = true }

-- Why a decoded requirement can never be compared (a null, a number beyond the float range),
-- or nil. `path` names the value in the reason.
local function uncomparable(v, path)
  if v == cjson.null then return path .. ' is null' end
  if type(v) == 'number' and (v ~= v or v == math.huge or v == -math.huge) then
    return path .. ' is not a finite number'
  end
  if type(v) == 'table' then
    for k, x in pairs(v) do
      local r = uncomparable(x, type(k) == 'number' and (path .. '[' .. (k - 1) .. ']') or (path .. '.' .. k))
      if r then return r end
    end
  end
  return nil
end

local function is_name_list(v)
  if kind(v) ~= 'list' then return false end
  for _, x in ipairs(v) do
    if type(x) ~= 'string' then return false end
  end
  return true
end

local function is_gpu_names(v)
  if gpu_name(v) then return true end
  if kind(v) ~= 'list' then return false end
  for _, x in ipairs(v) do
    if not gpu_name(x) then return false end
  end
  return true
end

-- Why the positive requirements can never match any worker, or nil: the named keys with a
-- value of the wrong kind.
local function wrong_kind(pos)
  -- A descriptive key, but a negative time limit is a mistake the job must hear of.
  local minutes = as_number(pos.timeout_minutes)
  if minutes and minutes < 0 then return 'requirements.timeout_minutes must not be negative' end
  local hw = pos.hardware
  if hw ~= nil and hw ~= 'all' and kind(hw) ~= 'empty' then
    if kind(hw) ~= 'object' then return 'hardware must be an object or "all"' end
    for hk, hv in pairs(hw) do
      if hv ~= 'all' then
        if HW_NUMBERS[hk] and not as_number(hv) then
          return 'hardware.' .. hk .. ' must be a number or "all"'
        end
        if hk == 'gpu_model' and not is_gpu_names(hv) then
          return 'hardware.gpu_model must be a name or a list of names'
        end
      end
    end
  end
  local models = pos.models
  if models ~= nil and models ~= 'all' and type(models) ~= 'string' and kind(models) ~= 'empty'
    and not is_name_list(models) then
    if kind(models) ~= 'object' then return 'models must be a list of names, a name, "all" or an object by service' end
    for service, list in pairs(models) do
      if list ~= 'all' and type(list) ~= 'string' and kind(list) ~= 'empty' and not is_name_list(list) then
        return 'models.' .. service .. ' must be a list of names, a name or "all"'
      end
    end
  end
  return nil
end

-- Parses a requirements string: the positive and negative tables, or false and the reason
-- when it is malformed or can never be compared. `[]` (what the API stores for an empty list)
-- is no requirements, like an empty string, `null` and `{}`.
local function parse_requirements(raw)
  if raw == nil then return {}, nil end
  local s = string.match(raw, '^%s*(.-)%s*$')
  if s == '' or s == 'null' or s == '[]' then return {}, nil end
  if string.sub(s, 1, 1) ~= '{' then return false, 'malformed requirements JSON' end
  local ok, doc = pcall(cjson.decode, s)
  if not ok or type(doc) ~= 'table' then return false, 'malformed requirements JSON' end
  local pos, neg = doc.positive_requirements, doc.negative_requirements
  if pos == nil and neg == nil then
    pos = doc
  else
    if pos == cjson.null then pos = nil end
    if neg == cjson.null then neg = nil end
    if pos ~= nil and (type(pos) ~= 'table' or kind(pos) == 'list') then return false, 'malformed requirements JSON' end
    if neg ~= nil and (type(neg) ~= 'table' or kind(neg) == 'list') then return false, 'malformed requirements JSON' end
    pos = pos or {}
  end
  local why = uncomparable(pos, 'requirements') or (neg and uncomparable(neg, 'negative_requirements'))
    or wrong_kind(pos)
  if why then return false, why end
  return pos, neg
end

local function customer_ok(customer, caps)
  if customer == nil or customer == '' then return true end
  local ca = caps.customer_access
  if type(ca) ~= 'table' then return true end
  if kind(ca.denied_customers) == 'list' and list_has(ca.denied_customers, customer) then return false end
  if kind(ca.allowed_customers) == 'list' and not list_has(ca.allowed_customers, customer) then return false end
  return true
end

local function worker_services(caps)
  local map = caps.job_service_required_map
  local k = kind(map)
  if k == 'nil' then
    map = caps.services
    k = kind(map)
  end
  if k ~= 'list' then return {} end
  local out, seen = {}, {}
  for _, s in ipairs(map) do
    if type(s) == 'string' and not seen[s] then
      seen[s] = true
      out[#out + 1] = s
    end
  end
  return out
end

-- Memo tables that live across calls in the library's Lua state (never replicated, rebuilt after
-- FUNCTION LOAD): capabilities by their JSON text (with each worker's group verdicts, see
-- group_matches) and parsed requirements by their text. Workers send the same text on every
-- claim and groups share requirement texts, so each is decoded once, not on every call. Each
-- memo is dropped whole when it is full (MEMO_MAX texts; the workers' memo also when their group
-- verdicts reach VERDICTS_MAX), so distinct texts and many groups cannot grow the Lua heap
-- without bound (a few MB at most). Nothing mutates a memoised table.
local MEMO_MAX = 4096
local VERDICTS_MAX = 32768
local caps_memo, caps_memo_n, verdicts_n = {}, 0, 0
local reqs_memo, reqs_memo_n = {}, 0

-- The worker's parsed capabilities and what claiming derives from them, or nil when the text
-- is not a JSON object.
local function worker_of(raw)
  local w = caps_memo[raw]
  if w then return w end
  local ok, caps = pcall(cjson.decode, raw)
  if not ok or type(caps) ~= 'table' then return nil end
  local wf_pin = caps.workflow_id
  if type(wf_pin) ~= 'string' or wf_pin == '' then wf_pin = nil end
  local machine = caps.machine_id
  if type(machine) ~= 'string' then machine = '' end
  w = { caps = caps, services = worker_services(caps), wf_pin = wf_pin, machine = machine, groups = {} }
  if caps_memo_n >= MEMO_MAX then caps_memo, caps_memo_n, verdicts_n = {}, 0, 0 end
  caps_memo[raw] = w
  caps_memo_n = caps_memo_n + 1
  return w
end

-- parse_requirements memoised: { pos = ..., neg = ... } (pos false and neg the reason when the
-- job can never match).
local function requirements_of(raw)
  local entry = reqs_memo[raw]
  if entry then return entry end
  local pos, neg = parse_requirements(raw)
  entry = { pos = pos, neg = neg }
  if reqs_memo_n >= MEMO_MAX then reqs_memo, reqs_memo_n = {}, 0 end
  reqs_memo[raw] = entry
  reqs_memo_n = reqs_memo_n + 1
  return entry
end

-- ---------------------------------------------------------------------------------------------
-- The pending index: jobs:pending grouped by (service, requirements, customer, workflow)
-- ---------------------------------------------------------------------------------------------
--
-- A group's sorted set holds its jobs scored by the contract's score computed from the job hash
-- (jobs:pending's own score when the hash lacks the fields), and equal scores are ordered by
-- the member: an order prefix of ORDER_W characters (the effective time in milliseconds, then
-- the index's submission sequence, both inverted so that the older sorts higher) before the job
-- id. So the claim takes the higher priority first, within it the older job to the millisecond,
-- then the one submitted first, although the score alone cannot tell apart jobs seconds apart.
-- jobs:idx:job maps a job id to its place: its group id (40 hex characters) and order prefix;
-- '' while the hash is missing, 'D' and the order prefix while a retry delay holds the job in
-- jobs:idx:delayed. After the place comes '@' and the jobs:pending score the job was indexed at,
-- so a sweep finds a score the API changed without a message (a re-submission) by comparing
-- the two, and the hash's size is the number of indexed jobs (a claim compares it with
-- jobs:pending's). One key for both: the claim removes one entry, not two (issue 27).

local ORDER_MS_MAX = 99999999999999 -- 14 digits of milliseconds
local ORDER_SEQ_MAX = 999999999999  -- 12 digits of sequence
local ORDER_W = 26

local function order_prefix(ms, seq)
  if ms < 0 then ms = 0 elseif ms > ORDER_MS_MAX then ms = ORDER_MS_MAX end
  return string.format('%014d%012d', ORDER_MS_MAX - ms, ORDER_SEQ_MAX - (seq % ORDER_SEQ_MAX))
end

local function prefix_seq(prefix)
  return ORDER_SEQ_MAX - (tonumber(string.sub(prefix, 15, ORDER_W)) or ORDER_SEQ_MAX)
end

-- A jobs:idx:job entry's place and the jobs:pending score (text) it was indexed at; nil for a
-- missing entry. An entry written before the score moved in (no '@'; issue 27) has no score, so
-- the sweeps index it again.
local function entry_of(e)
  if not e then return nil end
  local c = string.sub(e, 1, 1)
  local at
  if c == '@' then
    return '', string.sub(e, 2)
  elseif c == 'D' then
    at = ORDER_W + 2
  else
    at = 40 + ORDER_W + 1
  end
  if string.sub(e, at, at) ~= '@' then return e, nil end
  return string.sub(e, 1, at - 1), string.sub(e, at + 1)
end

-- Days from 1970-01-01 to a date of the proleptic Gregorian calendar (memoised by date: every
-- job indexed on one day shares it; bounded, dropped whole when full).
local days_memo, days_memo_n = {}, 0
local function days_of(y, mo, d)
  local key = (y * 100 + mo) * 100 + d
  local days = days_memo[key]
  if days then return days end
  if mo <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + d - 1
  days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
  if days_memo_n >= MEMO_MAX then days_memo, days_memo_n = {}, 0 end
  days_memo[key] = days
  days_memo_n = days_memo_n + 1
  return days
end

-- Epoch milliseconds of an ISO-8601 time ('2025-01-01T00:00:00.000Z', an offset, or none) or
-- of a string of digits (already milliseconds); nil otherwise. The API's own form (what
-- JavaScript's toISOString writes) is read from its bytes: the captures, tonumbers and
-- math.floor of the general pattern cost about 23 k instructions per indexed job, this 8 k.
local function time_ms(s)
  if type(s) ~= 'string' then return nil end
  if string.find(s, '^%d%d%d%d%-%d%d%-%d%d[T ]%d%d:%d%d:%d%d%.%d%d%d[Zz]$') then
    local y1, y2, y3, y4, _, mo1, mo2, _, d1, d2, _, h1, h2, _, mi1, mi2, _, s1, s2, _, f1, f2, f3 =
      string.byte(s, 1, 23)
    -- Each character's code less 48 ('0'), folded into the constants.
    local days = days_of(y1 * 1000 + y2 * 100 + y3 * 10 + y4 - 53328, mo1 * 10 + mo2 - 528, d1 * 10 + d2 - 528)
    return (((days * 24 + h1 * 10 + h2 - 528) * 60 + mi1 * 10 + mi2 - 528) * 60 + s1 * 10 + s2 - 528) * 1000 +
      f1 * 100 + f2 * 10 + f3 - 5328
  end
  if string.match(s, '^%d+$') then return tonumber(s) end
  local y, mo, d, h, mi, sec, frac, tz = string.match(s,
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)[T ](%d%d):(%d%d):(%d%d)%.?(%d*)(.*)$')
  if not y then return nil end
  local off = 0
  if tz ~= '' and tz ~= 'Z' and tz ~= 'z' then
    local sign, oh, om = string.match(tz, '^([%+%-])(%d%d):?(%d%d)$')
    if not sign then return nil end
    off = (tonumber(oh) * 60 + tonumber(om)) * 60000
    if sign == '-' then off = -off end
  end
  local days = days_of(tonumber(y), tonumber(mo), tonumber(d))
  local ms = (((days * 24 + tonumber(h)) * 60 + tonumber(mi)) * 60 + tonumber(sec)) * 1000
  if frac ~= '' then ms = ms + tonumber(string.sub(frac .. '00', 1, 3)) end
  return ms - off
end

-- A number that JavaScript's `||` keeps (not 0, not NaN), else nil.
local function nonzero(s)
  local n = tonumber(s)
  if n and n ~= 0 and n == n then return n end
  return nil
end

-- The group id of a job's matching fields (nil without a service) and its canonical
-- requirements text. Every claim re-checks its job's group, and a SHA-1 with the trimming
-- costs more than two commands, so both are memoised by the raw fields, nested by field so that
-- no two tuples share an entry (bounded: dropped whole when full; a pure function of its
-- arguments, so never stale).
local group_memo, group_memo_n = {}, 0
local function group_of(service, reqs, customer, workflow)
  if not service or service == '' then return nil end
  reqs, customer, workflow = reqs or '', customer or '', workflow or ''
  local by_reqs = group_memo[service]
  local by_customer = by_reqs and by_reqs[reqs]
  local by_workflow = by_customer and by_customer[customer]
  local known = by_workflow and by_workflow[workflow]
  if known then return known[1], known[2] end
  local canon = string.match(reqs, '^%s*(.-)%s*$')
  if canon == 'null' or canon == '{}' or canon == '[]' then canon = '' end
  local gid = redis.sha1hex(service .. '\n' .. canon .. '\n' .. customer .. '\n' .. workflow)
  if group_memo_n >= MEMO_MAX then group_memo, group_memo_n, by_reqs = {}, 0, nil end
  if not by_reqs then
    by_reqs = {}
    group_memo[service] = by_reqs
  end
  by_customer = by_reqs[reqs]
  if not by_customer then
    by_customer = {}
    by_reqs[reqs] = by_customer
  end
  by_workflow = by_customer[customer]
  if not by_workflow then
    by_workflow = {}
    by_customer[customer] = by_workflow
  end
  by_workflow[workflow] = { gid, canon }
  group_memo_n = group_memo_n + 1
  return gid, canon
end

local function drop_group(p, gid, service)
  if not service then service = redis.call('HGET', p .. 'jobs:idx:meta:' .. gid, 'service') end
  if service then redis.call('SREM', p .. 'jobs:idx:svc:' .. service, gid) end
  redis.call('DEL', p .. 'jobs:idx:meta:' .. gid)
end

local function unindex(p, id)
  local entry = entry_of(redis.call('HGET', p .. 'jobs:idx:job', id))
  redis.call('HDEL', p .. 'jobs:idx:job', id)
  if entry == '' then redis.call('ZREM', p .. 'jobs:idx:orphans', id) end
  if not entry or entry == '' then return end
  if string.sub(entry, 1, 1) == 'D' then
    redis.call('ZREM', p .. 'jobs:idx:delayed', id)
    return
  end
  local gid = string.sub(entry, 1, 40)
  local gkey = p .. 'jobs:idx:g:' .. gid
  redis.call('ZREM', gkey, string.sub(entry, 41) .. id)
  if redis.call('ZCARD', gkey) == 0 then drop_group(p, gid) end
end

local function set_terminal_ttl(p, id)
  redis.call('EXPIRE', p .. 'job:' .. id, TERMINAL_TTL_S)
end

local function mark_unworkable(p, id, reason, now)
  dbg('job ' .. id .. ' unworkable: ' .. reason)
  local at = iso(now)
  redis.call('HSET', p .. 'job:' .. id, 'status', 'unworkable', 'error', reason, 'failed_at', at)
  redis.call('ZREM', p .. 'jobs:pending', id)
  unindex(p, id)
  set_terminal_ttl(p, id)
  local rc = redis.call('HGET', p .. 'job:' .. id, 'retry_count') or '0'
  publish(p, 'job_failed', { job_id = id, worker_id = '', status = 'unworkable', error = reason, failed_at = at,
    retry_count = tonumber(rc) or 0, can_retry = false, timestamp = now })
end

-- The earliest end of a retry delay this Lua state knows of: math.huge when none, nil when
-- unknown (a fresh state after FUNCTION LOAD or a restart, or a replica promoted). Only this
-- library writes jobs:idx:delayed, so a claim reads it only once a delay may be over.
local next_due = nil

-- Until when an id queued before its hash (an orphan) may still get its hash: claims re-check
-- the young ones (jobs:idx:orphans, by first sight) until then, since with no machine
-- subscribed nothing else would. 0 when none; nil when unknown (a fresh Lua state).
local orphan_watch = nil

-- Puts one job of jobs:pending into its group, as its hash says now (a job re-submitted under
-- the same id moves to its new group). `seq` keeps a returned job's place among equal times;
-- `delay_until` holds it in jobs:idx:delayed until then. Returns 'indexed', 'delayed', 'orphan'
-- (no hash yet), 'dropped' (debris removed), 'unworkable' or 'not_pending'; 'indexed' comes with
-- the job's group id and service (announce wakes for them without reading them back).
local function index_job(p, id, now, seq, delay_until)
  -- redis.call looked up once: a global and a field, about 0.2 k instructions a command.
  local call = redis.call
  local pscore = call('ZSCORE', p .. 'jobs:pending', id)
  if not pscore then
    unindex(p, id)
    return 'not_pending'
  end
  -- job_type (the service's older name) is read only when service_required is missing: every
  -- field an HMGET returns costs about 2.5 k instructions.
  local jkey = p .. 'job:' .. id
  -- The payload is not read: checking it (JSON, timeout_seconds) is the claiming worker's, which
  -- parses it anyway; decoding a real workflow here cost about 170 instructions a byte.
  local f = call('HMGET', jkey, 'service_required', 'requirements', 'customer_id', 'workflow_id',
    'status', 'priority', 'workflow_priority', 'created_at', 'workflow_datetime')
  local prev, prev_score = entry_of(call('HGET', p .. 'jobs:idx:job', id))
  local service = f[1]
  if not service or service == '' then service = call('HGET', jkey, 'job_type') end
  if not f[1] and not service and not f[5] then
    -- The API writes the ZADD before the HSET; the job_submitted index call or a sweep
    -- indexes it once the hash exists.
    if not prev then
      call('HSET', p .. 'jobs:idx:job', id, '@' .. pscore)
      call('ZADD', p .. 'jobs:idx:orphans', now, id)
      orphan_watch = now + ORPHAN_WATCH_MS
    end
    return 'orphan'
  end
  local status = f[5]
  if status and status ~= '' and not QUEUED[status] then
    call('ZREM', p .. 'jobs:pending', id)
    unindex(p, id)
    return 'dropped'
  end
  local gid, canon = group_of(service or nil, f[2], f[3], f[4])
  if not gid then
    mark_unworkable(p, id, 'job has no service_required', now)
    return 'unworkable'
  end
  local reqs = requirements_of(f[2] or '')
  if reqs.pos == false then
    mark_unworkable(p, id, reqs.neg, now)
    return 'unworkable'
  end
  -- The API scores with JS `||`: a workflow time or priority of 0 (stored as "0") or none
  -- falls back to the job's own.
  -- (The workflow fields are mostly missing: false, no call.)
  local ms = f[9] and nonzero(f[9]) or time_ms(f[8])
  local prio = f[7] and nonzero(f[7]) or tonumber(f[6])
  local pnum = tonumber(pscore)
  local score = pnum
  if prio and ms then score = prio * 1e15 - math.floor(ms / 1000) end
  if prev and prev ~= '' then
    local kept = string.sub(prev, -ORDER_W)
    if not seq then seq = prefix_seq(kept) end
    if string.sub(prev, 1, 1) == 'D' then
      local untl = tonumber(call('ZSCORE', p .. 'jobs:idx:delayed', id))
      if untl and untl > now and not delay_until then return 'delayed' end
    elseif string.sub(prev, 1, 40) == gid and not delay_until then
      local member = kept .. id
      if tonumber(call('ZSCORE', p .. 'jobs:idx:g:' .. gid, member)) == score
        and kept == order_prefix(ms or 0, seq) then
        -- The place is right; jobs:pending's score (what sweeps compare) may still be new.
        if prev_score ~= pscore then call('HSET', p .. 'jobs:idx:job', id, prev .. '@' .. pscore) end
        return 'indexed', gid, service
      end
    end
    unindex(p, id)
  end
  if not seq then seq = call('INCR', p .. 'jobs:idx:seq') end
  local prefix = order_prefix(ms or 0, seq)
  if prev == '' then call('ZREM', p .. 'jobs:idx:orphans', id) end
  if delay_until and delay_until > now then
    call('ZADD', p .. 'jobs:idx:delayed', delay_until, id)
    call('HSET', p .. 'jobs:idx:job', id, 'D' .. prefix .. '@' .. pscore)
    if next_due and delay_until < next_due then next_due = delay_until end
    return 'delayed'
  end
  -- A group new to its service's set has no meta (drop_group removes both): written without
  -- asking; a group already there mostly has it, and is asked.
  local mkey = p .. 'jobs:idx:meta:' .. gid
  if call('SADD', p .. 'jobs:idx:svc:' .. service, gid) == 1 or call('EXISTS', mkey) == 0 then
    call('HSET', mkey, 'service', service, 'requirements', canon, 'customer_id', f[3] or '', 'workflow_id',
      f[4] or '')
  end
  -- The score as jobs:pending's text when it is the same (what the API computed, mostly): a
  -- number passed to Redis is formatted with %.17g.
  call('ZADD', p .. 'jobs:idx:g:' .. gid, score == pnum and pscore or score, prefix .. id)
  call('HSET', p .. 'jobs:idx:job', id, gid .. prefix .. '@' .. pscore)
  return 'indexed', gid, service
end

-- Moves jobs whose retry delay is over from jobs:idx:delayed into their groups.
local function release_due(p, now)
  if next_due and next_due > now then return end
  local dkey = p .. 'jobs:idx:delayed'
  local due = redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, DUE_BATCH)
  for _, id in ipairs(due) do
    redis.call('ZREM', dkey, id)
    index_job(p, id, now)
  end
  local first = redis.call('ZRANGE', dkey, 0, 0, 'WITHSCORES')
  next_due = tonumber(first[2]) or math.huge
  -- With more due than one batch, the next claim goes on (the stored bound is already past).
  if #due == DUE_BATCH then next_due = nil end
end

-- The scores of `ids` in sorted set `key` (false for a missing one), in one ZMSCORE where the
-- server has it (6.2+) and one ZSCORE each where it does not (the EVALSHA fallback).
local has_zmscore = true
local function scores_of(key, ids)
  if #ids == 0 then return {} end
  if #ids > SWEEP_MAX then
    -- unpack's limit: in slices (an HSCAN step may return a little more than its COUNT).
    local out = {}
    for from = 1, #ids, SWEEP_MAX do
      local part = scores_of(key, { unpack(ids, from, math.min(from + SWEEP_MAX - 1, #ids)) })
      for i = 1, #part do out[from + i - 1] = part[i] end
    end
    return out
  end
  if has_zmscore then
    local r = redis.pcall('ZMSCORE', key, unpack(ids))
    if type(r) == 'table' and not r.err then return r end
    has_zmscore = false
  end
  local out = {}
  for i, id in ipairs(ids) do out[i] = redis.call('ZSCORE', key, id) or false end
  return out
end

-- Indexes those of `ids` (with their jobs:pending scores `pscores`) that the index lacks, holds
-- as orphans, or holds under another jobs:pending score (re-submitted or re-queued behind our
-- back). Returns the ids that went into a group (or a retry delay) this way.
local function index_missing(p, ids, pscores, now)
  local found = {}
  if #ids == 0 then return found end
  local entries = redis.call('HMGET', p .. 'jobs:idx:job', unpack(ids))
  for i, id in ipairs(ids) do
    local place, have = entry_of(entries[i] or nil)
    if not have or place == '' or tonumber(have) ~= tonumber(pscores[i]) then
      local r = index_job(p, id, now)
      -- An entry written before the score moved in only gets its score: nothing was found.
      if (r == 'indexed' or r == 'delayed') and not (place and place ~= '' and not have) then
        found[#found + 1] = id
      end
    end
  end
  return found
end

-- One bounded step of repairing the index against jobs:pending, from where the last step
-- stopped: indexes what index_missing finds (from the top of jobs:pending, so the jobs to run
-- first come first) and drops entries for jobs that left jobs:pending behind our back. Returns
-- the ids found and whether this step ended a pass over jobs:pending.
local legacy_all_gone, legacy_all_n = {}, 0
local function sweep(p, budget, now)
  budget = math.min(budget, SWEEP_MAX)
  if not legacy_all_gone[p] then
    -- jobs:idx:all, the index's list before it moved into jobs:idx:job (issue 27), is read by
    -- nothing any more.
    redis.call('UNLINK', p .. 'jobs:idx:all')
    if legacy_all_n >= 64 then legacy_all_gone, legacy_all_n = {}, 0 end
    legacy_all_gone[p] = true
    legacy_all_n = legacy_all_n + 1
  end
  local cur = tonumber(redis.call('GET', p .. 'jobs:idx:cursor:pending')) or 0
  local flat = redis.call('ZREVRANGE', p .. 'jobs:pending', cur, cur + budget - 1, 'WITHSCORES')
  local ids, pscores = {}, {}
  for i = 1, #flat, 2 do
    ids[#ids + 1] = flat[i]
    pscores[#pscores + 1] = flat[i + 1]
  end
  local found = index_missing(p, ids, pscores, now)
  local wrapped = #ids < budget
  if wrapped then cur = 0 else cur = cur + budget end
  redis.call('SET', p .. 'jobs:idx:cursor:pending', cur)
  -- The index's side: an HSCAN step of jobs:idx:job (the cursor is HSCAN's).
  local step = redis.call('HSCAN', p .. 'jobs:idx:job', redis.call('GET', p .. 'jobs:idx:cursor:index') or '0',
    'COUNT', budget)
  ids = {}
  for i = 1, #step[2], 2 do ids[#ids + 1] = step[2][i] end
  local there = scores_of(p .. 'jobs:pending', ids)
  for i, id in ipairs(ids) do
    if not there[i] then unindex(p, id) end
  end
  redis.call('SET', p .. 'jobs:idx:cursor:index', step[1])
  return found, wrapped
end

-- Before a claim chooses, while jobs:pending holds jobs the index lacks (the API re-queued them
-- without a message, or queued them while no machine listened): index the top of jobs:pending,
-- where the jobs to run next are, and every job tied with the last of them (jobs of one
-- priority queued within seconds tie in jobs:pending, and the order among ties lives in the
-- hash: without them the claim would take a later job first), then one bounded sweep step for
-- the rest. Ids queued before their hash are re-checked while young. The cost stays bounded
-- whatever the backlog.
local function reconcile(p, now)
  if orphan_watch ~= 0 and (orphan_watch == nil or orphan_watch > now) then
    local okey = p .. 'jobs:idx:orphans'
    redis.call('ZREMRANGEBYSCORE', okey, '-inf', now - ORPHAN_WATCH_MS)
    local young = redis.call('ZRANGE', okey, 0, CLAIM_RECONCILE - 1)
    for _, id in ipairs(young) do index_job(p, id, now) end
    local last = redis.call('ZRANGE', okey, -1, -1, 'WITHSCORES')
    orphan_watch = last[2] and (tonumber(last[2]) + ORPHAN_WATCH_MS) or 0
  end
  local N = names_memo[p] or names(p)
  if redis.call('ZCARD', N['jobs:pending']) ~= redis.call('HLEN', N['jobs:idx:job']) then
    local pkey = p .. 'jobs:pending'
    local flat = redis.call('ZREVRANGE', pkey, 0, CLAIM_RECONCILE - 1, 'WITHSCORES')
    if #flat == CLAIM_RECONCILE * 2 then
      flat = redis.call('ZREVRANGEBYSCORE', pkey, '+inf', flat[#flat], 'WITHSCORES', 'LIMIT', 0,
        CLAIM_RECONCILE + CLAIM_TIES)
    end
    local ids, pscores = {}, {}
    for i = 1, #flat, 2 do
      ids[#ids + 1] = flat[i]
      pscores[#pscores + 1] = flat[i + 1]
    end
    index_missing(p, ids, pscores, now)
    sweep(p, CLAIM_RECONCILE, now)
  end
end

-- One step of the fleet's sweeper, which finds within seconds, at any depth, the jobs the API
-- put into jobs:pending without a message (its clean-ups, an original worker's retry, a
-- re-submission at a new score), which a claim's repair from the top would reach only late.
-- One machine sweeps for the whole fleet: the holder of the lease jobs:idx:sweeper (SET NX PX,
-- renewed by each step), so the cost does not grow with the number of machines. Each job found
-- is announced on job_requeued so that idle workers of its service claim it now. Returns
-- {held 1/0, jobs found, 1 when this step ended a pass}.
local function fleet_sweep(p, holder, lease_ms, budget, now)
  local lkey = p .. 'jobs:idx:sweeper'
  local owner = redis.call('GET', lkey)
  if owner and owner ~= holder then return { 0, 0, 0 } end
  redis.call('SET', lkey, holder, 'PX', lease_ms)
  local found, wrapped = sweep(p, budget, now)
  for _, id in ipairs(found) do
    local service = redis.call('HGET', p .. 'job:' .. id, 'service_required') or ''
    publish(p, 'job_requeued', { job_id = id, service_required = service, reason = 'found', timestamp = now,
      ready_at = now })
  end
  return { 1, #found, wrapped and 1 or 0 }
end

-- ---------------------------------------------------------------------------------------------
-- Claiming
-- ---------------------------------------------------------------------------------------------

-- Whether `worker` is held off the job of group member `member` (a retry goes to another worker
-- first, see fail).
local function held_off(p, member, worker, now)
  local h = redis.call('HGET', p .. 'jobs:holdoff', string.sub(member, ORDER_W + 1))
  if not h then return false end
  local w, untl = string.match(h, '^(.*)|(%d+)$')
  return w == worker and tonumber(untl) > now
end

-- The best claimable job of one group for this worker: (member, score as Redis wrote it) or
-- nil; the third value is true when the group is empty. One entry is read: Redis formats every
-- score it returns with %.17g (about 2.5 k instructions at these magnitudes), so the claim that
-- empties a group does not peek at a second one; the next claimer to meet the empty group
-- removes it.
local function group_top(p, gid, worker, holdoffs, now, skip_limit)
  local gkey = p .. 'jobs:idx:g:' .. gid
  local offset, skipped = 0, 0
  while true do
    local top
    if offset == 0 then
      top = redis.call('ZREVRANGE', gkey, '0', '0', 'WITHSCORES')
    else
      top = redis.call('ZREVRANGE', gkey, offset, offset, 'WITHSCORES')
    end
    if #top == 0 then return nil, nil, offset == 0 end
    -- Whether the job is still in jobs:pending is checked when it is claimed (ZREM's reply),
    -- which keeps this path to one command per group.
    local member, score = top[1], top[2]
    if not (holdoffs and held_off(p, member, worker, now)) then return member, score, false end
    skipped = skipped + 1
    if skipped >= skip_limit then return nil end
    offset = offset + 1
  end
end

local function group_matches_meta(p, gid, caps, wf_pin)
  local meta = redis.call('HMGET', p .. 'jobs:idx:meta:' .. gid, 'service', 'requirements', 'customer_id',
    'workflow_id')
  if not meta[1] then return nil end
  if wf_pin and meta[4] ~= wf_pin then return false end
  if not customer_ok(meta[3], caps) then return false end
  local entry = requirements_of(meta[2] or '')
  if entry.pos == false then return false end
  if not positive_ok(entry.pos, caps, meta[1]) then return false end
  if entry.neg and negative_hit(entry.neg, caps, meta[1]) then return false end
  return true
end

-- Whether this worker can run the jobs of group `gid`. A group id is the SHA-1 of the group's
-- meta (service, requirements, customer, workflow), so the answer for one capabilities text
-- never changes and is memoised in the worker's entry; a group whose meta is missing is not
-- memoised (its id may be indexed again later). The index keeps a group in jobs:idx:svc:*
-- exactly while its meta exists (both change together), so a memoised group is still real.
local function group_matches(p, gid, w)
  local known = w.groups[gid]
  if known ~= nil then return known end
  local ok = group_matches_meta(p, gid, w.caps, w.wf_pin)
  if ok == nil then return false end
  if verdicts_n >= VERDICTS_MAX then
    -- Drop every worker's entry; this one stays usable for the rest of this call.
    caps_memo, caps_memo_n, verdicts_n = {}, 0, 0
  end
  w.groups[gid] = ok
  verdicts_n = verdicts_n + 1
  return ok
end

-- Affinity without starvation: a worker that fetches models on demand advertises how long a
-- job must have waited before it takes one whose required models it lacks
-- (capabilities.models_on_demand_after_ms, from models.affinity_wait). It may then take the
-- group's jobs as if `models` were met ('cold'), but a job only once the wait has passed since
-- a cold worker first saw it (jobs:cold:<id>, expiring), so warm workers win and a cold fleet
-- still makes progress. Returns 'cold' for a group only a fetch makes workable; the caller
-- checks `ready` with the job it chose.
local function cold_group(p, gid, w, id, now)
  local wait = tonumber(w.caps.models_on_demand_after_ms)
  if not wait or wait < 0 then return false end
  if id then
    local key = p .. 'jobs:cold:' .. id
    redis.call('SET', key, now, 'NX', 'PX', math.max(wait * 6, 60000))
    return now - (tonumber(redis.call('GET', key)) or now) >= wait
  end
  w.cold = w.cold or {}
  local known = w.cold[gid]
  if known ~= nil then return known end
  local meta = redis.call('HMGET', p .. 'jobs:idx:meta:' .. gid, 'service', 'requirements', 'customer_id',
    'workflow_id')
  if not meta[1] then return false end
  local entry = requirements_of(meta[2] or '')
  local ok = entry.pos ~= false and entry.pos.models ~= nil and not (w.wf_pin and meta[4] ~= w.wf_pin)
    and customer_ok(meta[3], w.caps)
  if ok then
    local pos = {}
    for k, v in pairs(entry.pos) do
      if k ~= 'models' then pos[k] = v end
    end
    ok = positive_ok(pos, w.caps, meta[1]) and not (entry.neg and negative_hit(entry.neg, w.caps, meta[1]))
  end
  w.cold[gid] = ok and 'cold' or false
  return w.cold[gid]
end

-- One claim's matching groups: ids, services, how (true or 'cold'). Reused by every claim (one
-- runs at a time and none inside another); entries past the claim's count are stale.
local cand_gid, cand_svc, cand_how = {}, {}, {}

-- Claims the best job for worker `w`. `lease_ms` nil is an original worker's two-argument call
-- (a fleet migrating one machine at a time): its claim is the original's, with no lease and no
-- claim record, so nothing of ours reaps, requeues or fails the job it runs.
local function claim(p, w, worker, max_examine, lease_ms, now, now_text, now_secs, now_ms3)
  -- `redis.call` is a global and a field: about 0.2 k instructions to look up, on each of the
  -- claim's commands. The hot functions look it up once (it is nil while the library loads,
  -- so it cannot be kept from then).
  local call = redis.call
  if not now then now, now_text, now_secs, now_ms3 = now_ms() end
  reconcile(p, now)
  release_due(p, now)
  local services = w.services
  -- A chosen job can turn out to be debris (its hash changed status behind our back) or to be
  -- re-submitted into another group; fix the index and choose again. The bound only guards
  -- against a corrupted index.
  local N = names_memo[p] or names(p)
  for _ = 1, 64 do
    local holdoffs = call('HLEN', N['jobs:holdoff']) > 0
    -- The groups this worker can run, warm (true) or only with a fetch ('cold').
    local n = 0
    for _, service in ipairs(services) do
      local gids = call('SMEMBERS', p .. 'jobs:idx:svc:' .. service)
      for _, gid in ipairs(gids) do
        local how = group_matches(p, gid, w) or cold_group(p, gid, w)
        if how then
          n = n + 1
          cand_gid[n], cand_svc[n], cand_how[n] = gid, service, how
        end
      end
    end
    -- The best so far: its member, its score as Redis wrote it and as a number (converted only
    -- once a second group competes), and whether it already left its group.
    local best_member, best_score, best_gid, best_text, popped
    local peek = n ~= 1 or cand_how[1] ~= true
    if not peek then
      -- One warm group (most claims): its best job is the one, taken out of the group in the
      -- same command that reads it (one command fewer). Every way below that does not claim it
      -- (debris, gone from jobs:pending, re-submitted) removes it anyway; one this worker is
      -- held off goes back in its place (its exact score and member) and the group is peeked.
      local gkey = p .. 'jobs:idx:g:' .. cand_gid[1]
      local top = call('ZPOPMAX', gkey)
      if #top == 0 then
        drop_group(p, cand_gid[1], cand_svc[1])
      elseif holdoffs and held_off(p, top[1], worker, now) then
        call('ZADD', gkey, top[2], top[1])
        peek = true
      else
        best_member, best_text, best_gid, popped = top[1], top[2], cand_gid[1], true
      end
    end
    if peek then
      for i = 1, n do
        local gid, how = cand_gid[i], cand_how[i]
        local member, text, empty = group_top(p, gid, worker, holdoffs, now, max_examine)
        if member and how == 'cold' and not cold_group(p, gid, w, string.sub(member, ORDER_W + 1), now) then
          member = nil
        end
        if empty then
          -- Claims leave empty groups behind; the first claimer to meet one removes it.
          drop_group(p, gid, cand_svc[i])
        end
        if member then
          local score
          if best_member then
            best_score = best_score or tonumber(best_text)
            score = tonumber(text)
          end
          if not best_member or score > best_score or (score == best_score and member > best_member) then
            best_member, best_score, best_gid, best_text = member, score, gid, text
          end
        end
      end
    end
    if not best_member then return nil end
    local best_id = string.sub(best_member, ORDER_W + 1)
    local jkey = p .. 'job:' .. best_id
    local job, exists = hgetall(jkey)
    local queued = exists and (job.status == nil or job.status == '' or QUEUED[job.status])
    local service = job.service_required
    if not service or service == '' then service = job.job_type end
    if queued and group_of(service, job.requirements, job.customer_id, job.workflow_id) ~= best_gid then
      -- Re-submitted under the same id with other matching fields: match it on what it says now.
      index_job(p, best_id, now)
    elseif queued and call('ZREM', N['jobs:pending'], best_id) == 1 then
      if not popped then call('ZREM', p .. 'jobs:idx:g:' .. best_gid, best_member) end
      call('HDEL', N['jobs:idx:job'], best_id)
      if holdoffs then call('HDEL', N['jobs:holdoff'], best_id) end
      local at = iso_at(now_secs, now_ms3)
      -- A claim record left by an earlier life of this id (a job re-submitted after it ended) is
      -- not this claim's: neither the snapshot nor an original worker's claim may carry it.
      local stale = job.claim_ms ~= nil
      if stale then
        for _, f in ipairs(CLAIM_FIELDS) do job[f] = nil end
      end
      if lease_ms then
        -- The claim record lives in the job hash (one HSET with the claim itself). The score is
        -- the exact text Redis gave, which requeue restores to jobs:pending.
        call('HSET', jkey, 'status', 'assigned', 'worker_id', worker, 'assigned_at', at,
          'claim_ms', now_text, 'claim_score', best_text, 'claim_order', string.sub(best_member, 1, ORDER_W))
        call('ZADD', N['jobs:leases'], ms_text(now + lease_ms), best_id)
      else
        call('HSET', jkey, 'status', 'assigned', 'worker_id', worker, 'assigned_at', at)
        if stale then call('HDEL', jkey, unpack(CLAIM_FIELDS)) end
      end
      job.status, job.worker_id, job.assigned_at = 'assigned', worker, at
      local snapshot = cjson.encode(job)
      local akey, wkey = worker_keys(p, worker)
      call('HSET', akey, best_id, snapshot)
      call('HSET', wkey, 'status', 'busy', 'current_job_id', best_id,
        'last_status_change', at)
      -- The original's two messages, field for field (update_job_progress has no status: the
      -- API would turn one into an extra client event on every claim; the step fields are left
      -- out when the job has none, as the original's are).
      local jid, jworker, ts = jstr(best_id), jname(worker), now_text
      local steps = ''
      if job.step_number then steps = ',"step_number":' .. jname(job.step_number) end
      if job.total_steps then steps = steps .. ',"total_steps":' .. jname(job.total_steps) end
      call('PUBLISH', N['job_claimed'], '{"job_id":' .. jid .. ',"worker_id":' .. jworker ..
        ',"status":"claimed","message":"Job claimed by worker","claimed_at":"' .. at .. '","timestamp":' .. ts ..
        ',"service_required":' .. jname(service or '') .. ',"customer_id":' .. jname(job.customer_id or '') ..
        ',"workflow_id":' .. jname(job.workflow_id or '') .. steps .. '}')
      call('PUBLISH', N['update_job_progress'], '{"job_id":' .. jid .. ',"worker_id":' .. jworker ..
        ',"progress":0,"timestamp":' .. ts .. '}')
      return '{"jobId":' .. jid .. ',"job":' .. snapshot .. '}'
    else
      -- Gone from jobs:pending behind our back, or debris whose hash says it already ended:
      -- drop it from the index and choose again.
      unindex(p, best_id)
    end
  end
  return nil
end

-- ---------------------------------------------------------------------------------------------
-- Wake-ups: one index and one woken worker per submission, whatever the size of the fleet
-- ---------------------------------------------------------------------------------------------
-- A worker whose claim (claimOrPark) finds nothing parks: jobs:idx:parked maps it to its
-- capabilities text and jobs:idx:idle:<service> scores it, per service it takes, with the time
-- until which it counts as waiting (it parks again on every safety poll, so a dead machine's
-- workers drop out by themselves). One machine of the fleet, the holder of the lease
-- jobs:idx:indexer (fleetTick), listens to job_submitted and announces each job once
-- (announceJob): the job is indexed and ONE parked worker that can run it, the most recently
-- seen alive, is taken off the park and woken on its machine's channel jobs:wake:<machine>.
-- The job is noted in jobs:idx:wakes with a deadline; the indexer's next tick after it wakes
-- another capable parked worker when the job is still pending (the woken one died, missed the
-- message, or took a better job), so no submission waits for a safety poll. A submission no
-- parked worker can run wakes nobody: the first worker that frees up claims it in its place.

local WAKE_SCAN = 16      -- parked workers of the job's service one wake looks at
local WAKE_DUE_BATCH = 64 -- overdue wakes one tick re-sends
local DEFAULT_WAKE_MS = 750 -- how long a woken worker has to claim (the broker's WAKE_DEADLINE)

-- Where the next wake for a job goes on looking among the parked workers (the ones before it
-- could not run the job), by job id. Only a hint kept in the Lua state: lost, a wake starts
-- from the most recently parked again. Dropped whole when large.
local wake_from, wake_from_n = {}, 0

local function unpark(p, worker, services)
  if redis.call('HDEL', p .. 'jobs:idx:parked', worker) == 0 then return end
  for _, s in ipairs(services) do redis.call('ZREM', p .. 'jobs:idx:idle:' .. s, worker) end
end

local function park(p, raw, w, worker, untl)
  redis.call('HSET', p .. 'jobs:idx:parked', worker, raw)
  for _, s in ipairs(w.services) do redis.call('ZADD', p .. 'jobs:idx:idle:' .. s, untl, worker) end
end

-- Parked workers whose park ran out leave jobs:idx:parked: a machine that died (SIGKILLed,
-- its host gone) between two safety polls never leaves the park itself, and while a wake drops
-- such a worker's jobs:idx:idle:<service> entries, nothing else would remove its capabilities
-- from the hash, which then grew with every machine that ever died. The fleet's sweeper looks
-- at PARK_SWEEP entries of the hash per step, going on where its last step stopped (a cursor in
-- the Lua state: lost, it starts over), so the cost is fixed for the fleet whatever its size and
-- a dead worker is gone within a pass over the hash. A worker is parked in every service it
-- takes until the same time, so its first service's entry says whether its park ran out.
local PARK_SWEEP = 32
local park_cursor = {}

local function sweep_park(p, now)
  local key = p .. 'jobs:idx:parked'
  local r = redis.call('HSCAN', key, park_cursor[p] or '0', 'COUNT', PARK_SWEEP)
  park_cursor[p] = r[1]
  local flat = r[2]
  for i = 1, #flat, 2 do
    local worker, w = flat[i], worker_of(flat[i + 1])
    local service = w and w.services[1]
    local untl = service and tonumber(redis.call('ZSCORE', p .. 'jobs:idx:idle:' .. service, worker))
    if not untl or untl < now then
      if w then unpark(p, worker, w.services) else redis.call('HDEL', key, worker) end
    end
  end
end

-- Wakes one parked worker (not `skip`) that can run the jobs of group `gid` for job `id`,
-- looking at WAKE_SCAN parked workers of its service from the `from`th most recently parked.
-- Returns its name, or nil and, when more parked workers lie beyond those looked at, where the
-- next look starts: the job is then looked for again on the indexer's next tick, WAKE_SCAN
-- workers further each time, so a job only a worker deep in the park can run still wakes it
-- within a few ticks while one wake costs WAKE_SCAN lookups at most. `now_s` is `now` as text
-- (now_ms's second value). Parks that ran out (their machine stopped polling) are not looked
-- at (the range starts at now) and the fleet's sweeper removes them (sweep_park).
local function wake_for(p, id, gid, service, now, now_s, wake_ms, from, skip)
  -- redis.call looked up once: a global and a field, about 0.2 k instructions a command.
  local call = redis.call
  local ikey = p .. 'jobs:idx:idle:' .. service
  -- The most recently parked one first, alone: in a fleet of like workers it is the one woken,
  -- and reading the other WAKE_SCAN - 1 names would cost more than the rest of the wake. The
  -- rest only when it cannot run the job.
  local cands = call('ZREVRANGEBYSCORE', ikey, '+inf', now_s, 'LIMIT', from, 1)
  local gone, i = 0, 1
  while i <= #cands do
    local worker = cands[i]
    local raw = worker ~= skip and call('HGET', p .. 'jobs:idx:parked', worker)
    local w = raw and worker_of(raw)
    if raw and (not w or not list_has(w.services, service)) then
      -- Parked under capabilities that no longer take this service (a reload).
      call('ZREM', ikey, worker)
      gone = gone + 1
    elseif w and group_matches(p, gid, w) then
      unpark(p, worker, w.services)
      call('ZADD', p .. 'jobs:idx:wakes', ms_text(now + wake_ms), id)
      call('PUBLISH', p .. 'jobs:wake:' .. w.machine, '{"worker_id":' .. jname(worker) .. ',"job_id":' ..
        jstr(id) .. ',"timestamp":' .. now_s .. '}')
      return worker
    end
    if i == 1 and #cands == 1 then
      -- The first could not run it: the next WAKE_SCAN - 1 (their places moved up by the
      -- ones removed meanwhile).
      local more = call('ZREVRANGEBYSCORE', ikey, '+inf', now_s, 'LIMIT', from + 1 - gone, WAKE_SCAN - 1)
      for _, m in ipairs(more) do cands[#cands + 1] = m end
    end
    i = i + 1
  end
  if #cands < WAKE_SCAN then return nil end
  return nil, from + WAKE_SCAN - gone
end

-- Looks for a worker for job `id` again on the indexer's next tick, from the `from`th parked.
local function wake_later(p, id, now, from)
  redis.call('ZADD', p .. 'jobs:idx:wakes', now, id)
  if wake_from_n >= 4096 then wake_from, wake_from_n = {}, 0 end
  if wake_from[id] == nil then wake_from_n = wake_from_n + 1 end
  wake_from[id] = from
end

-- The group and service of an indexed, claimable job; nil otherwise.
local function indexed_group(p, id)
  local entry = entry_of(redis.call('HGET', p .. 'jobs:idx:job', id))
  if not entry or #entry <= 40 or string.sub(entry, 1, 1) == 'D' then return nil end
  local gid = string.sub(entry, 1, 40)
  local service = redis.call('HGET', p .. 'jobs:idx:meta:' .. gid, 'service')
  if not service then return nil end
  return gid, service
end

-- Wakes one parked worker that can run job `id` of group `gid` and `service` (read from the
-- index when not given; nil when the job is not indexed and claimable), not `skip`; its name
-- or nil.
local function wake_one(p, id, now, now_s, wake_ms, skip, gid, service)
  if not gid then
    gid, service = indexed_group(p, id)
    if not gid then return nil end
  end
  local woken, from = wake_for(p, id, gid, service, now, now_s, wake_ms, 0, skip)
  if not woken and from then wake_later(p, id, now, from) end
  return woken
end

-- Indexes a submitted job and wakes one parked worker that can run it. Returns index_job's
-- word and the woken worker ('' when none).
local function announce(p, id, wake_ms)
  local now, now_s = now_ms()
  local r, gid, service = index_job(p, id, now)
  if r ~= 'indexed' then return { r, '' } end
  return { r, wake_one(p, id, now, now_s, wake_ms, nil, gid, service) or '' }
end

-- A job back in the queue (a retry, a return, a lease that expired) wakes one parked worker
-- that can run it, as a submission does, when it is claimable now; a retry delay's job is
-- looked for when the delay ends (the indexer's tick releases it). Not the worker that just
-- gave it back: it is busy ending the job, or held off it.
local function wake_requeued(p, id, now, ready_at, worker)
  if ready_at and ready_at > now then
    redis.call('ZADD', p .. 'jobs:idx:wakes', ready_at, id)
    return
  end
  wake_one(p, id, now, ms_text(now), DEFAULT_WAKE_MS, worker)
end

-- Wakes another parked worker for each job whose wake is overdue (or whose retry delay ended,
-- or that the last look did not find a worker for) and that is still pending.
local function rewake_due(p, now, wake_ms)
  local key = p .. 'jobs:idx:wakes'
  local due = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'LIMIT', 0, WAKE_DUE_BATCH)
  if #due == 0 then return 0 end
  redis.call('ZREM', key, unpack(due))
  release_due(p, now)
  local n = 0
  for _, id in ipairs(due) do
    local from = wake_from[id] or 0
    if wake_from[id] then
      wake_from[id] = nil
      wake_from_n = wake_from_n - 1
    end
    local gid, service = indexed_group(p, id)
    if gid and redis.call('ZSCORE', p .. 'jobs:pending', id) then
      -- A job given back by a failing worker is held off it for a while: wake another.
      local held = redis.call('HGET', p .. 'jobs:holdoff', id)
      local skip = held and string.match(held, '^(.*)|%d+$')
      local woken, next_from = wake_for(p, id, gid, service, now, ms_text(now), wake_ms, from, skip)
      if woken then
        n = n + 1
      elseif next_from then
        wake_later(p, id, now, next_from)
      end
    end
  end
  return n
end

-- The fleet's indexer lease (SET NX-like, PX lease_ms, renewed by each tick of its holder)
-- and, for its holder, the overdue wakes. A new holder asks every idle worker of the fleet to
-- claim once (job_requeued without a service), since submissions made while nobody held the
-- lease were announced by nobody (the claims' own repair indexes them). Returns {held 1/0,
-- workers woken again, 1 when the lease was taken now}.
local function fleet_tick(p, holder, lease_ms, wake_ms)
  local lkey = p .. 'jobs:idx:indexer'
  local owner = redis.call('GET', lkey)
  if owner and owner ~= holder then return { 0, 0, 0 } end
  redis.call('SET', lkey, holder, 'PX', lease_ms)
  local now = now_ms()
  if not owner then
    publish(p, 'job_requeued', { job_id = '', reason = 'indexer', timestamp = now, ready_at = now })
  end
  return { 1, rewake_due(p, now, wake_ms), owner and 0 or 1 }
end

-- A worker that stops claiming (held, quarantined, draining, waiting for its services)
-- leaves the park at once, so no wake is spent on it. Returns 1 when it was parked.
local function leave_park(p, worker)
  local raw = redis.call('HGET', p .. 'jobs:idx:parked', worker)
  if not raw then return 0 end
  local w = worker_of(raw)
  if w then
    unpark(p, worker, w.services)
  else
    redis.call('HDEL', p .. 'jobs:idx:parked', worker)
  end
  return 1
end

-- ---------------------------------------------------------------------------------------------
-- Lifecycle
-- ---------------------------------------------------------------------------------------------

-- The claim record of one of our claims from the job hash's `worker_id` and `claim_ms`:
-- {w = worker, t = ms} (the place, s and q, is read by requeue, the only one that needs it). A
-- claim made before the record moved into the job hash has it in jobs:claims (read only then:
-- an original worker's job has neither). nil when there is none.
local function legacy_record(p, id)
  local raw = redis.call('HGET', p .. 'jobs:claims', id)
  if not raw then return nil end
  local rec = cjson.decode(raw)
  rec.t = rec.st or rec.t
  rec.legacy = true
  return rec
end

local function claim_record(p, id, owner, ms)
  if ms then return { w = owner, t = tonumber(ms) } end
  return legacy_record(p, id)
end

-- What fence returns for a claim record in the job hash: the fields are the job hash's own
-- (`worker_id`, `claim_ms`), so no table is built per call (never mutated).
local IN_HASH = {}

-- Ends a claim's lease. A record in jobs:claims (where claims made before the record moved
-- into the job hash keep theirs until they end) goes with it.
local function drop_claim(p, id, claim_rec)
  redis.call('ZREM', (names_memo[p] or names(p))['jobs:leases'], id)
  if not claim_rec or claim_rec.legacy then redis.call('HDEL', p .. 'jobs:claims', id) end
end

local function worker_idle(p, worker, id, now, now_text, at)
  local call = redis.call
  local _, wkey = worker_keys(p, worker)
  local w = call('HMGET', wkey, 'status', 'current_job_id')
  if w[2] ~= id then return end
  call('HSET', wkey, 'status', 'idle', 'current_job_id', '', 'last_status_change', at or iso(now))
  call('PUBLISH', (names_memo[p] or names(p))['worker_status'], '{"worker_id":' .. jname(worker) .. ',"old_status":' .. jname(w[1] or '') ..
    ',"new_status":"idle","current_job_id":"","timestamp":' .. (now_text or jint(now)) .. '}')
end

-- Fencing: 'ok', the claim record and the values of the job hash's fields `wanted` (a list,
-- may be nil) when `worker` still holds the job, else 'cancelled' or 'lost'. A cancelled job's
-- leftovers are cleaned here. One HMGET reads the wanted fields with the ones the fence needs
-- (every field read is a cost on every lifecycle call, so each caller names only its own).
local FENCE_FIELDS = { 'status', 'worker_id', 'claim_ms' }
local NO_FIELDS = {}
local function fence(p, id, worker, now, wanted, jkey)
  wanted = wanted or NO_FIELDS
  local n = #wanted
  jkey = jkey or p .. 'job:' .. id
  local f
  if n == 0 then
    -- The common case read with literal names and answered at once: our claim record in the
    -- job hash, the job this worker's and live (what every completion, start, progress write
    -- and renewal finds).
    f = redis.call('HMGET', jkey, 'status', 'worker_id', 'claim_ms')
    if f[3] and f[2] == worker and LIVE[f[1]] then return 'ok', IN_HASH, f end
  else
    local fields = { unpack(wanted) }
    for i, name in ipairs(FENCE_FIELDS) do fields[n + i] = name end
    f = redis.call('HMGET', jkey, unpack(fields))
  end
  local status, owner = f[n + 1], f[n + 2]
  -- A record in the job hash names the job's own worker_id: IN_HASH stands for it (its time
  -- is f[n + 3]); a legacy one comes from jobs:claims.
  local claim_rec = IN_HASH
  if not f[n + 3] then claim_rec = legacy_record(p, id) end
  if status and owner == worker and (status == 'cancelled' or
    (status == 'failed' and redis.call('HGET', jkey, 'error') == CANCEL_ERROR)) then
    if claim_rec == IN_HASH or (claim_rec and claim_rec.w == worker) then drop_claim(p, id, claim_rec) end
    redis.call('HDEL', p .. 'jobs:active:' .. worker, id)
    -- `now` may be nil: a progress write timed by its worker reads the clock only here.
    worker_idle(p, worker, id, now or now_ms())
    set_terminal_ttl(p, id)
    return 'cancelled'
  end
  if not status or owner ~= worker or not LIVE[status] or not claim_rec or
    (claim_rec ~= IN_HASH and claim_rec.w ~= worker) then
    return 'lost'
  end
  return 'ok', claim_rec, f
end

-- job:<id>:progress follows the job: once it completes, fails, is cancelled or goes back to the
-- queue, the hash says so instead of the last "in_progress" report (`pct` replaces its progress
-- when given; `jkey`, the job's key, when the caller has it). Only an existing hash is
-- rewritten: a job that never reported progress has none.
local function progress_follows(p, id, status, message, now, pct, jkey)
  local pkey = (jkey or p .. 'job:' .. id) .. ':progress'
  -- EXPIRE answers 0 for a missing key: the existence check and the renewal in one command.
  if redis.call('EXPIRE', pkey, PROGRESS_TTL_S) == 0 then return end
  if pct then
    redis.call('HSET', pkey, 'progress', pct, 'status', status, 'message', message, 'updated_at', iso(now))
  else
    redis.call('HSET', pkey, 'status', status, 'message', message, 'updated_at', iso(now))
  end
end

-- Puts a claimed job back in line at its old place (its old score and sequence); with
-- `ready_at` it is claimable again only from then on.
local function requeue(p, id, worker, claim_rec, fields, reason, now, ready_at)
  local jkey = p .. 'job:' .. id
  local score, seq = claim_rec.s, claim_rec.q
  if not claim_rec.legacy then
    local place = redis.call('HMGET', jkey, 'claim_score', 'claim_order')
    score, seq = place[1], place[2] and prefix_seq(place[2])
    redis.call('HDEL', jkey, unpack(CLAIM_FIELDS))
  end
  progress_follows(p, id, 'pending', 'returned to the queue: ' .. reason, now)
  redis.call('HSET', jkey, 'status', 'pending', 'worker_id', '', unpack(fields))
  -- Pending again: no worker has it, so no time it was assigned or started is true any more.
  redis.call('HDEL', jkey, 'assigned_at', 'started_at')
  redis.call('ZADD', p .. 'jobs:pending', score, id)
  drop_claim(p, id, claim_rec)
  redis.call('HDEL', p .. 'jobs:active:' .. worker, id)
  worker_idle(p, worker, id, now)
  index_job(p, id, now, tonumber(seq), ready_at)
  wake_requeued(p, id, now, ready_at, worker)
end

-- The oldest record time of each `<hash>:at` this Lua state knows of, or less: records are only
-- added at the present and only this library removes them, so until that time is RECORD_TTL_MS
-- old there is nothing to trim, and a completion spends no command on looking (nil: not known,
-- a fresh Lua state). A clock that went back only delays a trim until the next one.
local record_oldest, record_oldest_n = {}, 0

-- Drops records older than RECORD_TTL_MS, at most RECORD_TRIM per call (one call per record
-- written, so they cannot pile up).
local RECORD_AT = { ['jobs:completed'] = 'jobs:completed:at', ['jobs:failed'] = 'jobs:failed:at' }
local function trim_records(p, hash, now)
  local at = (names_memo[p] or names(p))[RECORD_AT[hash]]
  local oldest = record_oldest[at]
  if oldest and oldest > now - RECORD_TTL_MS then return end
  local old = redis.call('ZRANGEBYSCORE', at, '-inf', now - RECORD_TTL_MS, 'LIMIT', 0, RECORD_TRIM)
  if #old > 0 then
    redis.call('HDEL', p .. hash, unpack(old))
    redis.call('ZREM', at, unpack(old))
  end
  if #old == RECORD_TRIM then
    oldest = nil -- more may be due: the next call looks again
  else
    oldest = tonumber(redis.call('ZRANGE', at, 0, 0, 'WITHSCORES')[2]) or now
  end
  -- Scratch prefixes (self-checks) add keys; the memo is only ever a hint, so drop it whole.
  if oldest ~= nil and record_oldest[at] == nil then
    if record_oldest_n >= 64 then record_oldest, record_oldest_n = {}, 0 end
    record_oldest_n = record_oldest_n + 1
  end
  record_oldest[at] = oldest
end

-- Ends a job as failed (`status` 'failed'), or as 'unworkable' when its claiming worker found it
-- can run nowhere (a payload that is not JSON, a timeout_seconds that is no positive number).
local function final_fail(p, id, worker, claim_rec, err, retry_count, now, status)
  status = status or 'failed'
  local at = iso(now)
  local jkey = p .. 'job:' .. id
  redis.call('HSET', jkey, 'status', status, 'error', err, 'failed_at', at, 'retry_count', retry_count)
  redis.call('HDEL', p .. 'jobs:active:' .. worker, id)
  drop_claim(p, id, claim_rec)
  redis.call('HSET', p .. 'jobs:failed', id, cjson.encode({ error = err, failed_at = at, retry_count = retry_count }))
  redis.call('ZADD', p .. 'jobs:failed:at', now, id)
  trim_records(p, 'jobs:failed', now)
  publish(p, 'job_failed', { job_id = id, worker_id = worker, status = status, error = err, failed_at = at,
    retry_count = retry_count, can_retry = false, timestamp = now })
  worker_idle(p, worker, id, now)
  set_terminal_ttl(p, id)
  progress_follows(p, id, status, err, now)
end

local function start_job(p, id, worker)
  local now, now_text, secs, ms3 = now_ms()
  local jkey = p .. 'job:' .. id
  local r, claim_rec = fence(p, id, worker, now, nil, jkey)
  if r ~= 'ok' then return r end
  if claim_rec.legacy then
    redis.call('HSET', jkey, 'status', 'in_progress', 'started_at', iso_at(secs, ms3))
    claim_rec.legacy, claim_rec.st = nil, now
    redis.call('HSET', p .. 'jobs:claims', id, cjson.encode(claim_rec))
  else
    -- processing_time counts from the start from now on.
    redis.call('HSET', jkey, 'status', 'in_progress', 'started_at', iso_at(secs, ms3), 'claim_ms', now_text)
  end
  return 'ok'
end

-- The fenced part of every progress write: job:<id>:progress says `pct`, `message` and now, or
-- `at` (ISO text) when the worker timed its report. Returns the fence's word, and the server's
-- time (number, text) when it is 'ok' and it was read.
local function progress_hash(p, id, worker, pct, message, at)
  local now, now_text, secs, ms3
  if not at then now, now_text, secs, ms3 = now_ms() end
  local jkey = p .. 'job:' .. id
  local r = fence(p, id, worker, now, nil, jkey)
  if r ~= 'ok' then return r end
  local pkey = jkey .. ':progress'
  -- The hash expires a day after the job's first report (completion, failure and return renew
  -- it): renewing it on every report cost an EXPIRE per write for nothing.
  if redis.call('HSET', pkey, 'progress', pct, 'status', 'in_progress', 'message', message, 'updated_at',
    at or iso_at(secs, ms3)) > 0 then
    redis.call('EXPIRE', pkey, PROGRESS_TTL_S)
  end
  return r, now, now_text
end

-- The progress:<id> stream is appended only when the caller asks (`stream`): nothing in the API,
-- the monitor or the workers reads it, and it was a third of a progress write's cost.
local function progress(p, id, worker, pct, message, current_step, total_steps, stream)
  local r, now, now_text = progress_hash(p, id, worker, pct, message)
  if r ~= 'ok' then return r end
  if stream then
    local skey = p .. 'progress:' .. id
    redis.call('XADD', skey, 'MAXLEN', '~', PROGRESS_MAXLEN, '*', 'job_id', id, 'worker_id', worker, 'progress', pct,
      'status', 'in_progress', 'message', message, 'current_step', current_step, 'total_steps', total_steps,
      'timestamp', now_text)
    redis.call('EXPIRE', skey, PROGRESS_TTL_S)
  end
  -- Written as text, like the claim's and the completion's messages (an encoded table cost a
  -- fifth of the call); `progress` is a whole number, as the broker sends it (anything else is
  -- written as one: a pattern test cost about 5 k instructions, the lookup 0.2 k).
  if not PCT[pct] then pct = jint(math.floor(tonumber(pct) or 0)) end
  -- The worker and the step numbers recur on every report: memoised names (jname), and the
  -- time as TIME's own digits.
  redis.call('PUBLISH', p .. 'update_job_progress', '{"job_id":' .. jstr(id) .. ',"worker_id":' .. jname(worker) ..
    ',"progress":' .. pct .. ',"status":"in_progress","message":' .. jstr(message) .. ',"current_step":' ..
    jname(current_step) .. ',"total_steps":' .. jname(total_steps) .. ',"timestamp":' .. now_text .. '}')
  return 'ok'
end

-- updateJobProgressAt: the same write encoded and timed by the worker (its processes have the
-- CPU the one Redis thread lacks; the original workers time their progress too): `at` is the
-- report's ISO time for updated_at and `doc` the whole update_job_progress, cjson's escaping,
-- with the same time in milliseconds. No TIME: the clock was about 11 k of a 73 k write, ten a job.
local function progress_at(p, id, worker, pct, message, doc, at)
  local r = progress_hash(p, id, worker, pct, message, at)
  if r ~= 'ok' then return r end
  redis.call('PUBLISH', (names_memo[p] or names(p))['update_job_progress'], doc)
  return 'ok'
end

local COMPLETE_FIELDS = { 'workflow_id', 'current_step', 'total_steps' }

-- Completes a job that passed the fence: `result` is JSON text, `head` and `tail` the parts of
-- complete_job around the result and the timestamp (only the server knows the time).
local function completed(p, id, worker, jkey, now, now_text, at, claim_rec, started, result, message, head, tail)
  local call = redis.call
  if claim_rec == IN_HASH then started = tonumber(started) else started = claim_rec.t end
  call('HSET', jkey, 'status', 'completed', 'completed_at', at, 'processing_time', int_text(now - (started or now)))
  call('HDEL', (worker_keys(p, worker)), id)
  drop_claim(p, id, claim_rec)
  local N = names_memo[p] or names(p)
  call('HSET', N['jobs:completed'], id, '{"success":true,"data":' .. result .. ',"completed_at":"' .. at .. '"}')
  call('ZADD', N['jobs:completed:at'], now_text, id)
  trim_records(p, 'jobs:completed', now)
  call('PUBLISH', N['complete_job'], head .. result .. ',"timestamp":' .. now_text .. tail)
  progress_follows(p, id, 'completed', message, now, '100', jkey)
  worker_idle(p, worker, id, now, now_text, at)
  call('EXPIRE', jkey, TERMINAL_TTL_S)
  return 'ok'
end

-- The fence of a completion; a completion repeated because its reply was lost (a Redis
-- restart) finds its own work done.
local function complete_fence(p, id, worker, now, wanted, jkey)
  local r, claim_rec, st = fence(p, id, worker, now, wanted, jkey)
  if r == 'lost' then
    local done = redis.call('HMGET', jkey, 'status', 'worker_id')
    if done[1] == 'completed' and done[2] == worker then return 'already_completed' end
  end
  return r, claim_rec, st
end

-- `wf`, `cur`, `total`: the job's workflow_id, current_step and total_steps for complete_job as
-- the worker read them at claim (the API writes them at submission only), or nil to read them
-- here.
local function complete(p, id, worker, result_raw, message, wf, cur, total)
  local now, now_text, secs, ms3 = now_ms()
  local jkey = p .. 'job:' .. id
  local r, claim_rec, st = complete_fence(p, id, worker, now, wf == nil and COMPLETE_FIELDS or nil, jkey)
  if r ~= 'ok' then return r end
  local started
  if wf == nil then
    wf, cur, total = st[1], st[2], st[3]
    started = st[6]
  else
    started = st[3]
  end
  -- The result goes into the record and the message as the worker wrote it once it is JSON
  -- (decoding only checks that), else as a string.
  local result = result_raw
  if not pcall(cjson.decode, result_raw) then result = jstr(result_raw) end
  return completed(p, id, worker, jkey, now, now_text, iso_at(secs, ms3), claim_rec, started, result, message,
    '{"job_id":' .. jstr(id) .. ',"worker_id":' .. jname(worker) .. ',"progress":100,"status":"completed","message":' ..
    jname(message) .. ',"result":',
    ',"workflow_id":' .. jname(wf or '') .. ',"current_step":' .. jname(cur or '') .. ',"total_steps":' ..
    jname(total or '') .. '}')
end

-- completeJobText: the same completion with what only the worker knows encoded by the worker
-- (its many processes have the CPU the one Redis thread lacks): `result` is JSON text, `head`
-- complete_job up to `"result":` and `tail` from `,"workflow_id":` on, with cjson's escaping,
-- the message 'completed'. The server splices in the result and its own time.
local function complete_text(p, id, worker, result, head, tail)
  local now, now_text, secs, ms3 = now_ms()
  local jkey = p .. 'job:' .. id
  local r, claim_rec, st = complete_fence(p, id, worker, now, nil, jkey)
  if r ~= 'ok' then return r end
  return completed(p, id, worker, jkey, now, now_text, iso_at(secs, ms3), claim_rec, st[3], result, 'completed', head,
    tail)
end

-- A retryable failure waits out `delay_ms` (nobody claims it meanwhile), then keeps its place
-- in line; the failing worker is held off it for `holdoff_ms` more, so that another capable
-- worker takes it when one exists.
-- A job's max_retries, at most `cap` (the machines' worker.max_retries_cap; 0: none): a job
-- asking for a billion retries would circle the fleet for years. A capped job records the cap
-- it got (max_retries_cap) for `machine jobs show`.
local function max_retries_of(p, id, raw, cap)
  local n = tonumber(raw) or 3
  if cap and cap > 0 and n > cap then
    redis.call('HSET', p .. 'job:' .. id, 'max_retries_cap', tostring(cap))
    return cap
  end
  return n
end

local RETRY_FIELDS = { 'retry_count', 'max_retries' }

-- `retryable`: '1' retries while retries are left, 'u' ends the job as unworkable (not an
-- attempt: its retry_count stays), anything else fails it.
local function fail(p, id, worker, err, retryable, holdoff_ms, delay_ms, cap)
  local now = now_ms()
  local r, claim_rec, st = fence(p, id, worker, now, RETRY_FIELDS)
  if r ~= 'ok' then return r end
  if retryable == 'u' then
    final_fail(p, id, worker, claim_rec, err, tonumber(st[1]) or 0, now, 'unworkable')
    return 'failed'
  end
  retryable = retryable == '1'
  local retry_count = (tonumber(st[1]) or 0) + 1
  local max_retries = max_retries_of(p, id, st[2], cap)
  if retryable and retry_count < max_retries then
    local at = iso(now)
    local ready_at = now + delay_ms
    requeue(p, id, worker, claim_rec, { 'retry_count', tostring(retry_count), 'last_failed_worker', worker,
      'failed_at', at, 'error', err }, 'retry', now, ready_at)
    if holdoff_ms > 0 then
      redis.call('HSET', p .. 'jobs:holdoff', id, worker .. '|' .. tostring(ready_at + holdoff_ms))
    end
    return 'retried'
  end
  final_fail(p, id, worker, claim_rec, err, retry_count, now)
  return 'failed'
end

local function return_job(p, id, worker, reason)
  local now = now_ms()
  local r, claim_rec = fence(p, id, worker, now)
  if r ~= 'ok' then return r end
  requeue(p, id, worker, claim_rec, {}, reason, now)
  return 'ok'
end

-- A job given back for a fault that is not its own. `fault` 'machine' (the machine's
-- misconfiguration, an outage of its store, its GPU): the job keeps its retries and place and
-- is claimable at once, and the return is counted with its reason in the job hash
-- (`machine_returns`, `machine_return_reasons`); past MAX_MACHINE_RETURNS it fails with the
-- reasons, so no job circles the fleet forever. `fault` 'service' (its service crashed or
-- stalled): the first time on any machine it is such a return; the next time the job is
-- suspected of killing its service and it fails as its own fault (a retry spent, with
-- `delay_ms` and `holdoff_ms` as failJob). Returns 'ok' (returned), 'retried', 'failed' or the
-- fence's word.
local MAX_MACHINE_RETURNS = 5
local REASON_MAX = 300 -- characters of one reason kept

local function return_for_fault(p, id, worker, fault, detail, holdoff_ms, delay_ms, cap)
  local now = now_ms()
  local r, claim_rec, st = fence(p, id, worker, now, RETRY_FIELDS)
  if r ~= 'ok' then return r end
  local jkey = p .. 'job:' .. id
  local f = redis.call('HMGET', jkey, 'machine_returns', 'machine_return_reasons', 'service_faults')
  if fault == 'service' then
    local faults = (tonumber(f[3]) or 0) + 1
    redis.call('HSET', jkey, 'service_faults', tostring(faults))
    if faults > 1 then return fail(p, id, worker, detail, '1', holdoff_ms, delay_ms, cap) end
  end
  local returns = (tonumber(f[1]) or 0) + 1
  local ok, reasons = pcall(cjson.decode, f[2] or '[]')
  if not ok or kind(reasons) ~= 'list' then reasons = {} end
  reasons[#reasons + 1] = string.sub(fault .. ' fault: ' .. detail, 1, REASON_MAX)
  while #reasons > MAX_MACHINE_RETURNS + 1 do table.remove(reasons, 1) end
  local fields = { 'machine_returns', tostring(returns), 'machine_return_reasons', cjson.encode(reasons) }
  if returns > MAX_MACHINE_RETURNS then
    redis.call('HSET', jkey, unpack(fields))
    final_fail(p, id, worker, claim_rec, 'returned ' .. returns .. ' times for faults of the machines that ran it: ' ..
      table.concat(reasons, '; '), tonumber(st[1]) or 0, now)
    return 'failed'
  end
  requeue(p, id, worker, claim_rec, fields, fault .. '_fault', now)
  return 'ok'
end

local function renew(p, id, worker, lease_ms)
  local now = now_ms()
  local r = fence(p, id, worker, now)
  if r ~= 'ok' then return r end
  redis.call('ZADD', p .. 'jobs:leases', now + lease_ms, id)
  return 'held'
end

-- Returns jobs whose lease expired: {requeued, failed, cleaned}.
local function reap(p, limit, sweep_budget, cap)
  local now = now_ms()
  local requeued, failed, cleaned = 0, 0, 0
  local ids = redis.call('ZRANGEBYSCORE', p .. 'jobs:leases', '-inf', now, 'LIMIT', 0, limit)
  for _, id in ipairs(ids) do
    local st = redis.call('HMGET', p .. 'job:' .. id, 'status', 'worker_id', 'retry_count', 'max_retries',
      'claim_ms')
    local claim_rec = claim_record(p, id, st[2], st[5])
    if not claim_rec or not st[1] or not LIVE[st[1]] or st[2] ~= claim_rec.w then
      drop_claim(p, id)
      cleaned = cleaned + 1
    else
      local worker = claim_rec.w
      local retry_count = (tonumber(st[3]) or 0) + 1
      local max_retries = max_retries_of(p, id, st[4], cap)
      dbg('lease of ' .. id .. ' held by ' .. worker .. ' expired')
      if retry_count < max_retries then
        requeue(p, id, worker, claim_rec, { 'retry_count', tostring(retry_count), 'last_failed_worker', worker,
          'failed_at', iso(now), 'error', 'lease expired' }, 'lease_expired', now)
        requeued = requeued + 1
      else
        final_fail(p, id, worker, claim_rec, 'lease expired (worker ' .. worker .. ' stopped renewing) after ' ..
          tostring(retry_count) .. ' attempts', retry_count, now)
        failed = failed + 1
      end
    end
  end
  -- Hold-offs that expired no longer matter; drop a bounded number of them.
  local h = redis.call('HSCAN', p .. 'jobs:holdoff', 0, 'COUNT', 100)
  local flat = h[2]
  for i = 1, #flat, 2 do
    local untl = tonumber(string.match(flat[i + 1], '|(%d+)$')) or 0
    if untl <= now then redis.call('HDEL', p .. 'jobs:holdoff', flat[i]) end
  end
  if sweep_budget > 0 then sweep(p, sweep_budget, now) end
  return { requeued, failed, cleaned }
end

local function cancel(p, id, reason)
  local now = now_ms()
  local jkey = p .. 'job:' .. id
  local st = redis.call('HMGET', jkey, 'status', 'worker_id')
  if not st[1] then return 'not_found' end
  if st[1] == 'completed' or st[1] == 'failed' or st[1] == 'cancelled' or st[1] == 'unworkable' then
    return 'already_' .. st[1]
  end
  local at = iso(now)
  redis.call('HSET', jkey, 'status', 'failed', 'error', CANCEL_ERROR, 'failed_at', at, 'cancelled_at', at)
  local worker = st[2] or ''
  if worker ~= '' then redis.call('HDEL', p .. 'jobs:active:' .. worker, id) end
  redis.call('ZREM', p .. 'jobs:pending', id)
  unindex(p, id)
  publish(p, 'cancel_job', { job_id = id, worker_id = worker, reason = reason, timestamp = now })
  progress_follows(p, id, 'cancelled', CANCEL_ERROR, now)
  return 'cancelled'
end

-- ---------------------------------------------------------------------------------------------
-- Registration
-- ---------------------------------------------------------------------------------------------

local function num_arg(v, default)
  local n = tonumber(v)
  if n == nil or n < 0 then return default end
  return math.floor(n)
end

redis.register_function('findMatchingJob', function(_, args)
  local w = worker_of(args[1] or '')
  if not w then return redis.error_reply('ERR invalid capabilities JSON') end
  local worker = w.caps.worker_id
  if type(worker) ~= 'string' or worker == '' then
    return redis.error_reply('ERR capabilities need a worker_id')
  end
  local max_examine = num_arg(args[2], 100)
  if max_examine < 1 then max_examine = 1 end
  -- Two arguments: an original worker (no lease, see claim).
  local lease_ms = nil
  if args[3] ~= nil then
    lease_ms = num_arg(args[3], DEFAULT_LEASE_MS)
    if lease_ms == 0 then lease_ms = DEFAULT_LEASE_MS end
  end
  return claim(args[4] or '', w, worker, max_examine, lease_ms)
end)

redis.register_function{ function_name = 'jobMatchingVersion', flags = { 'no-writes' },
  callback = function() return VERSION end }

redis.register_function('indexJob', function(_, args)
  return index_job(args[1], args[2], (now_ms()))
end)

redis.register_function('startJob', function(_, args)
  return start_job(args[1], args[2], args[3])
end)

redis.register_function('updateJobProgress', function(_, args)
  return progress(args[1], args[2], args[3], args[4], args[5] or '', args[6] or '', args[7] or '', args[8] == '1')
end)

redis.register_function('updateJobProgressAt', function(_, args)
  if not args[7] then return redis.error_reply('ERR updateJobProgressAt needs the message and its time') end
  return progress_at(args[1], args[2], args[3], args[4], args[5] or '', args[6], args[7])
end)

redis.register_function('completeJob', function(_, args)
  local wf, cur, total = nil, nil, nil
  if args[8] then wf, cur, total = args[6], args[7], args[8] end
  return complete(args[1], args[2], args[3], args[4] or 'null', args[5] or '', wf, cur, total)
end)

redis.register_function('completeJobText', function(_, args)
  return complete_text(args[1], args[2], args[3], args[4], args[5], args[6])
end)

redis.register_function('failJob', function(_, args)
  return fail(args[1], args[2], args[3], args[4] or '', args[5], num_arg(args[6], DEFAULT_HOLDOFF_MS),
    num_arg(args[7], 0), num_arg(args[8], 0))
end)

redis.register_function('returnJob', function(_, args)
  return return_job(args[1], args[2], args[3], args[4] or 'returned')
end)

redis.register_function('returnForFault', function(_, args)
  local kind = args[4]
  if kind ~= 'machine' and kind ~= 'service' then
    return redis.error_reply('ERR returnForFault needs the fault kind machine or service')
  end
  return return_for_fault(args[1], args[2], args[3], kind, args[5] or '', num_arg(args[6], DEFAULT_HOLDOFF_MS),
    num_arg(args[7], 0), num_arg(args[8], 0))
end)

redis.register_function('renewLease', function(_, args)
  local lease_ms = num_arg(args[4], DEFAULT_LEASE_MS)
  if lease_ms == 0 then lease_ms = DEFAULT_LEASE_MS end
  return renew(args[1], args[2], args[3], lease_ms)
end)

redis.register_function('reapExpiredLeases', function(_, args)
  return reap(args[1], num_arg(args[2], 100), num_arg(args[3], 0), num_arg(args[4], 0))
end)

redis.register_function('sweepIndex', function(_, args)
  local p = args[1]
  sweep(p, math.max(num_arg(args[2], 1000), 1), (now_ms()))
  return { redis.call('ZCARD', p .. 'jobs:pending'), redis.call('HLEN', p .. 'jobs:idx:job'),
    tonumber(redis.call('GET', p .. 'jobs:idx:cursor:pending')) or 0 }
end)

-- With an indexer lease and wake deadline after the budget, the step also tries the fleet's
-- indexer lease (fleetTick) in the same call, and its three answers follow the sweep's: the
-- machines that do not index try it this way, one periodic call each instead of two.
redis.register_function('sweepPending', function(_, args)
  local p, holder = args[1], args[2]
  if not holder or holder == '' then return redis.error_reply('ERR sweepPending needs a holder') end
  local now = now_ms()
  local r = fleet_sweep(p, holder, math.max(num_arg(args[3], 10000), 1), math.max(num_arg(args[4], 1000), 1), now)
  -- The holder also removes the parks that ran out (a bounded look per step, see sweep_park).
  if r[1] == 1 then sweep_park(p, now) end
  if args[5] then
    local t = fleet_tick(p, holder, math.max(num_arg(args[5], 3000), 1), math.max(num_arg(args[6], DEFAULT_WAKE_MS), 1))
    r[4], r[5], r[6] = t[1], t[2], t[3]
  end
  return r
end)

redis.register_function('cancelJob', function(_, args)
  return cancel(args[1], args[2], args[3] or CANCEL_ERROR)
end)

-- findMatchingJob's four arguments and how long the worker counts as waiting when it finds
-- nothing (see Wake-ups).
redis.register_function('claimOrPark', function(_, args)
  local raw = args[1] or ''
  local w = worker_of(raw)
  if not w then return redis.error_reply('ERR invalid capabilities JSON') end
  local worker = w.caps.worker_id
  if type(worker) ~= 'string' or worker == '' then
    return redis.error_reply('ERR capabilities need a worker_id')
  end
  local lease_ms = num_arg(args[3], DEFAULT_LEASE_MS)
  if lease_ms == 0 then lease_ms = DEFAULT_LEASE_MS end
  local p = args[4] or ''
  -- One TIME for the claim and the park (a TIME with its Lua costs about 11 k instructions).
  local now, now_text, now_secs, now_ms3 = now_ms()
  local r = claim(p, w, worker, math.max(num_arg(args[2], 100), 1), lease_ms, now, now_text, now_secs, now_ms3)
  if r then
    unpark(p, worker, w.services)
  else
    -- As text: a number passed to Redis is formatted with %.17g on every call.
    park(p, raw, w, worker, ms_text(now + math.max(num_arg(args[5], 15000), 1)))
  end
  return r
end)

redis.register_function('announceJob', function(_, args)
  return announce(args[1], args[2], math.max(num_arg(args[3], DEFAULT_WAKE_MS), 1))
end)

redis.register_function('fleetTick', function(_, args)
  local holder = args[2]
  if not holder or holder == '' then return redis.error_reply('ERR fleetTick needs a holder') end
  return fleet_tick(args[1], holder, math.max(num_arg(args[3], 3000), 1),
    math.max(num_arg(args[4], DEFAULT_WAKE_MS), 1))
end)

redis.register_function('leavePark', function(_, args)
  local worker = args[2]
  if not worker or worker == '' then return redis.error_reply('ERR leavePark needs a worker') end
  return leave_park(args[1], worker)
end)

-- ---------------------------------------------------------------------------------------------
-- External API limits (connectors/limits.rs): fleet-wide rate limits and daily quotas
-- ---------------------------------------------------------------------------------------------
-- Every machine's external-connector workers call acquireLimit before each request to a paid
-- API, so the rate and the quotas hold for the fleet, not per machine. Keys, under the prefix:
--   limits:<api>:gcra, limits:<api>:gcra:c:<customer>   STRING: the GCRA theoretical arrival
--     time (epoch ms, Redis clock), expiring once it no longer matters;
--   limits:<api>:usage:<period>                          HASH: requests, tokens,
--     c:<customer>:requests, c:<customer>:tokens of one quota day (<period> is the day's
--     local date; the key expires a day after the period ends).
-- The caller computes the period and its end from the configured reset hour and zone (Lua in
-- Redis has no time zones); the rate uses Redis' own clock, shared by every machine.

-- GCRA: (wait_ms, nil) when the request must wait, else (0, new_tat) to store on admission.
local function limit_gcra(key, now, interval, tolerance)
  if interval <= 0 then return 0, nil end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local allow_at = tat - tolerance
  if now < allow_at then return math.ceil(allow_at - now), nil end
  return 0, tat + interval
end

local function limit_store(key, tat, now, interval)
  if tat then
    redis.call('SET', key, string.format('%.3f', tat), 'PX', math.max(1, math.ceil(tat - now + interval)))
  end
end

-- One request: {'ok', 0, '', ''}, {'wait', ms, '', ''} or {'quota', ms_until_reset, scope,
-- reason} with scope 'api' or 'customer'. A refused request consumes nothing.
local function acquire_limit(p, api, customer, period, period_end, g, c)
  local now = now_ms()
  local ukey = p .. 'limits:' .. api .. ':usage:' .. period
  local cfield = 'c:' .. customer .. ':'
  local u = redis.call('HMGET', ukey, 'requests', 'tokens', cfield .. 'requests', cfield .. 'tokens')
  local until_reset = math.max(0, period_end - now)
  local checks = { { g, tonumber(u[1]) or 0, tonumber(u[2]) or 0, 'api', 'the ' .. api .. ' API' } }
  if customer ~= '' then
    checks[2] = { c, tonumber(u[3]) or 0, tonumber(u[4]) or 0, 'customer', 'customer ' .. customer .. ' on the ' ..
      api .. ' API' }
  end
  for _, k in ipairs(checks) do
    local lim, reqs, toks, scope, who = k[1], k[2], k[3], k[4], k[5]
    if lim.daily_requests > 0 and reqs >= lim.daily_requests then
      return { 'quota', until_reset, scope, 'daily quota of ' .. lim.daily_requests .. ' requests for ' .. who ..
        ' reached (' .. reqs .. ' used); it resets at the start of the next quota day' }
    end
    if lim.daily_tokens > 0 and toks >= lim.daily_tokens then
      return { 'quota', until_reset, scope, 'daily quota of ' .. lim.daily_tokens .. ' tokens for ' .. who ..
        ' reached (' .. toks .. ' used); it resets at the start of the next quota day' }
    end
  end
  local gkey = p .. 'limits:' .. api .. ':gcra'
  local ckey = p .. 'limits:' .. api .. ':gcra:c:' .. customer
  local gwait, gtat = limit_gcra(gkey, now, g.interval, g.tolerance)
  local cwait, ctat = 0, nil
  if customer ~= '' then cwait, ctat = limit_gcra(ckey, now, c.interval, c.tolerance) end
  local wait = math.max(gwait, cwait)
  if wait > 0 then return { 'wait', wait, '', '' } end
  limit_store(gkey, gtat, now, g.interval)
  if customer ~= '' then limit_store(ckey, ctat, now, c.interval) end
  redis.call('HINCRBY', ukey, 'requests', 1)
  if customer ~= '' then redis.call('HINCRBY', ukey, cfield .. 'requests', 1) end
  redis.call('PEXPIREAT', ukey, period_end + 86400000)
  return { 'ok', 0, '', '' }
end

local function limit_budget(args, i)
  return { interval = tonumber(args[i]) or 0, tolerance = tonumber(args[i + 1]) or 0,
    daily_requests = tonumber(args[i + 2]) or 0, daily_tokens = tonumber(args[i + 3]) or 0 }
end

-- acquireLimit <prefix> <api> <customer> <period> <period end ms>
--   <api: interval ms> <api: tolerance ms> <api: daily requests> <api: daily tokens>
--   <customer: the same four>                                  (0 = no limit)
redis.register_function('acquireLimit', function(_, args)
  local period_end = tonumber(args[5])
  if not args[2] or args[2] == '' or not args[4] or not period_end then
    return redis.error_reply('ERR acquireLimit needs prefix, api, customer, period and period end')
  end
  return acquire_limit(args[1], args[2], args[3] or '', args[4], period_end, limit_budget(args, 6),
    limit_budget(args, 10))
end)

-- recordLimitUsage <prefix> <api> <customer> <period> <period end ms> <tokens>: adds the tokens a
-- finished request used to the day's usage (they count against daily_tokens from then on).
redis.register_function('recordLimitUsage', function(_, args)
  local period_end, tokens = tonumber(args[5]), tonumber(args[6])
  if not args[2] or args[2] == '' or not args[4] or not period_end or not tokens then
    return redis.error_reply('ERR recordLimitUsage needs prefix, api, customer, period, period end and tokens')
  end
  local ukey = args[1] .. 'limits:' .. args[2] .. ':usage:' .. args[4]
  tokens = math.max(0, math.floor(tokens))
  redis.call('HINCRBY', ukey, 'tokens', tokens)
  local customer = args[3] or ''
  if customer ~= '' then redis.call('HINCRBY', ukey, 'c:' .. customer .. ':tokens', tokens) end
  redis.call('PEXPIREAT', ukey, period_end + 86400000)
  return tokens
end)

-- recordJobUsage <prefix> <job id> <requests> <input tokens> <output tokens> <predict seconds>
-- <cost> <currency>: adds what one attempt of the job used at a paid API to the job's totals
-- (usage_requests, usage_input_tokens, usage_output_tokens, usage_predict_seconds, usage_cost,
-- usage_currency), whatever the attempt's outcome: providers bill failed and cancelled work. Not
-- fenced (the usage happened either way); a job that no longer exists is left alone (0).
redis.register_function('recordJobUsage', function(_, args)
  local key = args[1] .. 'job:' .. args[2]
  if redis.call('EXISTS', key) == 0 then return 0 end
  redis.call('HINCRBY', key, 'usage_requests', math.floor(tonumber(args[3]) or 0))
  redis.call('HINCRBY', key, 'usage_input_tokens', math.floor(tonumber(args[4]) or 0))
  redis.call('HINCRBY', key, 'usage_output_tokens', math.floor(tonumber(args[5]) or 0))
  redis.call('HINCRBYFLOAT', key, 'usage_predict_seconds', tonumber(args[6]) or 0)
  redis.call('HINCRBYFLOAT', key, 'usage_cost', tonumber(args[7]) or 0)
  if args[8] and args[8] ~= '' then redis.call('HSET', key, 'usage_currency', args[8]) end
  return 1
end)

-- deferJob <prefix> <job id> <worker id> <reason> <until ms>: returns a claimed job to the queue
-- in its place (like returnJob) because a daily quota stops it, and records why and until when
-- in the job (`limit_reason`, `limit_until`) for `machine jobs show`. The fields are dropped
-- when a worker is next admitted for the job (clearLimitReason).
redis.register_function('deferJob', function(_, args)
  local r = return_job(args[1], args[2], args[3], 'quota')
  if r ~= 'ok' then return r end
  local untl = tonumber(args[5]) or now_ms()
  redis.call('HSET', args[1] .. 'job:' .. args[2], 'limit_reason', args[4] or '', 'limit_until', iso(untl))
  return 'ok'
end)

-- clearLimitReason <prefix> <job id>: the job got past the limits; forget why it waited.
redis.register_function('clearLimitReason', function(_, args)
  return redis.call('HDEL', args[1] .. 'job:' .. args[2], 'limit_reason', 'limit_until')
end)
