/* dispatch_loop.c -- pf_dispatcher_run: the primary's hot loop.
 *
 * Theory of operation: each turn of the loop first does the bookkeeping that
 * does not need the kernel to tell us anything (pf__tick: expire the EMFILE
 * pause, retry transient send failures, take back prefetched connections,
 * flush pending fds, withdraw CREDIT requests once nothing waits, the
 * stop/drain pass, put listeners in or out of the poll set, owe
 * HANGUP/DRAINED events),
 * returns if any event is owed, and otherwise sleeps in epoll_wait for
 * exactly as long as the earliest of: the caller's deadline, the EMFILE
 * pause end, the 10 ms recheck while fds are stalled, the next take-back of
 * prefetched connections (dispatch_send.c). Readiness is handled
 * per kind:
 *   listener   accept4 until EAGAIN or accept_batch, then flush to workers;
 *   channel    EPOLLOUT clears "busy"; CREDIT messages are eaten here, PARK
 *              messages parked (park.c); any other message is left unread
 *              and reported; EOF = HANGUP;
 *   parked     a parked connection's next request: to the ring (park.c);
 *   watch      reported with the caller's tag.
 * Everything is level-triggered, so anything we leave (a full event array,
 * an unread message, a listener over its batch) simply comes back next turn.
 * Back-pressure: listeners are in the poll set only while nothing is stalled
 * in the ring, so at most accept_batch (<= max_pending) fds are ever held
 * and the kernel backlog carries the rest.
 * Pure twin: pyfork/_pure/dispatch_loop.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "pf_internal.h"

/* Bound on CREDIT messages eaten per channel wakeup, so a chatty worker
 * cannot starve the others (level-triggered: the rest come next turn). A
 * worker sends at most one CREDIT per want_credit we set (a flush or a
 * rescue look), so 64 queued is already a worker misbehaving. */
#define PF__CREDITS_PER_WAKEUP 64

enum { PF__ACC_AGAIN, PF__ACC_MORE, PF__ACC_PAUSE, PF__ACC_DEAD };

/* Queue an event for the caller; 0 when the array is full (the condition
 * is level-triggered or remembered, so it is reported next run). */
static int pf__emit(pf_dispatcher *d, int type, int slot, uint32_t tag)
{
    pf_event *e;

    if (d->out == NULL || d->nout >= d->maxout)
        return 0;
    e = &d->out[d->nout++];
    e->type = type;
    e->slot = slot;
    e->tag = tag;
    e->reserved = 0;
    return 1;
}

/* ---- accept ---------------------------------------------------------------- */

static void pf__pause(pf_dispatcher *d)
{
    d->pause_until_ns = pf__now_ns() + pf__ms_to_ns((uint64_t)d->cfg.emfile_pause_ms);
}

static int pf__accept_fd(int lfd)
{
    int fd;

    do
        fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    while (fd < 0 && errno == EINTR);
    return fd;
}

/* A new connection is ours: Nagle off for TCP (a small response written in
 * two parts would wait for the peer's delayed ACK, TCP_DELACK_MIN = 40 ms on
 * Linux; on Linux the fd inherited it from the listener, see add_listener),
 * then hold it until sent. */
static void pf__took(pf_dispatcher *d, const pf__listener *l, int fd)
{
    int one = 1;

    if (l->nodelay_each)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    pf__pend_push(d, fd, 0);    /* callers checked there is room */
    d->st.accepted++;
}

static void pf__reserve_open(pf_dispatcher *d)
{
    if (d->reserve_fd < 0 && d->reserve_wanted)
        d->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
}

/* EMFILE/ENFILE (libuv's uv__emfile_trick): with nothing in hand to free,
 * spend the reserve fd to accept ONE connection so the client at the head
 * of the backlog is served rather than left hanging, then pause the
 * listeners so a level-triggered listener cannot spin us while no fd is
 * free. With fds in hand, sending them frees fds; the pause still applies. */
static void pf__on_emfile(pf_dispatcher *d, const pf__listener *l)
{
    int fd;

    d->st.fd_exhaustion++;
    if (d->pcount == 0 && d->reserve_fd >= 0) {
        close(d->reserve_fd);
        d->reserve_fd = -1;
        fd = pf__accept_fd(l->fd);
        if (fd >= 0) {
            pf__took(d, l, fd);
            pf__flush(d);       /* our copy closes once a worker has it */
        }
        pf__reserve_open(d);    /* may fail while the fd is held: retried */
    }
    pf__pause(d);
}

/* Accepts up to budget connections (fewer when the ring fills). accept(2):
 * "Linux accept() passes already-pending network errors on the new socket
 * as an error code from accept() ... treat them like EAGAIN by retrying". */
static int pf__accept_some(pf_dispatcher *d, pf__listener *l, int budget)
{
    for (int i = 0; i < budget; i++) {
        int fd;

        if (d->pcount >= d->cfg.max_pending)
            return PF__ACC_MORE;
        fd = pf__accept_fd(l->fd);
        if (fd >= 0) {
            pf__took(d, l, fd);
            continue;
        }
        switch (errno) {
        case EAGAIN:
            return PF__ACC_AGAIN;
        case EMFILE:
        case ENFILE:
            pf__on_emfile(d, l);
            return PF__ACC_PAUSE;
        case ECONNABORTED: case EPROTO: case EPERM: case ENETDOWN:
        case ENOPROTOOPT: case EHOSTDOWN: case ENONET: case EHOSTUNREACH:
        case EOPNOTSUPP: case ENETUNREACH: case ETIMEDOUT:
            d->st.accept_errors++;
            continue;
        case EBADF: case EINVAL: case ENOTSOCK: case EFAULT:
            /* Not a listening socket any more (closed, shut down): polling
             * it again would report the same error forever. */
            d->st.accept_errors++;
            l->dead = 1;
            return PF__ACC_DEAD;
        default:
            /* ENOBUFS, ENOMEM: retrying at once would spin. */
            d->st.accept_errors++;
            pf__pause(d);
            return PF__ACC_PAUSE;
        }
    }
    return PF__ACC_MORE;
}

static void pf__on_listener(pf_dispatcher *d, int fd)
{
    int i = pf__listener_index(d, fd);
    pf__listener *l = i < 0 ? NULL : &d->listeners[i];

    /* Left the poll set earlier in this batch (pause, stall): not now. */
    if (l == NULL || !l->in_poll || !d->accepting)
        return;
    if (d->pull_on && d->pcount == 0 && pf__pull_start(d)) {
        d->accepting = 0;       /* nobody can start it: the workers accept */
        return;
    }
    pf__accept_some(d, l, d->cfg.accept_batch);
    pf__flush(d);
    /* Stalled or paused: the other listeners in this batch wait too (the
     * poll set itself is updated by the next tick). */
    if (d->pcount > 0 || d->pause_until_ns != 0)
        d->accepting = 0;
}

/* ---- listeners in and out of the poll set ----------------------------------- */

static void pf__listener_poll(pf_dispatcher *d, pf__listener *l, int on)
{
    if (on && !l->in_poll && !l->dead) {
        /* Fails only if the caller closed the fd without removing it. */
        if (pf__poll_ctl(d, EPOLL_CTL_ADD, l->fd, EPOLLIN, PF__K_LISTENER, l->fd) == 0)
            l->in_poll = 1;
    } else if ((!on || l->dead) && l->in_poll) {
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, l->fd, NULL);
        l->in_poll = 0;
    }
}

/* Listeners are polled only while nothing waits for a worker (back-pressure),
 * outside an EMFILE pause and a pull, and never once stop_accepting was called. */
static void pf__sync_listeners(pf_dispatcher *d)
{
    d->accepting = !d->stopping && !d->pulling && d->pause_until_ns == 0 && d->pcount == 0;
    for (int i = 0; i < d->nlisteners; i++)
        pf__listener_poll(d, &d->listeners[i], d->accepting);
}

/* One stop_accepting pass: accept each listener's backlog to EAGAIN (as far
 * as the ring allows), flush; DRAINED once all are empty and nothing is held:
 * not in the ring, not parked (stopping sends every parked connection back
 * through the ring, in turns when there are more than it holds). */
static void pf__drain_step(pf_dispatcher *d)
{
    int done = 1;

    if (d->pause_until_ns != 0)
        return;
    for (int i = 0; i < d->nlisteners; i++) {
        pf__listener *l = &d->listeners[i];
        int r;

        if (l->at_eagain || l->dead)
            continue;
        r = pf__accept_some(d, l, d->cfg.max_pending);
        pf__flush(d);
        if (r == PF__ACC_AGAIN || r == PF__ACC_DEAD)
            l->at_eagain = 1;
        else
            done = 0;
    }
    if (done && d->pcount == 0 && !pf__park_waiting(d)) {
        d->drained = 1;
        d->drained_unreported = 1;
    } else if (!done && d->pcount < d->cfg.max_pending && d->pause_until_ns == 0) {
        d->more = 1;            /* backlog left and room for it: no sleep */
    }
}

/* ---- worker channels --------------------------------------------------------- */

/* Reads and discards one CREDIT message (it only means "look again"). Any
 * fds a confused worker attached are closed; pf_recv_msg closes them on
 * error, and a SEQPACKET recv consumes the datagram either way. */
static void pf__eat_credit(int chan)
{
    pf_msg_hdr h;
    int fds[PF_MAX_FDS];
    int n = pf_recv_msg(chan, &h, NULL, 0, fds, PF_MAX_FDS);

    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* Channel readable or hung up: eat CREDITs, report the first other message
 * (left unread for the caller's pf_recv_msg), or report the hangup once all
 * data before the EOF was read (a READY then exit is still delivered). */
static void pf__read_chan(pf_dispatcher *d, int slot)
{
    pf__worker *w = &d->workers[slot];

    for (int i = 0; i < PF__CREDITS_PER_WAKEUP; i++) {
        pf_msg_hdr h;
        ssize_t n;

        do
            n = recv(w->chan, &h, sizeof(h), MSG_PEEK | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == ENOMEM || errno == ENOBUFS))
            return;
        if (n <= 0) {
            /* EOF (no datagram is empty: the header is 16 bytes) or a socket
             * error such as ECONNRESET: the worker is gone. */
            pf__mark_gone(d, slot);
            return;
        }
        if ((size_t)n == sizeof(h) && h.magic == PF_MSG_MAGIC && h.type == PF_MSG_CREDIT) {
            pf__eat_credit(w->chan);
            continue;
        }
        if ((size_t)n == sizeof(h) && h.magic == PF_MSG_MAGIC && h.type == PF_MSG_PARK) {
            pf__park_recv(d, slot);
            continue;
        }
        pf__emit(d, PF_EV_MESSAGE, slot, 0);
        return;
    }
}

static void pf__on_chan(pf_dispatcher *d, int slot, uint32_t events)
{
    pf__worker *w;

    if (slot < 0 || slot >= d->cfg.capacity)
        return;
    w = &d->workers[slot];
    if (!w->in_epoll)
        return;                 /* went GONE earlier in this batch */
    if ((events & EPOLLOUT) && w->out_armed) {
        if (w->blocked == PF__BLK_OUT)
            w->blocked = PF__BLK_NONE;
        pf__chan_events(d, slot, 0);
    }
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        pf__read_chan(d, slot);
}

/* ---- watches ----------------------------------------------------------------- */

static void pf__on_watch(pf_dispatcher *d, int fd)
{
    int i = pf__watch_index(d, fd);

    if (i >= 0)
        pf__emit(d, PF_EV_WATCH, -1, d->watches[i].tag);
}

static void pf__on_event(pf_dispatcher *d, const struct epoll_event *ev)
{
    uint32_t kind = (uint32_t)(ev->data.u64 >> 32);
    int id = (int)(uint32_t)ev->data.u64;

    if (kind == PF__K_LISTENER)
        pf__on_listener(d, id);
    else if (kind == PF__K_WORKER)
        pf__on_chan(d, id, ev->events);
    else if (kind == PF__K_WATCH)
        pf__on_watch(d, id);
    else if (kind == PF__K_PARK)
        pf__park_on_event(d, id, ev->events);
}

/* ---- the loop -------------------------------------------------------------- */

/* HANGUP and DRAINED are remembered, not level-triggered: emit what fits. */
static void pf__emit_owed(pf_dispatcher *d)
{
    for (int s = 0; s < d->hi && d->n_hup > 0; s++) {
        pf__worker *w = &d->workers[s];

        if (w->hup_pending && pf__emit(d, PF_EV_HANGUP, s, 0)) {
            w->hup_pending = 0;
            d->n_hup--;
        }
    }
    if (d->drained_unreported && pf__emit(d, PF_EV_DRAINED, -1, 0))
        d->drained_unreported = 0;
}

static void pf__tick(pf_dispatcher *d, uint64_t now)
{
    d->more = 0;
    if (d->recheck_ns != 0 && now >= d->recheck_ns)
        pf__clear_retry(d);
    if (d->pause_until_ns != 0 && now >= d->pause_until_ns)
        d->pause_until_ns = 0;
    pf__take_back_due(d, now);
    pf__park_tick(d, now);
    if (d->pcount > 0)
        pf__flush(d);
    if (pf__park_waiting(d)) {
        /* They move in pf__park_tick, which ran before this flush made
         * room: look again at once rather than at the next event. */
        if (d->pcount < d->cfg.max_pending)
            d->more = 1;
    } else if (d->pcount == 0 && !d->rescue_wait) {
        pf__forget_credits(d);
    }
    pf__reserve_open(d);        /* after the flush freed what it could */
    if (d->pulling && (d->stopping || d->pcount > 0 || pf__park_waiting(d) || pf__pull_over(d, now)))
        pf__pull_end(d);
    if (d->stopping && !d->drained)
        pf__drain_step(d);
    pf__sync_listeners(d);
    pf__emit_owed(d);
}

/* ns from now until t (0 when due). */
static int64_t pf__ns_until(uint64_t now, uint64_t t)
{
    return t <= now ? 0 : (int64_t)(t - now);
}

/* The earlier of a wait w (-1: none yet) and the time until t (0: unset). */
static int64_t pf__sooner(int64_t w, uint64_t now, uint64_t t)
{
    int64_t u;

    if (t == 0)
        return w;
    u = pf__ns_until(now, t);
    return w < 0 || u < w ? u : w;
}

/* Sleep until the earliest thing that needs us without the kernel's help,
 * in ns (-1: until an event). */
static int64_t pf__wait_ns(const pf_dispatcher *d, uint64_t now, uint64_t deadline)
{
    int64_t w = -1;

    if (d->more)
        return 0;
    if (deadline != UINT64_MAX)
        w = pf__ns_until(now, deadline);
    w = pf__sooner(w, now, d->pause_until_ns);
    w = pf__sooner(w, now, d->recheck_ns);
    w = pf__sooner(w, now, d->takeback_ns);
    w = pf__sooner(w, now, pf__park_due_ns(d));
    if (d->pulling)
        w = pf__sooner(w, now, d->pull_look_ns);    /* pf__pull_over's next look */
    /* Stalled with someone who could take: poll for freed room, not spin. */
    if (d->pcount > 0 && d->n_ready > 0 && (w < 0 || w > (int64_t)pf__ms_to_ns(PF__RECHECK_MS)))
        w = (int64_t)pf__ms_to_ns(PF__RECHECK_MS);
    return w;
}

/* epoll_wait with a timeout in ns (-1: none). epoll_wait counts whole ms,
 * rounded up, so a take-back due in 1 ms ran 1-2 ms late and the light
 * requests queued behind a slow one waited that long (issue 10's new-
 * connection p99); epoll_pwait2 (Linux 5.11) takes a timespec. Called by
 * number, as the manylinux2014 glibc has no wrapper; on an older kernel
 * (ENOSYS) we fall back to ms for good. */
#ifndef SYS_epoll_pwait2
#define SYS_epoll_pwait2 441    /* the same on every architecture */
#endif
static int pf__epoll_wait_ns(int epfd, struct epoll_event *ev, int n, int64_t ns)
{
    static int no_pwait2;
    struct timespec ts;
    long rc;

    if (ns > 0 && !no_pwait2) {
        ts.tv_sec = (time_t)(ns / 1000000000);
        ts.tv_nsec = (long)(ns % 1000000000);
        rc = syscall(SYS_epoll_pwait2, epfd, ev, n, &ts, NULL, 0);
        if (rc >= 0 || errno != ENOSYS)
            return (int)rc;
        no_pwait2 = 1;
    }
    if (ns > 0) {
        int64_t ms = (ns + (int64_t)PF__NS_PER_MS - 1) / (int64_t)PF__NS_PER_MS;

        return epoll_wait(epfd, ev, n, ms > INT_MAX ? INT_MAX : (int)ms);
    }
    return epoll_wait(epfd, ev, n, ns < 0 ? -1 : 0);
}

/* Returns the number of events (1..max_ev), 0 on timeout, or -errno. An
 * interrupted wait (EINTR) also returns 0: Python runs its signal handlers
 * only once we are back, and the caller simply calls run again. */
int pf_dispatcher_run(pf_dispatcher *d, int timeout_ms, pf_event *ev, int max_ev)
{
    uint64_t now = pf__now_ns(), deadline;
    int polled = 0, rc = 0;

    if (d == NULL || ev == NULL || max_ev < 1 || timeout_ms < -1)
        return -EINVAL;
    deadline = timeout_ms < 0 ? UINT64_MAX : now + pf__ms_to_ns((uint64_t)timeout_ms);
    d->out = ev;
    d->nout = 0;
    d->maxout = max_ev;
    for (;;) {
        int n;

        pf__tick(d, now);
        if (d->nout > 0 || (polled && now >= deadline))
            break;
        n = pf__epoll_wait_ns(d->epfd, d->evbuf, d->evcap, pf__wait_ns(d, now, deadline));
        polled = 1;
        if (n < 0) {
            rc = errno == EINTR ? 0 : -errno;
            break;
        }
        d->st.wakeups++;
        for (int i = 0; i < n; i++)
            pf__on_event(d, &d->evbuf[i]);
        now = pf__now_ns();
    }
    if (rc == 0)
        rc = d->nout;
    d->out = NULL;
    return rc;
}
