/* park.c -- idle kept-alive connections parked in the primary.
 *
 * Theory of operation: a sync worker runs one request at a time and holds
 * its other kept-alive connections in its own selector; while it is inside
 * a long request, their next requests would wait for it (bench/README.md
 * "Mixed load", finding 4). So a worker whose request runs long hands its
 * idle connections back with PF_MSG_PARK (pyfork/serve/wsgi.py decides
 * when). They wait here, in the dispatcher's epoll, one entry each of a
 * table sized once by pf_dispatcher_set_parking (a free list: no allocation
 * per connection). When one turns readable its next request is in the
 * kernel (bytes travel with the fd, so pipelining keeps its order): it goes
 * into the pending ring exactly like a freshly accepted connection and the
 * central queue sends it to a worker that can start it now. EPOLLONESHOT:
 * an entry reports once, then it is removed from the poll set before the fd
 * leaves the table, so a connection is never held or sent twice.
 *   hang-up      EPOLLRDHUP/HUP/ERR with nothing to read: closed here;
 *   idle         a coarse sweep closes entries parked longer than the idle
 *                timeout (the server's --keep-alive);
 *   no room      table off or full: the fd goes to the ring at once (a
 *                worker that can start it takes it and waits for its bytes);
 *                ring full as well: readable entries wait flagged `ready`
 *                and move on in a later tick;
 *   stopping     every parked connection goes back to the ring at once, so
 *                the workers (still READY until DRAINED) take them and apply
 *                their drain rules: a request that arrives is answered with
 *                Connection: close, an idle one is closed between requests.
 *                Closing them here could reset a request already in flight.
 *                Each worker's scoreboard line gets park_off, so no more
 *                are handed back. A PARK the worker sent just before it saw
 *                the flag and that is read after DRAINED (no worker takes
 *                from the ring then) goes back to the worker that sent it
 *                (pf__park_return).
 * Measured price (bench/park_cost.c): ~11 us of syscalls per parked request,
 * so workers park only on demand, never after every response.
 * Pure twin: pyfork/_pure/park.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pf_internal.h"

/* Parked entries report once (ONESHOT); RDHUP tells a client that closed
 * its idle connection from one that sent its next request. */
#define PF__PARK_EVENTS (EPOLLIN | EPOLLRDHUP | EPOLLONESHOT)
/* The idle sweep runs every idle_timeout / 4, within [10 ms, 1 s]: a parked
 * connection lives at most 25 % (or 1 s) past its timeout, and the sweep
 * costs a scan of the table a few times per second only while any is parked. */
#define PF__PARK_SWEEP_MIN_NS (10 * PF__NS_PER_MS)
#define PF__PARK_SWEEP_MAX_NS (1000 * PF__NS_PER_MS)
/* Table and timeout bounds for pf_dispatcher_set_parking: 2^20 entries of 24
 * bytes is 24 MiB, more fds than any fd limit here; a day is longer than any
 * sane keep-alive timeout. */
#define PF__PARK_MAX (1 << 20)
#define PF__PARK_MAX_TIMEOUT_MS 86400000

static uint64_t pf__park_period(const pf_dispatcher *d)
{
    uint64_t p = d->park.idle_ns / 4;

    if (p < PF__PARK_SWEEP_MIN_NS)
        p = PF__PARK_SWEEP_MIN_NS;
    return p > PF__PARK_SWEEP_MAX_NS ? PF__PARK_SWEEP_MAX_NS : p;
}

/* Closes a connection that leaves parking without a worker. */
static void pf__park_drop(pf_dispatcher *d, int fd)
{
    close(fd);
    d->st.park_closed++;
}

/* Hands fd to the pending ring (it is the ring's now), or drops it. */
static void pf__park_to_ring(pf_dispatcher *d, int fd)
{
    if (pf__pend_push(d, fd, 0) < 0) {
        pf__park_drop(d, fd);
        return;
    }
    d->st.unparks++;
}

/* Frees entry i (its fd is out of the poll set and no longer ours). */
static void pf__park_release(pf_dispatcher *d, int i)
{
    pf__park *p = &d->park.tab[i];

    if (p->ready)
        d->park.nready--;
    p->fd = -1;
    p->ready = 0;
    p->next_free = d->park.free_head;
    d->park.free_head = i;
    d->st.parked--;
}

/* Takes entry i out of the poll set and frees it; returns its fd. */
static int pf__park_take(pf_dispatcher *d, int i)
{
    int fd = d->park.tab[i].fd;

    if (!d->park.tab[i].ready)
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, fd, NULL);
    pf__park_release(d, i);
    return fd;
}

/* One fd a worker handed back: into the table and the poll set. */
static void pf__park_add(pf_dispatcher *d, int fd, uint64_t now)
{
    pf__parking *pk = &d->park;
    int i = pk->free_head;
    pf__park *p;

    d->st.parks++;
    if (pk->tab == NULL || i < 0 || d->stopping) {
        /* Off, full, or stopping: to a worker now (see the header). */
        pf__park_to_ring(d, fd);
        return;
    }
    if (pf__poll_ctl(d, EPOLL_CTL_ADD, fd, PF__PARK_EVENTS, PF__K_PARK, i) < 0) {
        pf__park_to_ring(d, fd);  /* not a pollable socket: let a worker find out */
        return;
    }
    p = &pk->tab[i];
    pk->free_head = p->next_free;
    p->fd = fd;
    p->ready = 0;
    p->since_ns = now;
    if (i >= pk->hi)
        pk->hi = i + 1;
    d->st.parked++;
    if (pk->sweep_ns == 0)
        pk->sweep_ns = now + pf__park_period(d);
}

/* Returns nothing; a PARK read after DRAINED, when no worker takes from the
 * ring any more (its worker sent it before it saw park_off): its fds go back
 * to that worker as a CONN. It is alive (inside the request that made it
 * park) and serves them with its drain rules. They are sent back *before*
 * the PARK is consumed: a worker that parked waits, before it exits, until
 * we have read everything it sent (SIOCOUTQ 0: pyfork/worker/runtime.py,
 * parks_settled), so by then what comes back is in its channel. Peeking
 * gives us duplicates of the fds (the kernel clones them); ours are closed
 * once sent. A channel full or gone: the connections are closed. */
static void pf__park_return(pf_dispatcher *d, int slot)
{
    pf__worker *w = &d->workers[slot];
    pf_msg_hdr h;
    int fds[PF_MAX_FDS];
    int n = pf__recv_msg_flags(w->chan, &h, NULL, 0, fds, PF_MAX_FDS, MSG_PEEK | MSG_DONTWAIT);

    if (n > 0) {
        d->st.parks += (uint64_t)n;
        if (pf_send_msg(w->chan, PF_MSG_CONN, 0, NULL, 0, fds, n) == 0) {
            d->st.unparks += (uint64_t)n;
            d->st.dispatched += (uint64_t)n;
            w->sent += (uint64_t)n;
            __atomic_store_n(&d->board[slot].sent, w->sent, __ATOMIC_RELEASE);
        } else {
            d->st.park_closed += (uint64_t)n;
        }
        for (int i = 0; i < n; i++)
            close(fds[i]);
    }
    /* Now consume it (a malformed one is consumed here, its fds closed). */
    n = pf_recv_msg(w->chan, &h, NULL, 0, fds, PF_MAX_FDS);
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* Returns nothing; reads one PF_MSG_PARK message from worker slot's channel
 * (the loop peeked its header) and parks every fd it carried; after DRAINED
 * they go back to that worker instead (pf__park_return). A malformed one is
 * consumed and its fds closed by pf_recv_msg. */
void pf__park_recv(pf_dispatcher *d, int slot)
{
    pf_msg_hdr h;
    int fds[PF_MAX_FDS];
    int n;
    uint64_t now;

    if (d->drained) {
        pf__park_return(d, slot);
        return;
    }
    n = pf_recv_msg(d->workers[slot].chan, &h, NULL, 0, fds, PF_MAX_FDS);
    now = pf__now_ns();

    for (int i = 0; i < n; i++)
        pf__park_add(d, fds[i], now);
}

/* Returns nothing; reads what a removed worker's channel still holds and
 * parks the connections of its PARK messages (other messages are dropped):
 * a worker that handed connections back and exited at once must not lose
 * them when the caller reaps it and closes the channel before the loop has
 * read them. Bounded, in case the peer is alive and still writing. */
void pf__park_salvage(pf_dispatcher *d, int chan)
{
    uint64_t now = pf__now_ns();

    for (int m = 0; m < 4096; m++) {
        pf_msg_hdr h;
        int fds[PF_MAX_FDS];
        int n = pf_recv_msg(chan, &h, NULL, 0, fds, PF_MAX_FDS);

        if (n == -EBADMSG || n == -EMSGSIZE)
            continue;           /* consumed (a control message's payload); next */
        if (n < 0)
            return;             /* EAGAIN: empty; EPIPE: EOF */
        for (int i = 0; i < n; i++) {
            if (h.type == PF_MSG_PARK)
                pf__park_add(d, fds[i], now);
            else
                close(fds[i]);
        }
    }
}

/* Returns nothing; entry id reported events (once: ONESHOT). Data waiting:
 * to the ring (or flagged ready while the ring is full). Hung up with
 * nothing to read: closed. */
void pf__park_on_event(pf_dispatcher *d, int id, uint32_t events)
{
    pf__park *p;

    if (id < 0 || id >= d->park.hi)
        return;
    p = &d->park.tab[id];
    if (p->fd < 0 || p->ready)
        return;
    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        char c;
        ssize_t n;

        do
            n = recv(p->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno == EAGAIN) {
            /* Spurious: watch again. */
            if (pf__poll_ctl(d, EPOLL_CTL_MOD, p->fd, PF__PARK_EVENTS, PF__K_PARK, id) == 0)
                return;
            n = 0;
        }
        if (n <= 0) {
            pf__park_drop(d, pf__park_take(d, id));
            return;
        }
        /* A request followed by a half-close: serve the request. */
    }
    if (d->pcount >= d->cfg.max_pending) {
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, p->fd, NULL);
        p->ready = 1;
        d->park.nready++;
        return;
    }
    pf__park_to_ring(d, pf__park_take(d, id));
}

/* Returns nothing; moves ready entries (once stopping, every entry) to the
 * ring while it has room and, when the sweep is due, closes entries idle
 * past the timeout. */
void pf__park_tick(pf_dispatcher *d, uint64_t now)
{
    pf__parking *pk = &d->park;
    int all = d->stopping && d->st.parked > 0;

    if (d->stopping && !pk->off_told) {
        /* Workers stop handing connections back: one that arrived after
         * DRAINED would find no READY worker left to take it. */
        for (int s = 0; s < d->hi; s++)
            __atomic_store_n(&d->board[s].park_off, 1, __ATOMIC_RELEASE);
        pk->off_told = 1;
    }

    for (int i = 0; i < pk->hi && (pk->nready > 0 || all); i++) {
        if (pk->tab[i].fd < 0 || !(pk->tab[i].ready || all))
            continue;
        if (d->pcount >= d->cfg.max_pending)
            break;
        pf__park_to_ring(d, pf__park_take(d, i));
    }
    if (pk->sweep_ns == 0 || now < pk->sweep_ns)
        return;
    for (int i = 0; i < pk->hi; i++) {
        pf__park *p = &pk->tab[i];

        if (p->fd >= 0 && !p->ready && now - p->since_ns >= pk->idle_ns)
            pf__park_drop(d, pf__park_take(d, i));
    }
    pk->sweep_ns = d->st.parked > 0 ? now + pf__park_period(d) : 0;
}

/* Returns 1 while parked connections wait for room in the pending ring:
 * readable ones flagged ready, or, once stopping, every one. */
int pf__park_waiting(const pf_dispatcher *d)
{
    return d->park.nready > 0 || (d->stopping && d->st.parked > 0);
}

/* Returns when the loop must wake for the idle sweep (0 = no need). */
uint64_t pf__park_due_ns(const pf_dispatcher *d)
{
    return d->park.sweep_ns;
}

/* Returns nothing; closes every parked fd and frees the table. */
void pf__park_free(pf_dispatcher *d)
{
    pf__parking *pk = &d->park;

    for (int i = 0; pk->tab != NULL && i < pk->hi; i++)
        if (pk->tab[i].fd >= 0)
            pf__park_drop(d, pf__park_take(d, i));
    free(pk->tab);
    pk->tab = NULL;
    pk->cap = pk->hi = pk->nready = 0;
    pk->free_head = -1;
    pk->sweep_ns = 0;
    d->st.park_cap = 0;
}

/* Returns 0, -EINVAL, -ENOMEM, or -EBUSY while connections are parked and
 * the table size would change. */
int pf_dispatcher_set_parking(pf_dispatcher *d, int max_parked, int idle_timeout_ms)
{
    pf__parking *pk;

    if (d == NULL || max_parked < 0 || max_parked > PF__PARK_MAX ||
        idle_timeout_ms < 1 || idle_timeout_ms > PF__PARK_MAX_TIMEOUT_MS)
        return -EINVAL;
    pk = &d->park;
    pk->idle_ns = pf__ms_to_ns((uint64_t)idle_timeout_ms);
    if (max_parked == pk->cap)
        return 0;
    if (d->st.parked > 0)
        return -EBUSY;
    pf__park_free(d);
    if (max_parked == 0)
        return 0;
    pk->tab = calloc((size_t)max_parked, sizeof(*pk->tab));
    if (pk->tab == NULL)
        return -ENOMEM;
    for (int i = 0; i < max_parked; i++) {
        pk->tab[i].fd = -1;
        pk->tab[i].next_free = i + 1 < max_parked ? i + 1 : -1;
    }
    pk->cap = max_parked;
    pk->free_head = 0;
    d->st.park_cap = max_parked;
    return 0;
}
