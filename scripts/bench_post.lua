-- wrk script for scripts/bench.sh: POSTs a body of BENCH_BODY_BYTES bytes on
-- every request and, when the run ends, prints one line
--   BENCHJSON {"requests":...,"rps":...,"p50_us":...,...}
-- that bench.sh picks out of wrk's output. Latencies are in microseconds.

local size = tonumber(os.getenv("BENCH_BODY_BYTES") or "64")

wrk.method = "POST"
wrk.body = string.rep("x", size)
wrk.headers["Content-Type"] = "application/octet-stream"

function done(summary, latency, requests)
   local e = summary.errors
   local secs = summary.duration / 1e6
   io.write(string.format(
      'BENCHJSON {"requests":%d,"duration_s":%.6f,"rps":%.2f,' ..
      '"p50_us":%d,"p99_us":%d,"p999_us":%d,"mean_us":%.1f,"max_us":%d,' ..
      '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
      '"bytes":%d}\n',
      summary.requests, secs, summary.requests / secs,
      latency:percentile(50), latency:percentile(99), latency:percentile(99.9),
      latency.mean, latency.max,
      e.connect, e.read, e.write, e.status, e.timeout,
      summary.bytes))
end
