-- wrk script: every request carries X-Sent, the CLOCK_MONOTONIC time in ns at which
-- wrk builds it, right before writing it (bench/mixed_trace.py compares it with the
-- time the application was entered). Needs wrk built with LuaJIT (its ffi).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } xsent_timespec;
int clock_gettime(int clk_id, xsent_timespec *tp);
]]
local ts = ffi.new("xsent_timespec")
local CLOCK_MONOTONIC = 1

request = function()
   ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
   wrk.headers["X-Sent"] = string.format("%d%09d", tonumber(ts.tv_sec), tonumber(ts.tv_nsec))
   return wrk.format(nil)
end
