/* slot.c -- the worker-side writers of one scoreboard line (pf_slot).
 *
 * Theory of operation: a worker writes its own line several times per
 * request (request started, request finished, connection taken, closed).
 * pyfork/scoreboard.py does the same in Python through memoryviews; it serves
 * both backends, so this file has no pure twin. With the C backend a worker
 * calls these instead (pyfork/_core.py SlotWriter), one cffi call each.
 * Semantics are scoreboard.py's, field by field: the primary reads these
 * fields with no lock, so each store is a single aligned store, a
 * connection moving from one count to another (taken -> fresh -> active) is
 * added to the new one before it leaves the old, and the one handshake (a
 * store that frees room -- active or fresh down, closed up -- vs
 * want_credit) has the fence dispatch_send.c expects.
 * Times are pf_clock.h's, the clock the primary reads them with.
 *
 * The duration histogram (issue 12) costs no syscall: request_finished
 * already reads the clock (a vDSO call), and the rest is a few stores to the
 * worker's own line. The runtime's request_started()/request_finished() pair
 * names no request, so a finished request's start is taken as the mean start
 * of the requests in progress (now - their mean age), which is exact when
 * a worker runs one request at a time, and keeps duration_sum_ns exact in
 * every case: the estimated starts subtracted over a busy period add up to
 * the real starts added in it.
 */
#include <stdint.h>

#include "pf_clock.h"
#include "pyfork.h"

_Static_assert(sizeof(pf_slot) % 64 == 0, "pf_slot is whole cache lines");
_Static_assert(sizeof(((pf_slot *)0)->duration_le) / sizeof(uint64_t) == PF_HIST_BUCKETS,
               "duration_le has PF_HIST_BUCKETS counters");

/* Bucket upper bounds in ns: Prometheus' usual spread from 1 ms to 10 s (the
 * client libraries' default buckets start at 5 ms; 1 and 2.5 ms resolve a
 * hello-world request). The last bucket, +Inf, has no bound. Mirrored by
 * pyfork/scoreboard.py HIST_BOUNDS_NS and documented in pyfork.h. */
static const uint64_t pf__bounds_ns[PF_HIST_BUCKETS - 1] = {
    1000000, 2500000, 5000000, 10000000, 25000000, 50000000, 100000000,
    250000000, 500000000, 1000000000, 2500000000u, 5000000000u, 10000000000u,
};

/* Counts one finished request of duration ns into its bucket and the sum. */
static void pf__count_duration(pf_slot *s, uint64_t ns)
{
    int i = 0;

    while (i < PF_HIST_BUCKETS - 1 && ns > pf__bounds_ns[i])
        i++;
    __atomic_store_n(&s->duration_le[i], s->duration_le[i] + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->duration_sum_ns, s->duration_sum_ns + ns, __ATOMIC_RELAXED);
}

/* The worker's half of the Dekker handshake, after a store that frees room:
 * fence, then load want_credit; clear it and return 1 when it was set --
 * unless we declared a capacity (so we count what we take: pyfork's workers
 * do, an embedder's may not) and connections still wait in our channel
 * (sent > taken). Then the room is not real: we go straight on to the next one, and the finish or
 * close that leaves us with nothing queued sends the CREDIT (want_credit
 * stays set for it). Without this a saturated sync worker sent ~1.7
 * useless CREDITs per request, each a sendmsg here and a recv in the
 * primary. A stale sent is safe: one too low (the primary's store after a
 * send not seen yet) sends a CREDIT too many; one too high can only follow
 * a take-back, and the primary that took back looks at us again itself. */
static int pf__credit_wanted(pf_slot *s)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&s->want_credit, __ATOMIC_RELAXED))
        return 0;
    if (s->capacity && __atomic_load_n(&s->sent, __ATOMIC_RELAXED) > s->taken)
        return 0;
    __atomic_store_n(&s->want_credit, 0, __ATOMIC_RELAXED);
    return 1;
}

/* Returns nothing; a request began: active + 1, busy since now if it was
 * idle, its start added to started_sum_ns, heartbeat now, and one fresh
 * connection fewer (if any): usually the
 * request is a fresh connection's first; when it is a kept-alive one's
 * instead, fresh drops below the truth, which only makes the worker look
 * less busy, as it did before fresh existed. active rises before fresh
 * falls (release), and the primary loads fresh before active (acquire), so
 * it never sees the connection in neither. */
void pf_slot_request_started(pf_slot *s)
{
    uint64_t now = pf__now_ns();
    uint32_t active = s->active;
    uint32_t fresh = s->fresh;

    if (active == 0)
        __atomic_store_n(&s->busy_since_ns, now, __ATOMIC_RELAXED);
    __atomic_store_n(&s->started_sum_ns, (active ? s->started_sum_ns : 0) + now, __ATOMIC_RELAXED);
    __atomic_store_n(&s->active, active + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->heartbeat_ns, now, __ATOMIC_RELAXED);
    if (fresh)
        __atomic_store_n(&s->fresh, fresh - 1, __ATOMIC_RELEASE);
}

/* Returns 1 when the primary asked for a CREDIT (want_credit was set; it
 * is cleared here and the caller sends PF_MSG_CREDIT), else 0, after ending
 * a request: active - 1, handled + 1, its duration counted in the
 * histogram, heartbeat now.
 * busy_since_ns means "busy without progress since": a finished request is
 * progress, so with requests still in progress it moves to now (a steadily
 * loaded async worker must not look stuck to the least policy).
 * A finished request is room to start another: store active, fence, load
 * want_credit, the mirror of the primary's store want_credit, fence, load
 * active (dispatch_send.c), so a primary that skipped us hears of it. */
int pf_slot_request_finished(pf_slot *s)
{
    uint64_t now = pf__now_ns();
    uint32_t active = s->active;
    uint64_t age = 0;         /* a finish with none started counts as 0 s */

    if (active) {
        /* The mean age of the requests in progress, in wrapping arithmetic:
         * active * now - started_sum is the sum of their ages, exact however
         * large the sum of start times grows (it wraps with enough requests
         * after months of uptime; the sum of ages does not). */
        age = ((uint64_t)active * now - s->started_sum_ns) / active;
        __atomic_store_n(&s->started_sum_ns, s->started_sum_ns - (now - age), __ATOMIC_RELAXED);
        __atomic_store_n(&s->active, --active, __ATOMIC_RELAXED);
    }
    pf__count_duration(s, age);
    __atomic_store_n(&s->handled, s->handled + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->busy_since_ns, active ? now : 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->heartbeat_ns, now, __ATOMIC_RELAXED);
    return pf__credit_wanted(s);
}

/* Returns 1 when the primary asked for a CREDIT, else 0, after adding n to
 * closed (room under the open-connection cap) and taking up to n off fresh
 * (a connection closed before its first request is no work any more; when
 * the closed ones were kept-alive ones, fresh drops below the truth, see
 * request_started). Same handshake as above: both stores free room. */
int pf_slot_conn_closed(pf_slot *s, uint32_t n)
{
    uint32_t fresh = s->fresh;

    if (fresh)
        __atomic_store_n(&s->fresh, fresh > n ? fresh - n : 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->closed, s->closed + n, __ATOMIC_RELEASE);
    return pf__credit_wanted(s);
}

/* n more connections are fresh: work until their first request begins, so
 * the worker reads from its channel, and the primary sends it, no more than
 * it can start. Frees no room, so no handshake. */
static void pf__fresh_add(pf_slot *s, uint32_t n)
{
    uint32_t fresh = s->fresh;

    if (fresh == 0)
        __atomic_store_n(&s->fresh_ms, (uint32_t)(pf__now_ns() / PF__NS_PER_MS),
                         __ATOMIC_RELAXED);
    __atomic_store_n(&s->fresh, fresh + n, __ATOMIC_RELEASE);
}

/* Returns nothing; n connections the worker accepted itself (shared,
 * reuseport): fresh as above, and counted in accepted, so the primary's
 * view of what is open (sent + accepted - closed) includes them. */
void pf_slot_conn_accepted(pf_slot *s, uint32_t n)
{
    pf__fresh_add(s, n);
    __atomic_store_n(&s->accepted, s->accepted + n, __ATOMIC_RELEASE);
}

/* Returns nothing; n connections were read from the channel: no longer
 * queued, but fresh (as accepted ones above). fresh (and its time, when it
 * rises from 0) is stored before taken (release), and the primary loads
 * taken before fresh (acquire): it never sees the connection in neither. */
void pf_slot_conn_taken(pf_slot *s, uint32_t n)
{
    pf__fresh_add(s, n);
    __atomic_store_n(&s->taken, s->taken + n, __ATOMIC_RELEASE);
}

/* Returns nothing; the worker can run `capacity` requests at once. */
void pf_slot_set_capacity(pf_slot *s, uint32_t capacity)
{
    __atomic_store_n(&s->capacity, capacity, __ATOMIC_RELEASE);
}
