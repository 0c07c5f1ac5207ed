-- wrk script for bench_strangers: POST /v1/events with made-up (checksum-valid, unknown) keys,
-- a different one each request, read from KEYS_FILE. SPREAD=1 also sends X-Forwarded-For with a
-- different address per request (ingest trusts it from 127.0.0.1), as a flood from many hosts
-- would look. Keys are taken from line KEYS_OFFSET on; DELAY_MS paces each connection. Prints one RESULT line of JSON at the end.

local keys_file = os.getenv("KEYS_FILE")
local spread = os.getenv("SPREAD") == "1"
local delay_ms = tonumber(os.getenv("DELAY_MS") or "0")
local offset = tonumber(os.getenv("KEYS_OFFSET") or "0")
local body = '{"id":"x","metric":"api_calls"}'
local threads = {}
local keys = {}
local counter = 0
statuses = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  for line in io.lines(keys_file) do
    keys[#keys + 1] = line
  end
  counter = offset + (tid - 1) * 7919
end

function request()
  counter = counter + 1
  local key = keys[counter % #keys + 1]
  local headers = {["Authorization"] = "Bearer " .. key, ["Content-Type"] = "application/json"}
  if spread then
    headers["X-Forwarded-For"] = string.format("10.%d.%d.%d",
      math.floor(counter / 65536) % 256, math.floor(counter / 256) % 256, counter % 256)
  end
  return wrk.format("POST", "/v1/events", headers, body)
end

function delay()
  return delay_ms
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local seen = thread:get("statuses")
    for status, n in pairs(seen) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"timeouts":%d,"p99_us":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.timeout,
    latency:percentile(99), table.concat(parts, ",")))
end
