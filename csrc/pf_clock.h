/* pf_clock.h -- the C core's one clock and its units.
 *
 * Theory of operation: every time the core keeps or compares is
 * CLOCK_MONOTONIC in nanoseconds, read by pf__now_ns: the EMFILE pause end
 * and the recheck timer (dispatch_loop.c, dispatch_send.c), the least
 * policy's request age (dispatch_send.c), and the scoreboard's heartbeat_ns
 * and busy_since_ns that workers write (slot.c). The scoreboard is shared
 * with Python, which writes and reads it with time.monotonic_ns()
 * (pyfork/scoreboard.py): on Linux that is CLOCK_MONOTONIC too, so both
 * sides compare like with like. Header-only and static inline, so no .c file
 * depends on another for the time; clock_gettime(CLOCK_MONOTONIC) is a vDSO
 * call on Linux (vdso(7)): no syscall on the hot path.
 * Internal (pf__, PF__): not part of pyfork.h.
 */
#ifndef PF_CLOCK_H
#define PF_CLOCK_H

#include <stdint.h>
#include <time.h>

/* SI prefixes: these are definitions, not tunables. */
#define PF__NS_PER_S  1000000000u
#define PF__NS_PER_MS 1000000u
#define PF__NS_PER_US 1000u

/* Returns CLOCK_MONOTONIC now, in ns. */
static inline uint64_t pf__now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * PF__NS_PER_S + (uint64_t)ts.tv_nsec;
}

/* Returns ms as ns (64-bit: an int of ms times 10^6 overflows 32 bits). */
static inline uint64_t pf__ms_to_ns(uint64_t ms)
{
    return ms * PF__NS_PER_MS;
}

#endif
