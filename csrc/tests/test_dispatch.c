/* test_dispatch.c -- unit tests for the dispatcher (dispatch*.c), in process.
 *
 * Theory of operation: every test uses real sockets on loopback. A client
 * connects to a real TCP listener and writes one id byte; the dispatcher
 * accepts and sends the fd over a real SOCK_SEQPACKET channel; a "worker"
 * receives it with pf_recv_msg and reads the id, so each test knows exactly
 * which connection reached which worker. Here the workers are the test
 * process itself holding the worker end of the socketpair: it reads only when
 * the test says so, which is how "busy", "never reads" and "full" are staged
 * deterministically. Tests that need other processes (a SIGKILLed worker, a
 * primary with a tiny RLIMIT_NOFILE) are in test_dispatch_fork.c. Every test
 * checks the open-fd count is unchanged.
 */
#include "dispatch_util.h"

static void test_bad_args(void)
{
    int base = count_fds();
    pf_config c = base_config(2, PF_POLICY_RR), bad;
    pf_dispatcher *d = NULL;
    pf_worker_stats ws;
    pf_event ev[1];
    int pfd[2], sv[2], port, l1, l2, l3;

    CHECK_EQ(pf_dispatcher_new(NULL, &d), -EINVAL);
    CHECK_EQ(pf_dispatcher_new(&c, NULL), -EINVAL);
#define BAD(field, value)                                   \
    do {                                                    \
        bad = c;                                            \
        bad.field = (value);                                \
        CHECK_EQ(pf_dispatcher_new(&bad, &d), -EINVAL);     \
        CHECK(d == NULL);                                   \
    } while (0)
    BAD(capacity, 0); BAD(capacity, 4097); BAD(policy, 2); BAD(policy, -1);
    BAD(max_inflight, 0); BAD(max_inflight, (1 << 20) + 1);
    BAD(max_listeners, 0); BAD(max_listeners, 65); BAD(max_watch, -1); BAD(max_watch, 65);
    BAD(max_pending, 0); BAD(max_pending, 65537); BAD(accept_batch, 0);
    BAD(accept_batch, c.max_pending + 1); BAD(emfile_pause_ms, 0);
#undef BAD

    c.max_listeners = 2;
    c.max_watch = 1;
    d = new_disp(&c);
    l1 = tcp_listener(&port);
    l2 = tcp_listener(&port);
    l3 = tcp_listener(&port);
    CHECK(pipe(pfd) == 0);
    CHECK_EQ(pf_dispatcher_add_listener(d, -1), -EINVAL);
    CHECK_EQ(pf_dispatcher_add_listener(d, pfd[0]), -ENOTSOCK);
    CHECK_OK(pf_dispatcher_add_listener(d, l1));
    CHECK_EQ(pf_dispatcher_add_listener(d, l1), -EEXIST);
    CHECK_OK(pf_dispatcher_add_listener(d, l2));
    CHECK_EQ(pf_dispatcher_add_listener(d, l3), -ENOSPC);
    CHECK_EQ(pf_dispatcher_remove_listener(d, l3), -ENOENT);
    CHECK_OK(pf_dispatcher_remove_listener(d, l2));
    CHECK_EQ(pf_dispatcher_remove_listener(d, l2), -ENOENT);

    CHECK_EQ(pf_dispatcher_watch(d, -1, 1), -EINVAL);
    CHECK_OK(pf_dispatcher_watch(d, pfd[0], 1));
    CHECK_EQ(pf_dispatcher_watch(d, pfd[0], 1), -EEXIST);
    CHECK_EQ(pf_dispatcher_watch(d, pfd[1], 1), -ENOSPC);
    CHECK_EQ(pf_dispatcher_unwatch(d, pfd[1]), -ENOENT);

    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    CHECK_EQ(pf_dispatcher_add_worker(d, -1, sv[0], -1), -EINVAL);
    CHECK_EQ(pf_dispatcher_add_worker(d, 2, sv[0], -1), -EINVAL);
    CHECK_EQ(pf_dispatcher_add_worker(d, 0, -1, -1), -EINVAL);
    CHECK_EQ(pf_dispatcher_add_worker(d, 0, sv[0], -2), -EINVAL);
    CHECK_EQ(pf_dispatcher_add_worker(d, 0, sv[0], sv[0]), -EINVAL);
    /* A pipe is not a SEQPACKET channel; and on error nothing is owned. */
    CHECK_EQ(pf_dispatcher_add_worker(d, 0, pfd[1], -1), -EINVAL);
    CHECK(fcntl(pfd[1], F_GETFD) >= 0);
    CHECK_OK(pf_dispatcher_add_worker(d, 0, sv[0], -1));
    CHECK_EQ(pf_dispatcher_add_worker(d, 0, sv[0], -1), -EEXIST);

    CHECK_EQ(pf_dispatcher_set_state(d, 0, PF_WORKER_GONE), -EINVAL);
    CHECK_EQ(pf_dispatcher_set_state(d, 0, 42), -EINVAL);
    CHECK_EQ(pf_dispatcher_set_state(d, 2, PF_WORKER_READY), -EINVAL);
    CHECK_EQ(pf_dispatcher_set_state(d, 1, PF_WORKER_READY), -ENOENT);
    CHECK_EQ(pf_dispatcher_remove_worker(d, 1), -ENOENT);
    CHECK_EQ(pf_dispatcher_remove_worker(d, 7), -EINVAL);
    CHECK_EQ(pf_dispatcher_worker_stats(d, 2, &ws), -EINVAL);
    CHECK_OK(pf_dispatcher_worker_stats(d, 1, &ws));
    CHECK_EQ(ws.state, PF_WORKER_FREE);
    CHECK_OK(pf_dispatcher_worker_stats(d, 0, &ws));
    CHECK_EQ(ws.state, PF_WORKER_SPAWNING);

    CHECK_EQ(pf_dispatcher_run(d, 0, NULL, 1), -EINVAL);
    CHECK_EQ(pf_dispatcher_run(d, 0, ev, 0), -EINVAL);
    CHECK_EQ(pf_dispatcher_run(d, -2, ev, 1), -EINVAL);
    CHECK_EQ(pf_dispatcher_run(d, 0, ev, 1), 0);     /* nothing to report */
    CHECK_EQ(pf_dispatcher_run(d, 20, ev, 1), 0);    /* a timeout is 0 */

    pf_dispatcher_free(d);
    pf_dispatcher_free(NULL);
    close(sv[1]);
    close(pfd[0]);
    close(pfd[1]);
    close(l1);
    close(l2);
    close(l3);
    CHECK_EQ(count_fds(), base);
}

static void test_rr_order(void)
{
    struct disp_fx f;
    int ids[3][8], n[3] = {0, 0, 0}, cl[6];
    pf_worker_stats ws;

    fx_setup(&f, 3, PF_POLICY_RR, 3, 1);
    clients_one_by_one(f.d, f.port, cl, 6);
    for (int s = 0; s < 3; s++) {
        worker_take(f.w[s], ids[s], &n[s]);
        CHECK_EQ(n[s], 2);
        CHECK_EQ(ids[s][0], s);
        CHECK_EQ(ids[s][1], s + 3);
        CHECK_OK(pf_dispatcher_worker_stats(f.d, s, &ws));
        CHECK_EQ(ws.state, PF_WORKER_READY);
        CHECK_EQ(ws.sent, 2);
        CHECK_EQ(ws.inflight, 2);
    }
    CHECK_EQ(stats(f.d).accepted, 6);
    CHECK_EQ(stats(f.d).pending, 0);
    CHECK_EQ(stats(f.d).accepting, 1);
    fx_teardown(&f, cl, 6);
}

static void test_least(void)
{
    struct disp_fx f;
    size_t size = 0;
    pf_slot *board;
    pf_dispatcher *d;
    uint64_t now;
    int *w, cl[7], port;

    fx_setup(&f, 3, PF_POLICY_LEAST, 3, 0);
    d = f.d;
    w = f.w;
    port = f.port;
    board = pf_dispatcher_scoreboard(d, &size);
    CHECK(board != NULL);
    CHECK_EQ(size, 3 * sizeof(pf_slot));
    /* All empty and idle: the lowest slot; then the emptiest each time. */
    CHECK_EQ(dispatch_one(d, port, w, 3, 0, &cl[0]), 0);
    CHECK_EQ(dispatch_one(d, port, w, 3, 1, &cl[1]), 1);
    CHECK_EQ(dispatch_one(d, port, w, 3, 2, &cl[2]), 2);
    /* Worker 1 closed its connection: it is the emptiest now. */
    board[1].closed = 1;
    CHECK_EQ(dispatch_one(d, port, w, 3, 3, &cl[3]), 1);
    /* All at 1 in flight, requests that have run for no time at all (start
     * times a minute ahead count as age 0, however slow this machine is):
     * the idle one wins the tie. */
    now = pf__now_ns() + pf__ms_to_ns(60000);
    board[0].busy_since_ns = now;
    board[1].busy_since_ns = now + pf__ms_to_ns(1);
    board[2].busy_since_ns = 0;
    CHECK_EQ(dispatch_one(d, port, w, 3, 4, &cl[4]), 2);
    /* 0 and 1 tie and both are busy: the most recent start wins. */
    CHECK_EQ(dispatch_one(d, port, w, 3, 5, &cl[5]), 1);
    /* Slot 0's request has run for 50 ms (10 x PF__LEAST_AGE_MS): with 1 in
     * flight it scores 11 and loses to slots 1 and 2 with 2 in flight each,
     * which look merely busy. A stuck worker stops getting connections. */
    board[1].busy_since_ns = board[2].busy_since_ns = 0;
    board[0].busy_since_ns = pf__now_ns() - pf__ms_to_ns(50);
    CHECK(dispatch_one(d, port, w, 3, 6, &cl[6]) != 0);
    fx_teardown(&f, cl, 7);
}

static void test_full_worker_backpressure(void)
{
    struct disp_fx f;
    pf_dispatcher *d;
    pf_slot *board;
    pf_event ev[4];
    pf_stats st;
    int *w, cl[5], port;
    uint64_t wakeups;

    fx_init(&f, 2, PF_POLICY_RR);
    f.c.max_inflight = 1;
    fx_start(&f, 2, 0);
    d = f.d;
    w = f.w;
    port = f.port;
    board = pf_dispatcher_scoreboard(d, NULL);
    CHECK_EQ(dispatch_one(d, port, w, 2, 0, &cl[0]), 0);
    CHECK_EQ(dispatch_one(d, port, w, 2, 1, &cl[1]), 1);

    /* Both full: the third connection is accepted, then held. */
    cl[2] = client(port, 2);
    run_until_accepted(d, 3);
    st = stats(d);
    CHECK_EQ(st.pending, 1);
    CHECK_EQ(st.accepting, 0);
    CHECK_EQ(st.dispatched, 2);
    CHECK(st.busy_skips >= 2);
    CHECK_EQ(board[0].want_credit, 1);
    CHECK_EQ(board[1].want_credit, 1);

    /* Listeners are out of the poll set: a new client stays in the backlog,
     * and waiting does not spin (10 ms rechecks: ~20 in 200 ms). */
    cl[3] = client(port, 3);
    wakeups = stats(d).wakeups;
    CHECK_EQ(pf_dispatcher_run(d, 200, ev, 4), 0);
    st = stats(d);
    CHECK_EQ(st.accepted, 3);
    CHECK(st.wakeups - wakeups < 100);

    /* Worker 1 closes one and sends CREDIT (as pyfork's scoreboard does). */
    board[1].closed = 1;
    board[1].want_credit = 0;
    send_credit(w[1]);
    run_until_dispatched(d, 3);
    take_one(w[1], 2);
    /* Ring empty -> listeners back -> the backlogged client is accepted and
     * stalls again (both full). The CREDIT was eaten: no MESSAGE event. */
    run_until_accepted(d, 4);
    CHECK_EQ(stats(d).pending, 1);

    /* A worker that closes without a CREDIT is found by the 10 ms recheck. */
    board[0].closed = 1;
    run_until_dispatched(d, 4);
    take_one(w[0], 3);
    /* Both full again, but nothing is held: listeners are polled. */
    CHECK_EQ(pf_dispatcher_run(d, 0, ev, 4), 0);
    CHECK_EQ(stats(d).accepting, 1);
    board[0].closed = 2;
    cl[4] = client(port, 4);
    run_until_dispatched(d, 5);
    CHECK_EQ(stats(d).accepting, 1);
    fx_teardown(&f, cl, 5);
}

/* A worker whose channel is full (sendmsg EAGAIN) is skipped until it reads. */
static void test_channel_eagain_skipped(void)
{
    struct disp_fx f;
    pf_dispatcher *d;
    static char big[60000];
    int sv[2], *w = f.w, cl[6], ids[8], n, filled = 0, port;

    fx_setup(&f, 2, PF_POLICY_RR, 0, 0);
    d = f.d;
    port = f.port;
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    set_nonblock(sv[0]);
    set_nonblock(sv[1]);
    while (pf_send_msg(sv[0], PF_MSG_USER, 0, big, sizeof(big), NULL, 0) == 0)
        filled++;
    CHECK(filled > 0);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_USER, 0, NULL, 0, NULL, 0), -EAGAIN);
    CHECK_OK(pf_dispatcher_add_worker(d, 0, sv[0], -1));
    CHECK_OK(pf_dispatcher_set_state(d, 0, PF_WORKER_READY));
    w[0] = sv[1];
    w[1] = add_worker(d, 1, 0, 1);
    f.nw = 2;

    for (int i = 0; i < 4; i++)
        CHECK_EQ(dispatch_one(d, port, w + 1, 1, i, &cl[i]), 0);   /* all to w[1] */
    CHECK(stats(d).busy_skips >= 1);

    /* Worker 0 catches up: EPOLLOUT unblocks it and rr serves it again. */
    for (int i = 0; i < filled; i++) {
        pf_msg_hdr h;
        CHECK_EQ(pf_recv_msg(w[0], &h, big, sizeof(big), NULL, 0), 0);
        CHECK_EQ(h.type, PF_MSG_USER);
    }
    /* Let EPOLLOUT be seen before any new connection; then rr's next turn
     * (after worker 1) is worker 0. */
    CHECK_EQ(pf_dispatcher_run(d, 50, (pf_event[4]){{0}}, 4), 0);
    CHECK_EQ(dispatch_one(d, port, w, 2, 4, &cl[4]), 0);
    CHECK_EQ(dispatch_one(d, port, w, 2, 5, &cl[5]), 1);
    n = 0;
    worker_take(w[0], ids, &n);
    CHECK_EQ(n, 0);
    fx_teardown(&f, cl, 6);
}

/* A worker that never reads is removed: its queued connections are
 * recovered through the peer end and reach the other workers. */
static void test_remove_redispatches(void)
{
    struct disp_fx f;
    pf_dispatcher *d;
    int *w = f.w, cl[6], ids[16], n = 0, seen = 0;
    pf_msg_hdr h;
    pf_stats st;

    fx_setup(&f, 3, PF_POLICY_RR, 3, 1);
    d = f.d;
    clients_one_by_one(d, f.port, cl, 6);
    /* Worker 0 has ids 0 and 3 queued, unread. */
    CHECK_EQ(pf_dispatcher_remove_worker(d, 0), 2);
    run_until_dispatched(d, 8);
    st = stats(d);
    CHECK_EQ(st.redispatched, 2);
    CHECK_EQ(st.dropped, 0);
    CHECK_EQ(st.pending, 0);
    worker_take(w[1], ids, &n);
    worker_take(w[2], ids, &n);
    CHECK_EQ(n, 6);
    for (int i = 0; i < n; i++)
        seen |= 1 << ids[i];
    CHECK_EQ(seen, 0x3f);                   /* none lost, none twice */
    /* Emptied, and the channel is closed. */
    CHECK_EQ(pf_recv_msg(w[0], &h, NULL, 0, NULL, 0), -EPIPE);
    CHECK_EQ(pf_dispatcher_remove_worker(d, 0), -ENOENT);
    fx_teardown(&f, cl, 6);
}

/* stop_accepting: the backlog is accepted to EAGAIN, everything is sent,
 * DRAINED comes once, and later clients are not accepted. */
static void test_stop_accepting_drains(void)
{
    struct disp_fx f;
    pf_dispatcher *d;
    pf_slot *board;
    pf_event ev[4];
    int w, port, cl[6], ids[16], n = 0, got_drained = 0;

    fx_init(&f, 1, PF_POLICY_RR);
    f.c.max_inflight = 2;   /* the drain must wait for credit on the way */
    fx_start(&f, 1, 0);
    d = f.d;
    w = f.w[0];
    port = f.port;
    board = pf_dispatcher_scoreboard(d, NULL);
    for (int i = 0; i < 5; i++)
        cl[i] = client(port, (unsigned char)i);      /* all in the backlog */
    CHECK_OK(pf_dispatcher_stop_accepting(d));
    CHECK_OK(pf_dispatcher_stop_accepting(d));       /* idempotent */
    CHECK_EQ(stats(d).accepting, 0);
    /* Two fit; the rest wait for the worker: no DRAINED yet. */
    CHECK_EQ(pf_dispatcher_run(d, 100, ev, 4), 0);
    CHECK_EQ(stats(d).dispatched, 2);
    while (n < 5) {
        int k = pf_dispatcher_run(d, 50, ev, 4);
        CHECK_OK(k);
        for (int i = 0; i < k; i++)
            got_drained += ev[i].type == PF_EV_DRAINED;
        worker_take(w, ids, &n);
        board[0].closed = (uint64_t)n;
        if (board[0].want_credit) {
            board[0].want_credit = 0;
            send_credit(w);
        }
    }
    while (!got_drained) {
        int k = pf_dispatcher_run(d, 1000, ev, 4);
        CHECK(k == 1);
        CHECK_EQ(ev[0].type, PF_EV_DRAINED);
        CHECK_EQ(ev[0].slot, -1);
        got_drained++;
    }
    CHECK_EQ(got_drained, 1);
    for (int i = 0; i < 5; i++)
        CHECK_EQ(ids[i], i);
    CHECK_EQ(stats(d).accepted, 5);
    CHECK_EQ(stats(d).pending, 0);
    /* After the drain: nothing new is accepted, DRAINED never repeats. */
    cl[5] = client(port, 5);
    CHECK_EQ(pf_dispatcher_run(d, 50, ev, 4), 0);
    CHECK_EQ(stats(d).accepted, 5);
    CHECK_EQ(stats(d).accepting, 0);
    fx_close(&f, cl, 6);

    /* No listeners at all: DRAINED at once. */
    d = new_disp(&f.c);
    CHECK_OK(pf_dispatcher_stop_accepting(d));
    CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 4), 1);
    CHECK_EQ(ev[0].type, PF_EV_DRAINED);
    CHECK_EQ(pf_dispatcher_run(d, 0, ev, 4), 0);
    pf_dispatcher_free(d);
    CHECK_EQ(count_fds(), f.base);
}

/* Watched fds, worker messages (CREDIT eaten, others left unread), hangups. */
static void test_events(void)
{
    int base = count_fds();
    pf_config c = base_config(2, PF_POLICY_RR);
    pf_dispatcher *d = new_disp(&c);
    pf_event ev[4];
    pf_msg_hdr h;
    pf_worker_stats ws;
    char buf[16], b;
    int pfd[2], w0, w1, chan0, chan1;

    CHECK(pipe(pfd) == 0);
    CHECK_OK(pf_dispatcher_watch(d, pfd[0], 77));
    CHECK(write(pfd[1], "x", 1) == 1);
    for (int round = 0; round < 2; round++) {      /* level-triggered */
        CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 4), 1);
        CHECK_EQ(ev[0].type, PF_EV_WATCH);
        CHECK_EQ(ev[0].tag, 77);
        CHECK_EQ(ev[0].slot, -1);
    }
    CHECK(read(pfd[0], &b, 1) == 1);
    CHECK_EQ(pf_dispatcher_run(d, 0, ev, 4), 0);

    w0 = add_worker_chan(d, 0, 0, 0, &chan0);
    w1 = add_worker_chan(d, 1, 0, 0, &chan1);
    CHECK_OK(pf_dispatcher_worker_stats(d, 0, &ws));
    CHECK_EQ(ws.state, PF_WORKER_SPAWNING);
    /* CREDIT is the dispatcher's own business. */
    send_credit(w0);
    send_credit(w0);
    CHECK_EQ(pf_dispatcher_run(d, 20, ev, 4), 0);
    /* Anything else is reported and left unread until the caller reads it. */
    CHECK_OK(pf_send_msg(w0, PF_MSG_READY, 9, "hi", 2, NULL, 0));
    for (int round = 0; round < 2; round++) {
        CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 4), 1);
        CHECK_EQ(ev[0].type, PF_EV_MESSAGE);
        CHECK_EQ(ev[0].slot, 0);
    }
    /* The caller reads it from the channel. */
    CHECK_EQ(pf_recv_msg(chan0, &h, buf, sizeof(buf), NULL, 0), 0);
    CHECK_EQ(h.type, PF_MSG_READY);
    CHECK_EQ(h.arg, 9);
    CHECK_EQ(pf_dispatcher_run(d, 0, ev, 4), 0);
    CHECK_OK(pf_dispatcher_set_state(d, 0, PF_WORKER_READY));

    /* max_ev bounds one run; the rest come next time. */
    CHECK(write(pfd[1], "x", 1) == 1);
    CHECK_OK(pf_send_msg(w1, PF_MSG_USER, 0, "{}", 2, NULL, 0));
    CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 1), 1);
    CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 4), 2);
    CHECK(read(pfd[0], &b, 1) == 1);
    CHECK_OK(pf_recv_msg(chan1, &h, buf, sizeof(buf), NULL, 0));

    /* A message sent just before the worker exits is delivered first, then
     * the hangup, once; the slot is GONE. */
    CHECK_OK(pf_send_msg(w0, PF_MSG_CTL, 0, "{}", 2, NULL, 0));
    close(w0);
    CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 4), 1);
    CHECK_EQ(ev[0].type, PF_EV_MESSAGE);
    CHECK_OK(pf_recv_msg(chan0, &h, buf, sizeof(buf), NULL, 0));
    CHECK_EQ(pf_dispatcher_run(d, 1000, ev, 4), 1);
    CHECK_EQ(ev[0].type, PF_EV_HANGUP);
    CHECK_EQ(ev[0].slot, 0);
    CHECK_EQ(pf_dispatcher_run(d, 20, ev, 4), 0);
    CHECK_OK(pf_dispatcher_worker_stats(d, 0, &ws));
    CHECK_EQ(ws.state, PF_WORKER_GONE);
    CHECK_EQ(pf_dispatcher_set_state(d, 0, PF_WORKER_READY), -EPIPE);
    CHECK_OK(pf_dispatcher_set_state(d, 0, PF_WORKER_DRAINING));
    CHECK_EQ(pf_dispatcher_remove_worker(d, 0), 0);
    CHECK_OK(pf_dispatcher_worker_stats(d, 0, &ws));
    CHECK_EQ(ws.state, PF_WORKER_FREE);
    CHECK_OK(pf_dispatcher_unwatch(d, pfd[0]));
    pf_dispatcher_free(d);
    close(w1);
    close(pfd[0]);
    close(pfd[1]);
    CHECK_EQ(count_fds(), base);
}

/* A worker that died (no peer held) before we noticed: sendmsg says EPIPE or
 * epoll says HUP; either way the connection goes to the other worker. */
static void test_dead_worker_skipped(void)
{
    struct disp_fx f;
    int cl[3], ids[4], n = 0;
    pf_worker_stats ws;

    fx_setup(&f, 2, PF_POLICY_RR, 2, 0);
    close(f.w[0]);
    f.w[0] = -1;                            /* fx_teardown skips it */
    for (int i = 0; i < 3; i++)
        cl[i] = client(f.port, (unsigned char)i);
    run_until_dispatched(f.d, 3);
    worker_take(f.w[1], ids, &n);
    CHECK_EQ(n, 3);
    /* (The HANGUP event itself may have gone by inside the runs above.) */
    CHECK_OK(pf_dispatcher_worker_stats(f.d, 0, &ws));
    CHECK_EQ(ws.state, PF_WORKER_GONE);
    CHECK_OK(pf_dispatcher_remove_worker(f.d, 0));
    fx_teardown(&f, cl, 3);
}

/* Many connections through, in waves; the fd count comes back. */
static void test_many_no_leak(void)
{
    struct disp_fx f;
    int cl[40], ids[64], total = 0;

    fx_setup(&f, 2, PF_POLICY_RR, 2, 1);
    for (int wave = 0; wave < 25; wave++) {
        int n = 0;
        for (int i = 0; i < 40; i++)
            cl[i] = client(f.port, (unsigned char)i);
        run_until_dispatched(f.d, (uint64_t)total + 40);
        worker_take(f.w[0], ids, &n);
        worker_take(f.w[1], ids, &n);
        CHECK_EQ(n, 40);
        total += n;
        close_all(cl, 40);
    }
    CHECK_EQ(stats(f.d).accepted, 1000);
    CHECK_EQ(stats(f.d).dispatched, 1000);
    fx_teardown(&f, NULL, 0);
}

/* Two dispatchers in one process do not share anything (no globals). */
static void test_two_dispatchers(void)
{
    int base = count_fds(), p1, p2, l1 = tcp_listener(&p1), l2 = tcp_listener(&p2);
    pf_config c = base_config(1, PF_POLICY_RR);
    pf_dispatcher *d1 = new_disp(&c), *d2 = new_disp(&c);
    int w1, w2, c1, c2, ids[2], n1 = 0, n2 = 0;

    CHECK(pf_dispatcher_scoreboard(d1, NULL) != pf_dispatcher_scoreboard(d2, NULL));
    CHECK_OK(pf_dispatcher_add_listener(d1, l1));
    CHECK_OK(pf_dispatcher_add_listener(d2, l2));
    w1 = add_worker(d1, 0, 0, 1);
    w2 = add_worker(d2, 0, 0, 1);
    c1 = client(p1, 1);
    c2 = client(p2, 2);
    run_until_dispatched(d1, 1);
    run_until_dispatched(d2, 1);
    worker_take(w1, ids, &n1);
    worker_take(w2, ids + 1, &n2);
    CHECK(n1 == 1 && n2 == 1 && ids[0] == 1 && ids[1] == 2);
    pf_dispatcher_free(d1);
    pf_dispatcher_free(d2);
    close(w1); close(w2); close(c1); close(c2); close(l1); close(l2);
    CHECK_EQ(count_fds(), base);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_bad_args), PF_CASE(test_rr_order), PF_CASE(test_least),
    PF_CASE(test_full_worker_backpressure), PF_CASE(test_channel_eagain_skipped),
    PF_CASE(test_remove_redispatches), PF_CASE(test_stop_accepting_drains),
    PF_CASE(test_events), PF_CASE(test_dead_worker_skipped), PF_CASE(test_many_no_leak),
    PF_CASE(test_two_dispatchers),
};

int main(int argc, char **argv)
{
    /* A forked worker may answer a client that already gave up; the primary
     * side never needs this (pf_send_msg uses MSG_NOSIGNAL). */
    signal(SIGPIPE, SIG_IGN);
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
