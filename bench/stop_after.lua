-- wrk script: stop once STOP_AFTER responses (env, default 2000) have arrived; run with -t1.
local limit = tonumber(os.getenv("STOP_AFTER") or "2000")
local n = 0
response = function(status, headers, body)
  n = n + 1
  if n >= limit then wrk.thread:stop() end
end
