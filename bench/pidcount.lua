-- pidcount.lua -- wrk script: count responses per serving worker.
-- Every bench server answers a body containing "pid=N" (bench/hello_app.py,
-- node_cluster.js, floor.c). Each wrk thread counts into its own global table;
-- done() merges the threads' tables (thread:get copies them) and prints one
-- "PIDCOUNT <pid> <count>" line per worker for bench/benchlib.parse_wrk.
counts = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  local pid = body and string.match(body, "pid=(%d+)")
  if pid then
    counts[pid] = (counts[pid] or 0) + 1
  end
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    for pid, n in pairs(t:get("counts")) do
      total[pid] = (total[pid] or 0) + n
    end
  end
  for pid, n in pairs(total) do
    io.write(string.format("PIDCOUNT %s %d\n", pid, n))
  end
end
