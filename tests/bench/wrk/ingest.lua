-- wrk script for bench_ingest: POST /v1/events with BATCH fresh events per request, rotating
-- through the keys in KEYS_FILE (one per line). Event ids are RUN-thread-request-index, so every
-- request of every run is new. Prints one RESULT line of JSON at the end.

local batch = tonumber(os.getenv("BATCH") or "100")
local run = os.getenv("RUN_ID") or "run"
local keys_file = os.getenv("KEYS_FILE")
local threads = {}
local keys = {}
local counter = 0

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  for line in io.lines(keys_file) do
    keys[#keys + 1] = line
  end
end

function request()
  counter = counter + 1
  local key = keys[(counter * 7 + tid * 131) % #keys + 1]
  local parts = {}
  for i = 1, batch do
    parts[i] = string.format(
      '{"id":"%s-%d-%d-%d","metric":"api_calls","quantity":1,"properties":{"region":"eu"}}',
      run, tid, counter, i)
  end
  local body
  if batch == 1 then
    body = parts[1]
  else
    body = '{"events":[' .. table.concat(parts, ",") .. ']}'
  end
  return wrk.format("POST", "/v1/events",
    {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"max_us":%d,"mean_us":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
