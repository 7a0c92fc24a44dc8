/* dispatch_util.h -- helpers shared by test_dispatch.c and test_dispatch_fork.c.
 *
 * Theory of operation: real loopback TCP clients that each write one id byte,
 * a listener, workers that are just the test's end of a SOCK_SEQPACKET pair
 * (or a forked process answering a tag byte), and run-until helpers bounded
 * by a generous liveness timeout (no timing assertions). Header-only, all
 * static inline: each test file is its own executable.
 */
#ifndef PF_DISPATCH_UTIL_H
#define PF_DISPATCH_UTIL_H

#define _GNU_SOURCE
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pf_clock.h"
#include "pf_test.h"
#include "pyfork.h"

#define LIVENESS_MS 10000   /* generous: a 2-core machine shared by others */

/* The highest fd this process has open. */
static inline int max_fd(void)
{
    int hi;
    pf_scan_fds(&hi);
    return hi;
}

/* The core's clock (pf_clock.h), in ms. */
static inline uint64_t now_ms(void)
{
    return pf__now_ns() / PF__NS_PER_MS;
}

static inline void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    CHECK(fl >= 0 && fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0);
}

/* A non-blocking TCP listener on 127.0.0.1, ephemeral port. */
static inline int tcp_listener(int *port)
{
    struct sockaddr_in sa;
    socklen_t len = sizeof(sa);
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    CHECK(fd >= 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    CHECK(listen(fd, 128) == 0);
    CHECK(getsockname(fd, (struct sockaddr *)&sa, &len) == 0);
    *port = ntohs(sa.sin_port);
    return fd;
}

/* A client that is connected (in the listener's backlog) and has sent id. */
static inline int client(int port, unsigned char id)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    CHECK(fd >= 0);
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = htons((uint16_t)port);
    CHECK(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    CHECK(write(fd, &id, 1) == 1);
    return fd;
}

static inline pf_config base_config(int capacity, int policy)
{
    pf_config c;

    memset(&c, 0, sizeof(c));
    c.capacity = capacity;
    c.policy = policy;
    c.max_inflight = 1000;
    c.max_listeners = 4;
    c.max_watch = 4;
    c.max_pending = 64;
    c.accept_batch = 32;
    c.emfile_pause_ms = 20;
    return c;
}

static inline pf_dispatcher *new_disp(const pf_config *c)
{
    pf_dispatcher *d = NULL;
    CHECK_OK(pf_dispatcher_new(c, &d));
    CHECK(d != NULL);
    return d;
}

/* Adds a worker to slot; returns the test's (non-blocking) worker end and,
 * in *chan if not NULL, the primary end the dispatcher now owns (the caller
 * still reads messages from it by number, as the arbiter does). With
 * keep_peer the dispatcher holds a dup of the worker end, as pyfork does. */
static inline int add_worker_chan(pf_dispatcher *d, int slot, int keep_peer, int ready, int *chan)
{
    int sv[2], peer = -1;

    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    set_nonblock(sv[1]);
    if (keep_peer)
        CHECK((peer = dup(sv[1])) >= 0);
    CHECK_OK(pf_dispatcher_add_worker(d, slot, sv[0], peer));
    if (ready)
        CHECK_OK(pf_dispatcher_set_state(d, slot, PF_WORKER_READY));
    if (chan != NULL)
        *chan = sv[0];
    return sv[1];
}

static inline int add_worker(pf_dispatcher *d, int slot, int keep_peer, int ready)
{
    return add_worker_chan(d, slot, keep_peer, ready, NULL);
}

static inline pf_stats stats(pf_dispatcher *d)
{
    pf_stats st;
    CHECK_OK(pf_dispatcher_stats(d, &st));
    return st;
}

/* Runs until the uint64_t pf_stats field at offset off reaches n; fails
 * after LIVENESS_MS. */
static inline void run_until_stat(pf_dispatcher *d, size_t off, uint64_t n)
{
    pf_event ev[8];
    uint64_t t0 = now_ms();

    for (;;) {
        pf_stats st = stats(d);
        uint64_t v;

        memcpy(&v, (const char *)&st + off, sizeof(v));
        if (v >= n)
            return;
        CHECK(now_ms() - t0 < LIVENESS_MS);
        CHECK_OK(pf_dispatcher_run(d, 20, ev, 8));
    }
}

/* Runs until `dispatched` reaches n; fails after LIVENESS_MS. */
static inline void run_until_dispatched(pf_dispatcher *d, uint64_t n)
{
    run_until_stat(d, offsetof(pf_stats, dispatched), n);
}

/* Runs until `accepted` reaches n; fails after LIVENESS_MS. */
static inline void run_until_accepted(pf_dispatcher *d, uint64_t n)
{
    run_until_stat(d, offsetof(pf_stats, accepted), n);
}

/* Reads the id byte a client sent on a connection a worker received. */
static inline int read_id(int fd)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    unsigned char id;

    CHECK(poll(&p, 1, LIVENESS_MS) == 1);
    CHECK(read(fd, &id, 1) == 1);
    return id;
}

/* Worker side: receives every queued CONN on wend (non-blocking), stores
 * the client ids in ids[] (from *n on), closes the connections. */
static inline void worker_take(int wend, int *ids, int *n)
{
    for (;;) {
        pf_msg_hdr h;
        int fds[PF_MAX_FDS];
        int k = pf_recv_msg(wend, &h, NULL, 0, fds, PF_MAX_FDS);

        if (k == -EAGAIN)
            return;
        CHECK_OK(k);
        CHECK_EQ(h.type, PF_MSG_CONN);
        CHECK(k >= 1);
        for (int i = 0; i < k; i++) {
            int one = 0;
            socklen_t len = sizeof(one);
            /* TCP_NODELAY was set by the primary on every accepted socket. */
            CHECK(getsockopt(fds[i], IPPROTO_TCP, TCP_NODELAY, &one, &len) == 0);
            CHECK_EQ(one, 1);
            ids[(*n)++] = read_id(fds[i]);
            close(fds[i]);
        }
    }
}

/* Closes fds[0..n), skipping any already marked closed with -1. */
static inline void close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

static inline int dispatch_one(pf_dispatcher *d, int port, const int *w, int nw, int id, int *cl)
{
    uint64_t before = stats(d).dispatched;

    *cl = client(port, (unsigned char)id);
    run_until_dispatched(d, before + 1);
    for (int s = 0; s < nw; s++) {
        int ids[PF_MAX_FDS], n = 0;
        worker_take(w[s], ids, &n);
        if (n > 0) {
            CHECK_EQ(n, 1);
            CHECK_EQ(ids[0], id);
            return s;
        }
    }
    CHECK(!"dispatched connection reached no worker");
    return -1;
}

static inline void send_credit(int wend)
{
    CHECK_OK(pf_send_msg(wend, PF_MSG_CREDIT, 1, NULL, 0, NULL, 0));
}

/* Worker side: checks exactly one connection is queued on wend, from client id. */
static inline void take_one(int wend, int id)
{
    int ids[PF_MAX_FDS], n = 0;

    worker_take(wend, ids, &n);
    CHECK_EQ(n, 1);
    CHECK_EQ(ids[0], id);
}

/* Connects clients 0..n-1 into cl[], one at a time, each dispatched before
 * the next (so one dispatch pass sees one fd); d has dispatched none yet. */
static inline void clients_one_by_one(pf_dispatcher *d, int port, int *cl, int n)
{
    for (int i = 0; i < n; i++) {
        cl[i] = client(port, (unsigned char)i);
        run_until_dispatched(d, (uint64_t)i + 1);
    }
}

/* ---- fixture: listener + dispatcher + worker ends ------------------------- */

#define FX_MAX_W 4

struct disp_fx {
    int base;               /* count_fds() before anything was opened */
    int port, lfd;          /* the loopback listener */
    pf_config c;            /* the config fx_start uses */
    pf_dispatcher *d;
    int w[FX_MAX_W], nw;    /* the test's worker ends, closed by fx_close */
};

/* Records the fd count, opens the listener, fills f->c (tweak before fx_start). */
static inline void fx_init(struct disp_fx *f, int capacity, int policy)
{
    memset(f, 0, sizeof(*f));
    f->base = count_fds();
    f->lfd = tcp_listener(&f->port);
    f->c = base_config(capacity, policy);
}

/* Creates the dispatcher from f->c, adds the listener, and nw ready workers
 * in slots 0..nw-1 (keep_peer as for add_worker). */
static inline void fx_start(struct disp_fx *f, int nw, int keep_peer)
{
    CHECK(nw <= FX_MAX_W);
    f->d = new_disp(&f->c);
    CHECK_OK(pf_dispatcher_add_listener(f->d, f->lfd));
    for (int s = 0; s < nw; s++)
        f->w[s] = add_worker(f->d, s, keep_peer, 1);
    f->nw = nw;
}

/* fx_init with the default config, then fx_start. */
static inline void fx_setup(struct disp_fx *f, int capacity, int policy, int nw, int keep_peer)
{
    fx_init(f, capacity, policy);
    fx_start(f, nw, keep_peer);
}

/* Frees the dispatcher, closes the worker ends, the ncl clients and the listener. */
static inline void fx_close(struct disp_fx *f, const int *cl, int ncl)
{
    pf_dispatcher_free(f->d);
    close_all(f->w, f->nw);
    close_all(cl, ncl);
    close(f->lfd);
}

/* fx_close, then checks the fd count is back to where fx_init found it. */
static inline void fx_teardown(struct disp_fx *f, const int *cl, int ncl)
{
    fx_close(f, cl, ncl);
    CHECK_EQ(count_fds(), f->base);
}

/* ---- worker processes ------------------------------------------------------ */

static inline void worker_main(int wend, char tag)
{
    for (;;) {
        pf_msg_hdr h;
        int fds[PF_MAX_FDS];
        int k = pf_recv_msg(wend, &h, NULL, 0, fds, PF_MAX_FDS);

        if (k == -EINTR)
            continue;
        if (k < 0 || h.type == PF_MSG_DRAIN)
            _exit(k < 0 && k != -EPIPE ? 1 : 0);
        for (int i = 0; i < k; i++) {
            read_id(fds[i]);
            if (write(fds[i], &tag, 1) != 1)
                _exit(2);
            close(fds[i]);
        }
    }
}

static inline pid_t spawn_worker(int sv[2], char tag, int lfd)
{
    pid_t pid = fork();

    CHECK(pid >= 0);
    if (pid == 0) {
        close(sv[0]);
        close(lfd);
        worker_main(sv[1], tag);
    }
    close(sv[1]);
    return pid;
}

/* Connect n clients at once, each sends a byte; returns how many got an
 * answer byte back (stored in tags[]). */
static inline int clients_roundtrip(int port, int n, char *tags)
{
    int cl[64], served = 0;

    CHECK(n <= 64);
    for (int i = 0; i < n; i++)
        cl[i] = client(port, (unsigned char)i);
    for (int i = 0; i < n; i++) {
        struct pollfd p = { .fd = cl[i], .events = POLLIN };
        if (poll(&p, 1, 20000) == 1 && read(cl[i], &tags[i], 1) == 1)
            served++;
        close(cl[i]);
    }
    return served;
}

#endif
