/* test_slot.c -- the worker-side scoreboard writers (slot.c): counters,
 * busy_since_ns as "busy without progress since", and the want_credit
 * handshake, as pyfork/scoreboard.py's SlotView does them.
 *
 * Theory of operation: each test zeroes a pf_slot on its own stack (the
 * writers do not care whether the line is shared memory), calls the writers
 * in the order a worker would, and reads every field back. Times are only
 * compared with each other (CLOCK_MONOTONIC never goes back), never with a
 * duration, so a slow machine cannot fail them. */
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "pyfork.h"
#include "pf_test.h"

static void test_requests_and_heartbeat(void)
{
    pf_slot s;
    uint64_t first;

    memset(&s, 0, sizeof(s));
    pf_slot_request_started(&s);
    CHECK_EQ(s.active, 1);
    CHECK(s.busy_since_ns > 0 && s.heartbeat_ns == s.busy_since_ns);
    first = s.busy_since_ns;
    pf_slot_request_started(&s);           /* already busy: busy_since stays */
    CHECK_EQ(s.active, 2);
    CHECK_EQ(s.busy_since_ns, first);
    CHECK(s.heartbeat_ns >= first);
    pf_slot_request_finished(&s);          /* progress with one still running: moves to now */
    CHECK_EQ(s.active, 1);
    CHECK_EQ(s.handled, 1);
    CHECK(s.busy_since_ns >= first && s.busy_since_ns == s.heartbeat_ns);
    pf_slot_request_finished(&s);          /* idle */
    CHECK_EQ(s.active, 0);
    CHECK_EQ(s.handled, 2);
    CHECK_EQ(s.busy_since_ns, 0);
    pf_slot_request_finished(&s);          /* an extra finish never wraps active */
    CHECK_EQ(s.active, 0);
    CHECK_EQ(s.handled, 3);
    CHECK_EQ(s.closed, 0);
    CHECK_EQ(s.pid, 0);
}

static void test_conn_closed_and_credit(void)
{
    pf_slot s;

    memset(&s, 0, sizeof(s));
    CHECK_EQ(pf_slot_conn_closed(&s, 3), 0);
    CHECK_EQ(s.closed, 3);
    s.want_credit = 1;                     /* the primary asked */
    CHECK_EQ(pf_slot_conn_closed(&s, 2), 1);
    CHECK_EQ(s.want_credit, 0);
    CHECK_EQ(s.closed, 5);
    CHECK_EQ(pf_slot_conn_closed(&s, 0), 0);
    CHECK_EQ(s.closed, 5);
    CHECK_EQ(s.active, 0);
}

/* fresh: a taken connection counts until its first request starts or it
 * closes; any start or close lowers it, never below 0; its time is set only
 * when it rises from 0. */
static void test_fresh_connections(void)
{
    pf_slot s;
    uint32_t t0;

    memset(&s, 0, sizeof(s));
    pf_slot_conn_taken(&s, 2);
    CHECK_EQ(s.taken, 2);
    CHECK_EQ(s.fresh, 2);
    t0 = s.fresh_ms;
    pf_slot_request_started(&s);           /* one of them began */
    CHECK_EQ(s.fresh, 1);
    CHECK_EQ(s.active, 1);
    pf_slot_conn_taken(&s, 1);             /* not from 0: time unchanged */
    CHECK_EQ(s.fresh, 2);
    CHECK_EQ(s.fresh_ms, t0);
    s.want_credit = 1;
    CHECK_EQ(pf_slot_conn_closed(&s, 1), 1);   /* closed unstarted: room, CREDIT owed */
    CHECK_EQ(s.fresh, 1);
    CHECK_EQ(pf_slot_conn_closed(&s, 5), 0);   /* clamps at 0 */
    CHECK_EQ(s.fresh, 0);
    CHECK_EQ(s.closed, 6);
    pf_slot_request_started(&s);           /* a kept-alive request: fresh stays 0 */
    CHECK_EQ(s.fresh, 0);
    CHECK_EQ(s.active, 2);
    CHECK_EQ(s.taken, 3);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_requests_and_heartbeat), PF_CASE(test_conn_closed_and_credit),
    PF_CASE(test_fresh_connections),
};

int main(int argc, char **argv)
{
    alarm(60);   /* liveness guard only */
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
