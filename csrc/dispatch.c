/* dispatch.c -- the dispatcher handle and its tables.
 *
 * Theory of operation: pf_dispatcher_new allocates everything the handle
 * will ever use (worker table, listener and watch tables, the pending ring,
 * the epoll batch, the MAP_SHARED scoreboard, a reserve fd on /dev/null) so
 * that the loop in dispatch_loop.c never allocates. The functions here are
 * what the caller (the Python arbiter) calls between runs: add/remove
 * listeners and watched fds, add a worker's channel before forking it, mark
 * it READY or DRAINING, remove it after it died -- recovering connections
 * still queued in its channel through the peer end we kept (Node loses
 * those) -- and read counters. Every function returns >= 0 or -errno.
 * Pure twin: pyfork/_pure/dispatch.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pf_internal.h"

_Static_assert(sizeof(pf_slot) == 256, "pf_slot is four cache lines (pyfork._api.SLOT_SIZE)");
_Static_assert(sizeof(pf_event) == 16, "pf_event layout is shared with Python");

/* The ranges pyfork.h documents for pf_config. They are sanity bounds, not
 * tuning: a value outside one is a caller's bug. capacity <= 4096 keeps the
 * scoreboard (256 bytes a slot) at 1 MiB and the O(capacity) scans short;
 * max_listeners and max_watch <= 64 because those tables are searched
 * linearly on every wakeup; max_inflight <= 2^20 and max_pending <= 65536
 * bound what a typo can mean or allocate (the ring is 8 bytes an entry, so
 * 512 KiB at most). emfile_pause_ms >= 1 so an EMFILE can never turn into a
 * spin, <= 60 s because a longer pause is an outage, not a pause. */
static int pf__config_ok(const pf_config *c)
{
    return c->capacity >= 1 && c->capacity <= 4096 &&
           (c->policy == PF_POLICY_RR || c->policy == PF_POLICY_LEAST) &&
           c->max_inflight >= 1 && c->max_inflight <= (1 << 20) &&
           c->max_listeners >= 1 && c->max_listeners <= 64 &&
           c->max_watch >= 0 && c->max_watch <= 64 &&
           c->max_pending >= 1 && c->max_pending <= 65536 &&
           c->accept_batch >= 1 && c->accept_batch <= c->max_pending &&
           c->emfile_pause_ms >= 1 && c->emfile_pause_ms <= 60000;
}

/* Returns 0 and *out, or -EINVAL for a bad config, -ENOMEM, -errno of epoll/mmap. */
int pf_dispatcher_new(const pf_config *cfg, pf_dispatcher **out)
{
    pf_dispatcher *d;
    int rc = -ENOMEM, total;

    if (cfg == NULL || out == NULL || !pf__config_ok(cfg))
        return -EINVAL;
    *out = NULL;
    d = calloc(1, sizeof(*d));
    if (d == NULL)
        return -ENOMEM;
    d->cfg = *cfg;
    d->epfd = -1;
    d->reserve_fd = -1;
    total = cfg->capacity + cfg->max_listeners + cfg->max_watch;
    d->evcap = total < PF__MAX_EPOLL_BATCH ? total : PF__MAX_EPOLL_BATCH;
    d->workers = calloc((size_t)cfg->capacity, sizeof(*d->workers));
    d->listeners = calloc((size_t)cfg->max_listeners, sizeof(*d->listeners));
    d->watches = calloc((size_t)cfg->max_watch + 1, sizeof(*d->watches));
    d->pend = calloc((size_t)cfg->max_pending, sizeof(*d->pend));
    d->evbuf = calloc((size_t)d->evcap, sizeof(*d->evbuf));
    d->scratch = malloc(PF_MAX_PAYLOAD);
    if (!d->workers || !d->listeners || !d->watches || !d->pend || !d->evbuf || !d->scratch)
        goto fail;
    for (int s = 0; s < cfg->capacity; s++)
        d->workers[s].chan = d->workers[s].peer = -1;

    d->board_size = (size_t)cfg->capacity * sizeof(pf_slot);
    d->board = mmap(NULL, d->board_size, PROT_READ | PROT_WRITE,
                    MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (d->board == MAP_FAILED) {
        d->board = NULL;
        rc = -errno;
        goto fail;
    }
    d->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (d->epfd < 0) {
        rc = -errno;
        goto fail;
    }
    /* No /dev/null (odd chroot) only costs the EMFILE trick, not the loop. */
    d->reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    d->reserve_wanted = d->reserve_fd >= 0;
    d->accepting = 1;
    *out = d;
    return 0;

fail:
    pf_dispatcher_free(d);
    return rc;
}

/* Returns nothing; closes every fd the dispatcher owns, unmaps the
 * scoreboard and frees d (NULL is fine). */
void pf_dispatcher_free(pf_dispatcher *d)
{
    if (d == NULL)
        return;
    for (int s = 0; d->workers && s < d->hi; s++) {
        if (d->workers[s].chan >= 0)
            close(d->workers[s].chan);
        if (d->workers[s].peer >= 0)
            close(d->workers[s].peer);
    }
    while (d->pcount > 0) {
        close(d->pend[d->phead].fd);
        d->phead = (d->phead + 1) % d->cfg.max_pending;
        d->pcount--;
    }
    pf__park_free(d);           /* parked connections are idle: closed */
    if (d->epfd >= 0)
        close(d->epfd);
    if (d->reserve_fd >= 0)
        close(d->reserve_fd);
    if (d->board != NULL)
        munmap(d->board, d->board_size);
    free(d->workers);
    free(d->listeners);
    free(d->watches);
    free(d->pend);
    free(d->evbuf);
    free(d->scratch);
    free(d);
}

/* ---- the poll set ------------------------------------------------------------ */

/* Returns 0 after epoll_ctl(op) of fd with events, tagged with kind and id
 * (PF__EV_DATA; pf__on_event in dispatch_loop.c decodes it), or -errno. */
int pf__poll_ctl(pf_dispatcher *d, int op, int fd, uint32_t events, uint32_t kind, int id)
{
    struct epoll_event ev;

    ev.events = events;
    ev.data.u64 = PF__EV_DATA(kind, id);
    return epoll_ctl(d->epfd, op, fd, &ev) < 0 ? -errno : 0;
}

/* ---- listeners --------------------------------------------------------------- */

/* Returns the listener table index of fd, or -1. */
int pf__listener_index(const pf_dispatcher *d, int fd)
{
    for (int i = 0; i < d->nlisteners; i++)
        if (d->listeners[i].fd == fd)
            return i;
    return -1;
}

/* Linux copies TCP_NODELAY from a listening socket to the sockets accept()
 * makes from it (the child is a clone of the listener), so setting it here
 * once saves a setsockopt per connection. Returns 1 when accepted fds will
 * carry it; elsewhere, or if the option would not stick, 0 (set it on each). */
static int pf__listener_nodelay(int fd)
{
#ifdef __linux__
    int one = 1, val = 0;
    socklen_t len = sizeof(val);

    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
        return 0;
    return getsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &val, &len) == 0 && val != 0;
#else
    (void)fd;
    return 0;
#endif
}

/* Returns 0; -ENOSPC when the table is full, -EEXIST if present, -errno. */
int pf_dispatcher_add_listener(pf_dispatcher *d, int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);
    pf__listener *l;
    int rc;

    if (d == NULL || fd < 0)
        return -EINVAL;
    if (pf__listener_index(d, fd) >= 0)
        return -EEXIST;
    if (d->nlisteners >= d->cfg.max_listeners)
        return -ENOSPC;
    /* The family is fixed for the socket's life: decide TCP_NODELAY once. */
    if (getsockname(fd, (struct sockaddr *)&ss, &len) < 0)
        return -errno;
    l = &d->listeners[d->nlisteners];
    memset(l, 0, sizeof(*l));
    l->fd = fd;
    if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6)
        l->nodelay_each = !pf__listener_nodelay(fd);
    if (d->accepting) {
        rc = pf__poll_ctl(d, EPOLL_CTL_ADD, fd, EPOLLIN, PF__K_LISTENER, fd);
        if (rc < 0)
            return rc;
        l->in_poll = 1;
    }
    d->nlisteners++;
    return 0;
}

/* Returns 0, or -ENOENT. */
int pf_dispatcher_remove_listener(pf_dispatcher *d, int fd)
{
    int i = d == NULL ? -1 : pf__listener_index(d, fd);

    if (i < 0)
        return -ENOENT;
    /* May fail with EBADF if the caller closed it first: nothing to undo. */
    if (d->listeners[i].in_poll)
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, fd, NULL);
    d->listeners[i] = d->listeners[--d->nlisteners];
    return 0;
}

/* ---- watched fds ---------------------------------------------------------------- */

/* Returns the watch table index of fd, or -1. */
int pf__watch_index(const pf_dispatcher *d, int fd)
{
    for (int i = 0; i < d->nwatch; i++)
        if (d->watches[i].fd == fd)
            return i;
    return -1;
}

/* Returns 0; readable fd -> PF_EV_WATCH with tag. -ENOSPC, -EEXIST, -errno. */
int pf_dispatcher_watch(pf_dispatcher *d, int fd, uint32_t tag)
{
    int rc;

    if (d == NULL || fd < 0)
        return -EINVAL;
    if (pf__watch_index(d, fd) >= 0)
        return -EEXIST;
    if (d->nwatch >= d->cfg.max_watch)
        return -ENOSPC;
    rc = pf__poll_ctl(d, EPOLL_CTL_ADD, fd, EPOLLIN, PF__K_WATCH, fd);
    if (rc < 0)
        return rc;
    d->watches[d->nwatch].fd = fd;
    d->watches[d->nwatch].tag = tag;
    d->nwatch++;
    return 0;
}

/* Returns 0, or -ENOENT. */
int pf_dispatcher_unwatch(pf_dispatcher *d, int fd)
{
    int i = d == NULL ? -1 : pf__watch_index(d, fd);

    if (i < 0)
        return -ENOENT;
    epoll_ctl(d->epfd, EPOLL_CTL_DEL, fd, NULL);
    d->watches[i] = d->watches[--d->nwatch];
    return 0;
}

/* ---- workers ------------------------------------------------------------------- */

/* Channels are SOCK_SEQPACKET (pyfork.h): anything else would break
 * message boundaries, so refuse it here rather than misparse later. */
static int pf__is_seqpacket(int fd)
{
    int type = 0;
    socklen_t len = sizeof(type);

    return getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 &&
           type == SOCK_SEQPACKET;
}

/* Returns 0 and owns chan and peer; -EINVAL bad slot or fd, -EEXIST slot in
 * use, -errno of fcntl/epoll. On error nothing is owned. */
int pf_dispatcher_add_worker(pf_dispatcher *d, int slot, int chan, int peer)
{
    pf__worker *w;
    int fl, rc;

    if (d == NULL || slot < 0 || slot >= d->cfg.capacity || chan < 0 ||
        peer < -1 || chan == peer)
        return -EINVAL;
    w = &d->workers[slot];
    if (w->state != PF_WORKER_FREE)
        return -EEXIST;
    if (!pf__is_seqpacket(chan) || (peer >= 0 && !pf__is_seqpacket(peer)))
        return -EINVAL;
    fl = fcntl(chan, F_GETFL);
    if (fl < 0 || fcntl(chan, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    rc = pf__poll_ctl(d, EPOLL_CTL_ADD, chan, PF__CHAN_EVENTS, PF__K_WORKER, slot);
    if (rc < 0) {
        fcntl(chan, F_SETFL, fl);   /* "nothing is owned": give it back as it was */
        return rc;
    }
    memset(&d->board[slot], 0, sizeof(pf_slot));
    memset(w, 0, sizeof(*w));
    w->chan = chan;
    w->peer = peer;
    w->state = PF_WORKER_SPAWNING;
    w->in_epoll = 1;
    if (slot >= d->hi)
        d->hi = slot + 1;
    return 0;
}

/* Returns 0; state is PF_WORKER_READY or PF_WORKER_DRAINING. -EINVAL, -ENOENT.
 * A GONE worker stays GONE: draining it is vacuously done (0), making it
 * READY is -EPIPE (its channel is closed). */
int pf_dispatcher_set_state(pf_dispatcher *d, int slot, int state)
{
    pf__worker *w;

    if (d == NULL || slot < 0 || slot >= d->cfg.capacity ||
        (state != PF_WORKER_READY && state != PF_WORKER_DRAINING))
        return -EINVAL;
    w = &d->workers[slot];
    if (w->state == PF_WORKER_FREE)
        return -ENOENT;
    if (w->state == PF_WORKER_GONE)
        return state == PF_WORKER_DRAINING ? 0 : -EPIPE;
    if (w->state == PF_WORKER_READY)
        d->n_ready--;
    if (state == PF_WORKER_READY)
        d->n_ready++;
    w->state = state;
    /* A worker that joins during a pull ends it: it can start a connection,
     * and asleep on its channel it would not see a pull word until its tick. */
    if (state == PF_WORKER_READY && d->pulling)
        pf__pull_end(d);
    return 0;
}

/* Pulls every CONN still queued to the worker out of the peer end we kept
 * and puts its fds back in the ring (flushing as we go so the ring and our
 * fd table stay small). Returns how many fds were recovered. */
static int pf__recover(pf_dispatcher *d, int peer)
{
    int got = 0, fl = fcntl(peer, F_GETFL);

    /* The worker is dead or being discarded: its file description may be
     * blocking, and a recv that blocks would hang the primary. */
    if (fl < 0 || fcntl(peer, F_SETFL, fl | O_NONBLOCK) < 0)
        return 0;
    for (;;) {
        pf_msg_hdr h;
        int fds[PF_MAX_FDS];
        int n = pf_recv_msg(peer, &h, NULL, 0, fds, PF_MAX_FDS);

        if (n == -EBADMSG || n == -EMSGSIZE)
            continue;           /* that datagram is consumed; next */
        if (n < 0)
            break;              /* EAGAIN: queue empty */
        for (int i = 0; i < n; i++) {
            if (h.type != PF_MSG_CONN) {
                close(fds[i]);
                continue;
            }
            if (pf__pend_push(d, fds[i], 1) < 0) {
                pf__flush(d);
                if (pf__pend_push(d, fds[i], 1) < 0) {
                    close(fds[i]);
                    d->st.dropped++;
                    continue;
                }
            }
            got++;
        }
        pf__flush(d);
    }
    return got;
}

/* Returns the number of connections recovered from the slot's queue and
 * re-dispatched (or held pending), after closing chan and peer. -ENOENT
 * when the slot is free. */
int pf_dispatcher_remove_worker(pf_dispatcher *d, int slot)
{
    pf__worker w;
    int got = 0;

    if (d == NULL || slot < 0 || slot >= d->cfg.capacity)
        return -EINVAL;
    w = d->workers[slot];
    if (w.state == PF_WORKER_FREE)
        return -ENOENT;
    /* Free the slot first so the recovery's flush cannot pick it. */
    if (w.state == PF_WORKER_READY)
        d->n_ready--;
    if (w.hup_pending)
        d->n_hup--;
    if (w.behind)
        d->n_behind--;
    if (w.in_epoll)
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, w.chan, NULL);
    memset(&d->workers[slot], 0, sizeof(pf__worker));
    d->workers[slot].chan = d->workers[slot].peer = -1;
    if (w.peer >= 0) {
        got = pf__recover(d, w.peer);
        close(w.peer);
    }
    pf__park_salvage(d, w.chan);    /* connections it handed back, not yet read */
    close(w.chan);
    return got;
}

/* Returns 0; see pyfork.h. Idempotent. */
int pf_dispatcher_stop_accepting(pf_dispatcher *d)
{
    if (d == NULL)
        return -EINVAL;
    if (d->stopping)
        return 0;
    d->stopping = 1;
    d->accepting = 0;           /* the next turn takes them out of the poll set */
    for (int i = 0; i < d->nlisteners; i++)
        d->listeners[i].at_eagain = 0;
    return 0;
}

int pf_dispatcher_set_pull(pf_dispatcher *d, int on)
{
    if (d == NULL || (on != 0 && on != 1))
        return -EINVAL;
    d->pull_on = on;
    if (!on && d->pulling)
        pf__pull_end(d);
    return 0;
}

/* ---- counters ---------------------------------------------------------------- */

/* Returns 0 and fills *out. */
int pf_dispatcher_stats(const pf_dispatcher *d, pf_stats *out)
{
    if (d == NULL || out == NULL)
        return -EINVAL;
    *out = d->st;
    out->pending = d->pcount;
    out->accepting = d->accepting && d->nlisteners > 0;
    return 0;
}

/* Returns 0 and fills *out; -EINVAL bad slot. A free slot reports state FREE. */
int pf_dispatcher_worker_stats(const pf_dispatcher *d, int slot, pf_worker_stats *out)
{
    const pf__worker *w;

    if (d == NULL || out == NULL || slot < 0 || slot >= d->cfg.capacity)
        return -EINVAL;
    w = &d->workers[slot];
    memset(out, 0, sizeof(*out));
    out->state = w->state;
    if (w->state == PF_WORKER_FREE)
        return 0;
    out->sent = w->sent;
    out->closed = __atomic_load_n(&d->board[slot].closed, __ATOMIC_ACQUIRE);
    out->inflight = (int64_t)(out->sent + __atomic_load_n(&d->board[slot].accepted, __ATOMIC_ACQUIRE)
                              - out->closed);
    return 0;
}

/* Returns the scoreboard base and its size in bytes. */
void *pf_dispatcher_scoreboard(const pf_dispatcher *d, size_t *size)
{
    if (size != NULL)
        *size = d == NULL ? 0 : d->board_size;
    return d == NULL ? NULL : d->board;
}
