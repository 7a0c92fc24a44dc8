-- wrk script: exit once STOP_AFTER responses (env, default 2000) have arrived; run with -t1.
-- os.exit, not wrk.thread:stop(): a stopped thread still leaves wrk waiting out -d.
local limit = tonumber(os.getenv("STOP_AFTER") or "2000")
local n = 0
response = function(status, headers, body)
  n = n + 1
  if n >= limit then os.exit(0) end
end
