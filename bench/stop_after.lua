-- wrk script: exit once STOP_AFTER 2xx responses (env, default 2000) have arrived; run with -t1.
-- os.exit, not wrk.thread:stop(): a stopped thread still leaves wrk waiting out -d.
-- Exit codes: 0 the limit was reached, 2 a response that is not 2xx, 1 -d ran out first.
local limit = tonumber(os.getenv("STOP_AFTER") or "2000")
local n = 0
response = function(status, headers, body)
  if status < 200 or status > 299 then
    io.stderr:write("stop_after.lua: status " .. status .. "\n")
    os.exit(2)
  end
  n = n + 1
  if n >= limit then os.exit(0) end
end
done = function(summary, latency, requests)
  io.stderr:write("stop_after.lua: -d ran out before " .. limit .. " responses\n")
  os.exit(1)
end
