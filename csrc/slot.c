/* slot.c -- the worker-side writers of one scoreboard line (pf_slot).
 *
 * A worker writes its own line several times per request (request started,
 * request finished, connection closed). pyfork/scoreboard.py does the same in
 * Python through memoryviews, for either backend; with the C backend a worker
 * calls these instead (pyfork/_core.py SlotWriter), one cffi call each.
 * Semantics are scoreboard.py's, field by field: the primary reads these
 * fields with no lock, so each store is a single aligned store, and the one
 * handshake (closed vs want_credit) has the fence dispatch_send.c expects.
 */
#include <stdint.h>
#include <time.h>

#include "pyfork.h"

static uint64_t pf__slot_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void pf_slot_request_started(pf_slot *s)
{
    uint64_t now = pf__slot_now_ns();
    uint32_t active = s->active;

    if (active == 0)
        __atomic_store_n(&s->busy_since_ns, now, __ATOMIC_RELAXED);
    __atomic_store_n(&s->active, active + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->heartbeat_ns, now, __ATOMIC_RELAXED);
}

/* busy_since_ns means "busy without progress since": a finished request is
 * progress, so with requests still in progress it moves to now (a steadily
 * loaded async worker must not look stuck to the least policy). */
void pf_slot_request_finished(pf_slot *s)
{
    uint64_t now = pf__slot_now_ns();
    uint32_t active = s->active;

    if (active)
        __atomic_store_n(&s->active, --active, __ATOMIC_RELAXED);
    __atomic_store_n(&s->handled, s->handled + 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->busy_since_ns, active ? now : 0, __ATOMIC_RELAXED);
    __atomic_store_n(&s->heartbeat_ns, now, __ATOMIC_RELAXED);
}

/* Store closed, fence, load want_credit: the mirror of the primary's store
 * want_credit, fence, load closed (dispatch_send.c), so one side always sees
 * the other. Returns 1 when want_credit was set (it is cleared here): the
 * caller then sends PF_MSG_CREDIT. */
int pf_slot_conn_closed(pf_slot *s, uint32_t n)
{
    __atomic_store_n(&s->closed, s->closed + n, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&s->want_credit, __ATOMIC_RELAXED)) {
        __atomic_store_n(&s->want_credit, 0, __ATOMIC_RELAXED);
        return 1;
    }
    return 0;
}
