/* test_slot.c -- the worker-side scoreboard writers (slot.c): counters,
 * busy_since_ns as "busy without progress since", and the want_credit
 * handshake, the request-duration histogram, as pyfork/scoreboard.py's
 * SlotView does them.
 *
 * Theory of operation: each test zeroes a pf_slot on its own stack (the
 * writers do not care whether the line is shared memory), calls the writers
 * in the order a worker would, and reads every field back. Times are only
 * compared with each other (CLOCK_MONOTONIC never goes back), never with a
 * duration, so a slow machine cannot fail them. */
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "pf_clock.h"
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

/* Returns the total of the histogram's buckets. */
static uint64_t hist_count(const pf_slot *s)
{
    uint64_t n = 0;

    for (int i = 0; i < PF_HIST_BUCKETS; i++)
        n += s->duration_le[i];
    return n;
}

/* Returns the index of the one non-empty bucket, or -1 when there are 0 or several. */
static int only_bucket(const pf_slot *s)
{
    int found = -1;

    for (int i = 0; i < PF_HIST_BUCKETS; i++) {
        if (s->duration_le[i] == 0)
            continue;
        if (found >= 0 || s->duration_le[i] != 1)
            return -1;
        found = i;
    }
    return found;
}

#define MS 1000000ull

/* One request at a time: its duration is now - its start, in the bucket
 * whose bound it does not exceed. The start is moved back by hand so the
 * duration is known from below (a slow machine only makes it longer, so
 * only "at least this bucket" is checked where that could matter). */
static void test_duration_one_at_a_time(void)
{
    pf_slot s;
    uint64_t start;
    int b;

    memset(&s, 0, sizeof(s));
    CHECK_EQ(sizeof(pf_slot) % 64, 0);
    pf_slot_request_started(&s);
    start = s.started_sum_ns;
    CHECK_EQ(start, s.busy_since_ns);
    s.started_sum_ns = start - 30 * MS;     /* began 30 ms ago: above the 25 ms bound */
    pf_slot_request_finished(&s);
    b = only_bucket(&s);
    CHECK(b >= 5);                          /* bucket 5 is (25 ms, 50 ms] */
    CHECK_EQ(s.duration_sum_ns, s.heartbeat_ns - (start - 30 * MS));
    CHECK(s.duration_sum_ns >= 30 * MS);
    CHECK_EQ(s.started_sum_ns, 0);
    memset(&s, 0, sizeof(s));
    pf_slot_request_started(&s);
    s.started_sum_ns -= 20000 * MS;         /* 20 s: beyond the last bound, +Inf */
    pf_slot_request_finished(&s);
    CHECK_EQ(only_bucket(&s), PF_HIST_BUCKETS - 1);
    pf_slot_request_finished(&s);           /* a finish with none started: 0 s */
    CHECK_EQ(s.duration_le[0], 1);
    CHECK_EQ(hist_count(&s), s.handled);
}

/* Overlapping requests: each finish counts the mean start of those in
 * progress, and the sum of durations is exact: the finish times minus the
 * start times. */
static void test_duration_overlapping_sum_is_exact(void)
{
    pf_slot s;
    uint64_t starts, t1, t2;

    memset(&s, 0, sizeof(s));
    pf_slot_request_started(&s);
    s.started_sum_ns -= 100 * MS;           /* A began 100 ms ago */
    pf_slot_request_started(&s);
    s.started_sum_ns -= 10 * MS;            /* B began 10 ms ago */
    starts = s.started_sum_ns;
    pf_slot_request_finished(&s);           /* counted as 55 ms or more */
    t1 = s.heartbeat_ns;
    CHECK(s.duration_sum_ns >= 55 * MS);
    CHECK_EQ(s.duration_le[0] + s.duration_le[1] + s.duration_le[2] + s.duration_le[3] +
             s.duration_le[4] + s.duration_le[5], 0);     /* above 50 ms */
    pf_slot_request_finished(&s);
    t2 = s.heartbeat_ns;
    CHECK_EQ(s.duration_sum_ns, t1 + t2 - starts);
    CHECK_EQ(hist_count(&s), 2);
    CHECK_EQ(s.started_sum_ns, 0);
    CHECK_EQ(s.active, 0);
    pf_slot_request_started(&s);            /* idle again: the sum starts afresh */
    CHECK_EQ(s.started_sum_ns, s.busy_since_ns);
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

static void test_accepted_connections_are_fresh_not_taken(void)
{
    pf_slot s;
    uint32_t before, after;

    memset(&s, 0, sizeof(s));
    before = (uint32_t)(pf__now_ns() / PF__NS_PER_MS);
    pf_slot_conn_accepted(&s, 1);          /* shared/reuseport: never in the channel */
    after = (uint32_t)(pf__now_ns() / PF__NS_PER_MS);
    CHECK_EQ(s.fresh, 1);
    CHECK_EQ(s.accepted, 1);
    CHECK_EQ(s.taken, 0);                  /* sent - taken (queued) is untouched */
    CHECK(s.fresh_ms - before <= after - before);    /* its time: now (u32 ms, wraps) */
    pf_slot_conn_taken(&s, 1);             /* a parked one came back on the channel */
    CHECK_EQ(s.fresh, 2);
    CHECK_EQ(s.taken, 1);
    CHECK_EQ(s.accepted, 1);
    pf_slot_request_started(&s);
    pf_slot_request_started(&s);
    CHECK_EQ(s.fresh, 0);
    CHECK_EQ(s.active, 2);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_requests_and_heartbeat), PF_CASE(test_conn_closed_and_credit),
    PF_CASE(test_duration_one_at_a_time), PF_CASE(test_duration_overlapping_sum_is_exact),
    PF_CASE(test_fresh_connections), PF_CASE(test_accepted_connections_are_fresh_not_taken),
};

int main(int argc, char **argv)
{
    alarm(60);   /* liveness guard only */
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
