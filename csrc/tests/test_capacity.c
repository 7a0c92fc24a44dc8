/* test_capacity.c -- the candidate rule: a worker gets a connection only
 * when it can start it now (queued + active < capacity).
 *
 * Theory of operation: the workers are the test's ends of SEQPACKET pairs;
 * the test plays each worker's part of the scoreboard with the real writers
 * of slot.c (pf_slot_conn_taken, request_started/finished, set_capacity), so
 * the handshake the dispatcher relies on (want_credit -> CREDIT) is the one
 * pyfork's workers run. Real loopback clients; no timing assertions beyond
 * the liveness bound in dispatch_util.h.
 */
#include "dispatch_util.h"
#include "pf_internal.h"  /* PF__RESCUE_US, PF__TAKEBACK_US */

/* Worker side: reads ONE queued message from wend; stores the client ids in
 * ids[], closes the connections and returns how many the message carried
 * (0 when the channel is empty). */
static int take_message(int wend, int *ids)
{
    pf_msg_hdr h;
    int fds[PF_MAX_FDS];
    int k = pf_recv_msg(wend, &h, NULL, 0, fds, PF_MAX_FDS);

    if (k == -EAGAIN)
        return 0;
    CHECK_OK(k);
    CHECK_EQ(h.type, PF_MSG_CONN);
    for (int i = 0; i < k; i++) {
        ids[i] = read_id(fds[i]);
        close(fds[i]);
    }
    return k;
}

/* Backdates the request in progress on s by a second: long past
 * PF__PREFETCH_US, so no connection is prefetched behind it. */
static void long_running(pf_slot *s)
{
    s->busy_since_ns = pf__now_ns() - pf__ms_to_ns(1000);
}

/* The worker's part after reading n connections: taken + n, and n requests
 * started (each connection's request begins at once), running long. */
static void worker_starts(pf_slot *s, int n)
{
    pf_slot_conn_taken(s, (uint32_t)n);
    for (int i = 0; i < n; i++)
        pf_slot_request_started(s);
    long_running(s);
}

/* The worker's part when a request ends and its connection closes; sends
 * the CREDIT the primary asked for, as pyfork's runtime does. */
static void worker_finishes(pf_slot *s, int wend)
{
    int credit = pf_slot_request_finished(s);

    credit |= pf_slot_conn_closed(s, 1);
    if (credit)
        CHECK_OK(pf_send_msg(wend, PF_MSG_CREDIT, 0, NULL, 0, NULL, 0));
}

/* Runs the dispatcher until the worker at wend has one message with
 * exactly client id; fails after LIVENESS_MS. When keep is not NULL, its
 * request in progress is made keep_ns old before every run, so it stays
 * at that age however long this takes. */
static void run_until_taken(struct disp_fx *f, int wend, int id, pf_slot *keep, uint64_t keep_ns)
{
    uint64_t deadline = pf__now_ns() + pf__ms_to_ns(LIVENESS_MS);
    int ids[PF_MAX_FDS];

    for (;;) {
        pf_event ev[4];
        int k = take_message(wend, ids);

        if (k > 0) {
            CHECK_EQ(k, 1);
            CHECK_EQ(ids[0], id);
            return;
        }
        CHECK(pf__now_ns() < deadline);
        if (keep != NULL)
            keep->busy_since_ns = pf__now_ns() - keep_ns;
        CHECK(pf_dispatcher_run(f->d, keep != NULL ? 0 : 5, ev, 4) >= 0);
    }
}

/* Runs for ms and checks nothing was accepted meanwhile. */
static void run_idle(pf_dispatcher *d, int ms)
{
    pf_event ev[4];
    uint64_t accepted = stats(d).accepted;

    CHECK_EQ(pf_dispatcher_run(d, ms, ev, 4), 0);
    CHECK_EQ(stats(d).accepted, accepted);
}

/* Two sync workers (capacity 1), rr: a connection never waits in a busy
 * worker's channel; with both busy it waits in the primary (then the
 * kernel's backlog) and goes to whichever worker finishes first. */
static void test_sync_workers_central_queue(void)
{
    struct disp_fx f;
    pf_slot *board;
    int cl[4], ids[PF_MAX_FDS], a;

    fx_setup(&f, 2, PF_POLICY_RR, 2, 0);
    board = pf_dispatcher_scoreboard(f.d, NULL);
    pf_slot_set_capacity(&board[0], 1);
    pf_slot_set_capacity(&board[1], 1);

    /* Worker a takes client 0 and is inside its (slow) request. */
    a = dispatch_one(f.d, f.port, f.w, 2, 0, &cl[0]);
    worker_starts(&board[a], 1);
    /* Client 1 goes to the other worker, whatever rr's turn says; it sits in
     * that worker's channel (queued, not taken yet). */
    cl[1] = client(f.port, 1);
    run_until_dispatched(f.d, 2);
    CHECK_EQ(take_message(f.w[a], ids), 0);
    /* Neither can start one now: client 2 waits in the primary's ring (the
     * listeners leave the poll set, the backlog holds the next ones), and
     * both workers were asked for a CREDIT. */
    cl[2] = client(f.port, 2);
    run_until_accepted(f.d, 3);
    run_idle(f.d, 100);
    CHECK_EQ(stats(f.d).accepting, 0);
    CHECK_EQ(stats(f.d).pending, 1);
    CHECK_EQ(stats(f.d).dispatched, 2);
    CHECK_EQ(board[0].want_credit, 1);
    CHECK_EQ(board[1].want_credit, 1);

    /* Worker a finishes: its CREDIT wakes the primary, which sends client 2
     * to a -- never behind client 1 in the other worker's channel. */
    worker_finishes(&board[a], f.w[a]);
    run_until_dispatched(f.d, 3);
    CHECK_EQ(take_message(f.w[a], ids), 1);
    CHECK_EQ(ids[0], 2);
    CHECK_EQ(take_message(f.w[1 - a], ids), 1);
    CHECK_EQ(ids[0], 1);
    worker_starts(&board[a], 1);
    worker_starts(&board[1 - a], 1);

    /* The other worker takes client 1 (a take frees no room) and finishes it:
     * the next client goes there. */
    worker_finishes(&board[1 - a], f.w[1 - a]);
    cl[3] = client(f.port, 3);
    run_until_dispatched(f.d, 4);
    CHECK_EQ(take_message(f.w[1 - a], ids), 1);
    CHECK_EQ(ids[0], 3);
    CHECK_EQ(take_message(f.w[a], ids), 0);
    fx_teardown(&f, cl, 4);
}

/* A worker's batch is at most its free capacity: five backlogged clients on
 * a worker of capacity 3 go 3 in one message, then one per finished request. */
static void test_batch_capped_by_free_capacity(void)
{
    struct disp_fx f;
    pf_slot *board;
    int cl[5], ids[PF_MAX_FDS];

    fx_init(&f, 1, PF_POLICY_RR);
    f.d = new_disp(&f.c);
    f.w[0] = add_worker(f.d, 0, 0, 1);
    f.nw = 1;
    board = pf_dispatcher_scoreboard(f.d, NULL);
    pf_slot_set_capacity(&board[0], 3);
    for (int i = 0; i < 5; i++)
        cl[i] = client(f.port, (unsigned char)i);
    CHECK_OK(pf_dispatcher_add_listener(f.d, f.lfd));

    run_until_dispatched(f.d, 3);
    CHECK_EQ(take_message(f.w[0], ids), 3);
    CHECK_EQ(ids[0], 0);
    CHECK_EQ(ids[2], 2);
    worker_starts(&board[0], 3);
    run_idle(f.d, 50);          /* no room: nothing more accepted or sent */
    CHECK_EQ(stats(f.d).dispatched, 3);
    CHECK_EQ(take_message(f.w[0], ids), 0);

    /* One request ends: exactly one more, in accept order. */
    worker_finishes(&board[0], f.w[0]);
    run_until_dispatched(f.d, 4);
    CHECK_EQ(take_message(f.w[0], ids), 1);
    CHECK_EQ(ids[0], 3);
    worker_starts(&board[0], 1);
    worker_finishes(&board[0], f.w[0]);
    worker_finishes(&board[0], f.w[0]);
    run_until_dispatched(f.d, 5);
    CHECK_EQ(take_message(f.w[0], ids), 1);
    CHECK_EQ(ids[0], 4);
    fx_teardown(&f, cl, 5);
}

/* least: the candidate with the least work (queued + active) wins; a worker
 * at its capacity is never chosen however light the others look. */
static void test_least_by_work(void)
{
    struct disp_fx f;
    pf_slot *board;
    int cl[3], ids[PF_MAX_FDS];

    fx_setup(&f, 3, PF_POLICY_LEAST, 3, 0);
    board = pf_dispatcher_scoreboard(f.d, NULL);
    pf_slot_set_capacity(&board[0], 1);     /* sync, and busy */
    pf_slot_set_capacity(&board[1], 8);
    pf_slot_set_capacity(&board[2], 8);
    pf_slot_request_started(&board[0]);
    for (int i = 0; i < 3; i++)
        pf_slot_request_started(&board[1]);
    pf_slot_request_started(&board[2]);
    /* Requests that have run for no time at all (start times a minute ahead
     * count as age 0 however slow this machine is); slot 1's the latest. */
    board[0].busy_since_ns = board[2].busy_since_ns = pf__now_ns() + pf__ms_to_ns(60000);
    board[1].busy_since_ns = board[0].busy_since_ns + pf__ms_to_ns(1000);
    /* Work 1/1 (full), 3/8, 1/8: slot 2. */
    CHECK_EQ(dispatch_one(f.d, f.port, f.w, 3, 0, &cl[0]), 2);
    /* Slot 2 has one queued now (2/8) and is still lighter than slot 1. */
    CHECK_EQ(dispatch_one(f.d, f.port, f.w, 3, 1, &cl[1]), 2);
    /* worker_take in dispatch_one read them without telling the scoreboard:
     * 2 queued + 1 active = 3 ties with slot 1's 3; slot 2's request started
     * earlier, so slot 1 (busy since later = less likely stuck) wins. */
    CHECK_EQ(dispatch_one(f.d, f.port, f.w, 3, 2, &cl[2]), 1);
    CHECK_EQ(take_message(f.w[0], ids), 0);
    fx_teardown(&f, cl, 3);
}

/* A connection taken but not started yet is work (issue 10's last 1 %): a
 * sync worker that read a connection whose request has not begun is not sent
 * a second one (it could wait behind the first, if that one is slow); with
 * the other worker busy, the next waits in the primary until the fresh one
 * closes unstarted (its CREDIT sends it on at once) or, never starting,
 * stops counting after PF_SLOT_FRESH_MS (an idle preconnect holds no worker;
 * the loop rechecks while fds wait). Both policies. */
static void fresh_counts_as_work(int policy)
{
    struct disp_fx f;
    pf_slot *board;
    int cl[4], ids[PF_MAX_FDS], a, b;

    fx_setup(&f, 2, policy, 2, 0);
    board = pf_dispatcher_scoreboard(f.d, NULL);
    pf_slot_set_capacity(&board[0], 1);
    pf_slot_set_capacity(&board[1], 1);

    a = dispatch_one(f.d, f.port, f.w, 2, 0, &cl[0]);   /* read, request not begun */
    pf_slot_conn_taken(&board[a], 1);
    /* Young for a minute, however slow this machine is (a time ahead counts as age 0). */
    board[a].fresh_ms = (uint32_t)(pf__now_ns() / PF__NS_PER_MS) + 60000;
    b = dispatch_one(f.d, f.port, f.w, 2, 1, &cl[1]);
    CHECK_EQ(b, 1 - a);
    worker_starts(&board[b], 1);         /* b runs a long request */

    /* Client 2: a holds a fresh connection, b is busy: it waits in the primary. */
    cl[2] = client(f.port, 2);
    run_until_accepted(f.d, 3);
    run_idle(f.d, 50);
    CHECK_EQ(stats(f.d).pending, 1);
    CHECK_EQ(stats(f.d).dispatched, 2);
    CHECK_EQ(board[a].want_credit, 1);
    /* a's connection closes before any request: room, and the CREDIT owed. */
    if (pf_slot_conn_closed(&board[a], 1))
        CHECK_OK(pf_send_msg(f.w[a], PF_MSG_CREDIT, 0, NULL, 0, NULL, 0));
    run_until_dispatched(f.d, 3);
    CHECK_EQ(take_message(f.w[a], ids), 1);
    CHECK_EQ(ids[0], 2);
    pf_slot_conn_taken(&board[a], 1);    /* fresh again, with the real time */

    /* Client 3: client 2 never sends its request; after PF_SLOT_FRESH_MS it
     * no longer holds a, and client 3 goes there (b is still busy). */
    cl[3] = client(f.port, 3);
    run_until_dispatched(f.d, 4);
    CHECK_EQ(take_message(f.w[a], ids), 1);
    CHECK_EQ(ids[0], 3);
    CHECK_EQ(take_message(f.w[b], ids), 0);
    fx_teardown(&f, cl, 4);
}

/* Prefetch with take-back: with every worker running a request, connections
 * may wait behind a request that began < PF__PREFETCH_US ago (so that worker
 * goes on without a round trip through the primary); if that request is
 * still running at PF__TAKEBACK_US, the primary reads them back from the
 * worker's end and they go to the first worker that can start them -- never
 * stuck behind a slow request. */
static void test_prefetch_and_take_back(void)
{
    struct disp_fx f;
    pf_slot *board;
    pf_worker_stats ws;
    int cl[4], ids[PF_MAX_FDS], a, b;
    uint64_t deadline;

    fx_setup(&f, 2, PF_POLICY_RR, 2, 1);    /* the primary holds the workers' ends */
    board = pf_dispatcher_scoreboard(f.d, NULL);
    pf_slot_set_capacity(&board[0], 1);
    pf_slot_set_capacity(&board[1], 1);
    a = dispatch_one(f.d, f.port, f.w, 2, 0, &cl[0]);
    worker_starts(&board[a], 1);        /* a: a long request */
    b = dispatch_one(f.d, f.port, f.w, 2, 1, &cl[1]);
    CHECK_EQ(b, 1 - a);
    pf_slot_conn_taken(&board[b], 1);
    pf_slot_request_started(&board[b]);
    /* b's request began "2 s from now": young for 2 s (however slow this
     * machine is, the next steps take less), then it turns out long. */
    board[b].busy_since_ns = pf__now_ns() + pf__ms_to_ns(2000);

    /* Clients 2 and 3 are prefetched behind b's young request, one per
     * message, not behind a's long one. */
    cl[2] = client(f.port, 2);
    cl[3] = client(f.port, 3);
    run_until_dispatched(f.d, 4);
    CHECK_OK(pf_dispatcher_worker_stats(f.d, b, &ws));
    CHECK_EQ(ws.sent, 3);

    /* b's request runs past the take-back age: both come back to the
     * primary, in order, and wait there for a worker that can start them. */
    deadline = pf__now_ns() + pf__ms_to_ns(LIVENESS_MS);
    while (stats(f.d).pending < 2) {
        pf_event ev[4];
        CHECK(pf__now_ns() < deadline);
        CHECK(pf_dispatcher_run(f.d, 20, ev, 4) >= 0);
    }
    CHECK_EQ(take_message(f.w[b], ids), 0);
    CHECK_OK(pf_dispatcher_worker_stats(f.d, b, &ws));
    CHECK_EQ(ws.sent, 1);
    /* a finishes first: client 2 (the older) is the first it gets. */
    worker_finishes(&board[a], f.w[a]);
    run_until_dispatched(f.d, 5);
    CHECK_EQ(take_message(f.w[a], ids), 1);
    CHECK_EQ(ids[0], 2);
    worker_starts(&board[a], 1);        /* ... and it runs long too */
    /* b finishes: client 3 reaches b (if it was prefetched behind a's new
     * request, it is taken back from there first). Nothing lost, nothing
     * served twice. */
    worker_finishes(&board[b], f.w[b]);
    run_until_taken(&f, f.w[b], 3, NULL, 0);
    CHECK_EQ(take_message(f.w[a], ids), 0);
    CHECK_EQ(take_message(f.w[b], ids), 0);
    CHECK_EQ(stats(f.d).pending, 0);
    fx_teardown(&f, cl, 4);
}

/* Two sync workers: a's request begins "2 s from now" (young however slow
 * this machine), b's runs long; then client 2 is prefetched behind a. The
 * ids of a and b go to *a and *b. */
static pf_slot *prefetched_behind_a(struct disp_fx *f, int *cl, int *a, int *b)
{
    pf_slot *board;
    pf_worker_stats ws;

    fx_setup(f, 2, PF_POLICY_RR, 2, 1);
    board = pf_dispatcher_scoreboard(f->d, NULL);
    pf_slot_set_capacity(&board[0], 1);
    pf_slot_set_capacity(&board[1], 1);
    *a = dispatch_one(f->d, f->port, f->w, 2, 0, &cl[0]);
    pf_slot_conn_taken(&board[*a], 1);
    pf_slot_request_started(&board[*a]);
    board[*a].busy_since_ns = pf__now_ns() + pf__ms_to_ns(2000);
    *b = dispatch_one(f->d, f->port, f->w, 2, 1, &cl[1]);
    CHECK_EQ(*b, 1 - *a);
    worker_starts(&board[*b], 1);
    cl[2] = client(f->port, 2);
    run_until_dispatched(f->d, 3);
    CHECK_OK(pf_dispatcher_worker_stats(f->d, *a, &ws));
    CHECK_EQ(ws.sent, 2);
    return board;
}

/* Rescue: a connection prefetched behind a request that has run
 * PF__RESCUE_US (not yet PF__TAKEBACK_US) stays while no other worker would
 * start it sooner, and comes back for one that would -- here a worker whose
 * request just began, so it goes through its requests while the first may
 * be a slow one. a's request is aged by hand, between the two ages; the
 * "stays" check is made only while the PF__TAKEBACK_US rule cannot apply. */
static void test_rescue_to_a_sooner_worker(void)
{
    const uint64_t rescue = (uint64_t)PF__RESCUE_US * PF__NS_PER_US;
    const uint64_t age = (uint64_t)PF__TAKEBACK_US * PF__NS_PER_US;
    struct disp_fx f;
    pf_slot *board;
    pf_worker_stats ws;
    int cl[3], ids[PF_MAX_FDS], a, b;
    uint64_t set_at;

    board = prefetched_behind_a(&f, cl, &a, &b);    /* a: young, b: long */

    /* a's request has run past PF__RESCUE_US; b is stuck: it stays. */
    set_at = pf__now_ns();
    board[a].busy_since_ns = set_at - rescue - (age - rescue) / 4;
    for (int i = 0; i < 3; i++) {
        pf_event ev[4];
        CHECK(pf_dispatcher_run(f.d, 0, ev, 4) >= 0);
    }
    if (pf__now_ns() - set_at < (age - rescue) / 2) {
        CHECK_OK(pf_dispatcher_worker_stats(f.d, a, &ws));
        CHECK_EQ(ws.sent, 2);
        CHECK_EQ(stats(f.d).pending, 0);
        /* ... and the stuck one was asked to say when it frees up. */
        CHECK_EQ(board[b].want_credit, 1);
    }

    /* b moves on to a new request: client 2 comes back and goes to b. a's
     * request is kept between the two ages at every look, so only the
     * rescue can move it. */
    board[b].busy_since_ns = pf__now_ns() + pf__ms_to_ns(2000);
    run_until_taken(&f, f.w[b], 2, &board[a], rescue + (age - rescue) / 4);
    CHECK_EQ(take_message(f.w[a], ids), 0);
    CHECK_EQ(stats(f.d).pending, 0);
    CHECK(stats(f.d).redispatched >= 1);
    fx_teardown(&f, cl, 3);
}

/* A connection the rescue moves is prefetched again in the same tick,
 * behind the worker that would start it sooner; the take-back scan is armed
 * for that worker at once, so if its request then runs long too, the
 * connection is taken back while run() sleeps, with nothing else to wake the
 * primary (no client, no worker message). */
static void test_a_rescued_connection_is_watched_where_it_went(void)
{
    const uint64_t us = PF__NS_PER_US;
    struct disp_fx f;
    pf_slot *board;
    pf_event ev[4];
    int cl[3], a, b;
    uint64_t wakeups, now;

    board = prefetched_behind_a(&f, cl, &a, &b);    /* a: young, b: long for now */
    /* a's request may be slow (past the rescue age); b has just begun one. */
    now = pf__now_ns();
    board[a].busy_since_ns = now - (uint64_t)PF__RESCUE_US * us - 150 * us;
    board[b].busy_since_ns = now - 50 * us;
    wakeups = stats(f.d).wakeups;
    CHECK(pf_dispatcher_run(f.d, 300, ev, 4) >= 0);
    CHECK(stats(f.d).dispatched >= 4);      /* it moved (to b, or to the ring) ... */
    CHECK_EQ(stats(f.d).pending, 1);        /* ... and came back: b's ran long too */
    /* One wake-up would be the 300 ms timeout: the scan woke it before. */
    CHECK(stats(f.d).wakeups - wakeups >= 2);
    fx_teardown(&f, cl, 3);
}

/* Both workers were full when client 2 came, so both were asked for a
 * CREDIT; it was then prefetched and nothing waits in the primary: the
 * requests are withdrawn, and a worker that finishes sends no CREDIT (it
 * would be a sendmsg there and a wake-up here, for nothing). */
static void test_no_credit_once_nothing_waits(void)
{
    struct disp_fx f;
    pf_slot *board;
    int cl[3], a, b;

    board = prefetched_behind_a(&f, cl, &a, &b);    /* a: young, b: long */
    CHECK_EQ(board[a].want_credit, 0);
    CHECK_EQ(board[b].want_credit, 0);
    CHECK_EQ(pf_slot_request_finished(&board[b]), 0);
    CHECK_EQ(pf_slot_conn_closed(&board[b], 1), 0);
    fx_teardown(&f, cl, 3);
}

static void test_fresh_counts_as_work_rr(void)
{
    fresh_counts_as_work(PF_POLICY_RR);
}

static void test_fresh_counts_as_work_least(void)
{
    fresh_counts_as_work(PF_POLICY_LEAST);
}

/* Runs d until the pull on line s is over (liveness-bounded), accepting nothing. */
static void run_until_pull_over(pf_dispatcher *d, const pf_slot *s)
{
    uint64_t deadline = pf__now_ns() + pf__ms_to_ns(LIVENESS_MS);

    while (__atomic_load_n(&s->pull, __ATOMIC_RELAXED)) {
        CHECK(pf__now_ns() < deadline);
        run_idle(d, 5);
    }
}

/* Pull (pf_dispatcher_set_pull): with both sync workers inside a request, a
 * new client is not accepted; it stays in the kernel's queue, every line
 * says pull, and a worker accepts it from the listener (the test does, as
 * pyfork's runtime would). Once a worker is idle and gets nothing for a
 * whole look (PF__RECHECK_MS), the pull ends and the listener is polled
 * again. */
static void test_pull_leaves_it_to_the_workers(void)
{
    struct disp_fx f;
    pf_slot *board;
    int cl[2], fd;

    fx_setup(&f, 2, PF_POLICY_RR, 2, 0);
    CHECK_EQ(pf_dispatcher_set_pull(f.d, 2), -EINVAL);
    CHECK_OK(pf_dispatcher_set_pull(f.d, 1));
    board = pf_dispatcher_scoreboard(f.d, NULL);
    for (int s = 0; s < 2; s++) {
        pf_slot_set_capacity(&board[s], 1);
        pf_slot_request_started(&board[s]);
        long_running(&board[s]);
    }
    cl[0] = client(f.port, 0);
    run_idle(f.d, 100);                 /* accepts nothing */
    CHECK_EQ(stats(f.d).pulls, 1);
    CHECK_EQ(stats(f.d).accepting, 0);
    CHECK_EQ(stats(f.d).pending, 0);
    CHECK_EQ(board[0].pull, 1);
    CHECK_EQ(board[1].pull, 1);
    fd = accept4(f.lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK(fd >= 0);                     /* a worker takes it from the backlog */
    CHECK_EQ(read_id(fd), 0);
    close(fd);

    pf_slot_request_finished(&board[0]);
    run_until_pull_over(f.d, &board[0]);
    CHECK_EQ(board[0].pull, 0);
    CHECK_EQ(board[1].pull, 0);
    CHECK_EQ(stats(f.d).accepting, 1);
    cl[1] = client(f.port, 1);
    run_until_dispatched(f.d, 1);
    CHECK_EQ(stats(f.d).pulls, 1);
    for (int s = 0; s < 2; s++) {
        int ids[PF_MAX_FDS];

        (void)take_message(f.w[s], ids);
    }
    fx_teardown(&f, cl, 2);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_sync_workers_central_queue), PF_CASE(test_batch_capped_by_free_capacity),
    PF_CASE(test_least_by_work), PF_CASE(test_fresh_counts_as_work_rr),
    PF_CASE(test_fresh_counts_as_work_least), PF_CASE(test_prefetch_and_take_back),
    PF_CASE(test_rescue_to_a_sooner_worker), PF_CASE(test_a_rescued_connection_is_watched_where_it_went),
    PF_CASE(test_no_credit_once_nothing_waits), PF_CASE(test_pull_leaves_it_to_the_workers),
};

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
