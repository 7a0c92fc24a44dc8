/* dispatch_send.c -- from the pending ring to a worker's channel.
 *
 * Theory of operation: accepted (or recovered) fds wait in a fixed ring of
 * cfg.max_pending entries. pf__flush repeatedly picks a worker by policy,
 * takes a batch of fds from the front of the ring and sends them in ONE
 * sendmsg (up to PF_MAX_FDS), then closes the primary's copies. A worker is
 * a candidate when it is READY, not blocked, and can start a connection now
 * (the central queue, M/G/k: gunicorn sync gets its tail from a worker that
 * accepts only when idle, bench/README.md "Mixed load"):
 *   queued + fresh + active < capacity, queued = sent - scoreboard.taken,
 * (fresh: taken, first request not begun yet; pyfork.h) and it gets at most
 * capacity - (queued + fresh + active) fds, so a sync worker
 * (capacity 1) gets exactly one, when idle. Nothing waits in a busy worker's
 * channel while another worker could start it: when no worker can start,
 * the fds stay in the ring (at most accept_batch) and the loop stops polling
 * the listeners, so the ring and then the kernel's accept queue are the
 * central FIFO. (Listeners stay polled while the ring is empty even if every
 * worker is busy: to stop them then, the primary would have to ask for a
 * CREDIT at every request's end, a message per request even on kept-alive
 * connections that never need the primary -- measured: keep-alive req/s
 * fell to 0.56 x Node's cluster, bench/README.md "After the central queue".
 * Credits are asked for only while a connection waits.)
 * Prefetch with take-back: when no worker can start one, up to
 * PF__PREFETCH_MAX connections, one per message, may wait in the channel of
 * a worker that is idle or whose request began < PF__PREFETCH_US ago
 * (pf_internal.h says why); once that request has run PF__TAKEBACK_US --
 * or PF__RESCUE_US, when another worker would start them sooner --
 * pf__take_back_due reads them back from the worker's end we hold and they go
 * to the first worker that can start them. So a sync worker under a
 * saturating load goes from one connection to the next without sleeping,
 * and a light request waits behind a slow one for ~0.25-1 ms, not for all
 * of it. A worker that never declared a capacity (0) is limited only by the
 * open-connection cap. That cap, sent -
 * scoreboard.closed < max_inflight, is a separate safety bound, large by
 * default: idle kept-alive connections cost a worker memory, not a slot.
 *   rr     round robin over candidates (Node's SCHED_RR); each gets a fair
 *          share floor(pending / ready) of the batch, capped by its room.
 *   least  the candidate with the lowest load: queued + active (open
 *          connections for an undeclared capacity), plus one for every
 *          PF__LEAST_AGE_MS its request in progress has been running (a
 *          worker stuck on one long request looks busier, Node issue
 *          #39815); ties go to an idle one, then to the one whose request
 *          started most recently (it looks least stuck), then to the next
 *          after the last one chosen; it gets enough fds to catch up with the
 *          runner-up.
 * The wake-up: skipping a worker for lack of room sets its want_credit; the
 * worker sends PF_MSG_CREDIT when it next frees room (a request finished, a
 * connection closed), so a primary that stopped accepting resumes at once.
 * Once nothing waits for room any more, the requests are withdrawn
 * (pf__forget_credits, at the end of each tick).
 * sendmsg errno triage: EAGAIN = that worker is busy, arm
 * EPOLLOUT and try the next; EPIPE & co = the worker is gone, HANGUP it and
 * the same fds go to the next; anything else = transient, retry on the
 * recheck timer. The loop ends when the ring is empty or nobody can take:
 * then the caller leaves the listeners out of the poll set (back-pressure).
 * Pure twin: pyfork/_pure/dispatch_send.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pf_internal.h"

/* ---- pending ring -------------------------------------------------------- */

/* Returns 0, or -ENOSPC when max_pending fds are already held. */
int pf__pend_push(pf_dispatcher *d, int fd, int recovered)
{
    pf__pend *p;

    if (d->pcount >= d->cfg.max_pending)
        return -ENOSPC;
    p = &d->pend[(d->phead + d->pcount) % d->cfg.max_pending];
    p->fd = fd;
    p->recovered = recovered;
    d->pcount++;
    return 0;
}

/* Puts fd back at the front of the ring (it was accepted before everything
 * there). Returns 0, or -ENOSPC when the ring is full. */
static int pf__pend_push_front(pf_dispatcher *d, int fd)
{
    if (d->pcount >= d->cfg.max_pending)
        return -ENOSPC;
    d->phead = (d->phead + d->cfg.max_pending - 1) % d->cfg.max_pending;
    d->pend[d->phead].fd = fd;
    d->pend[d->phead].recovered = 1;
    d->pcount++;
    return 0;
}

/* Copies the first n fds of the ring to fds[] without removing them. */
static void pf__pend_peek(const pf_dispatcher *d, int *fds, int n)
{
    for (int i = 0; i < n; i++)
        fds[i] = d->pend[(d->phead + i) % d->cfg.max_pending].fd;
}

/* Drops the first n entries (sent: the worker holds its own copies now),
 * closing ours. Returns how many of them were recovered ones. */
static int pf__pend_consume(pf_dispatcher *d, int n)
{
    int recovered = 0;

    for (int i = 0; i < n; i++) {
        pf__pend *p = &d->pend[d->phead];
        close(p->fd);
        recovered += p->recovered;
        d->phead = (d->phead + 1) % d->cfg.max_pending;
        d->pcount--;
    }
    return recovered;
}

/* ---- worker bookkeeping ---------------------------------------------------- */

/* Returns 0 after setting the channel's epoll mask (PF__CHAN_EVENTS plus
 * `events`), or -errno. */
int pf__chan_events(pf_dispatcher *d, int slot, uint32_t events)
{
    int rc = pf__poll_ctl(d, EPOLL_CTL_MOD, d->workers[slot].chan,
                          PF__CHAN_EVENTS | events, PF__K_WORKER, slot);

    if (rc < 0)
        return rc;
    d->workers[slot].out_armed = (events & EPOLLOUT) != 0;
    return 0;
}

/* Returns nothing; the channel is dead: no more sends, no more polling, and
 * the caller is owed exactly one HANGUP (emitted by the loop when there is
 * room). */
void pf__mark_gone(pf_dispatcher *d, int slot)
{
    pf__worker *w = &d->workers[slot];

    if (w->state == PF_WORKER_GONE || w->state == PF_WORKER_FREE)
        return;
    if (w->state == PF_WORKER_READY)
        d->n_ready--;
    w->state = PF_WORKER_GONE;
    w->blocked = PF__BLK_NONE;
    if (w->in_epoll) {
        epoll_ctl(d->epfd, EPOLL_CTL_DEL, w->chan, NULL);
        w->in_epoll = 0;
        w->out_armed = 0;
    }
    w->hup_pending = 1;
    d->n_hup++;
}

/* Returns nothing; the recheck timer fired: transient send failures get
 * another try. */
void pf__clear_retry(pf_dispatcher *d)
{
    for (int s = 0; s < d->hi; s++)
        if (d->workers[s].blocked == PF__BLK_RETRY)
            d->workers[s].blocked = PF__BLK_NONE;
    d->recheck_ns = 0;
}

/* ---- choice ---------------------------------------------------------------- */

/* Connections open on slot s: sent + accepted (by the worker itself) - closed (clamped at 0: a worker that
 * over-reports closes must not look like it has more than max_inflight of room). */
static int64_t pf__open(const pf_dispatcher *d, int s)
{
    uint64_t closed = __atomic_load_n(&d->board[s].closed, __ATOMIC_ACQUIRE);
    uint64_t sent = d->workers[s].sent + __atomic_load_n(&d->board[s].accepted, __ATOMIC_ACQUIRE);

    return closed >= sent ? 0 : (int64_t)(sent - closed);
}

/* Fresh connections on slot s that still count as work: taken, first request
 * not begun, for at most PF_SLOT_FRESH_MS since fresh rose from 0 (pyfork.h).
 * The clock is read only when there is one (vDSO: no syscall). */
static int64_t pf__fresh(const pf_dispatcher *d, int s)
{
    uint32_t fresh = __atomic_load_n(&d->board[s].fresh, __ATOMIC_ACQUIRE);
    uint32_t since, now_ms;

    if (fresh == 0)
        return 0;
    since = __atomic_load_n(&d->board[s].fresh_ms, __ATOMIC_RELAXED);
    now_ms = (uint32_t)(pf__now_ns() / PF__NS_PER_MS);
    /* Signed: wrap-safe, and a time ahead of ours (tests set one) is young. */
    return (int32_t)(now_ms - since) < PF_SLOT_FRESH_MS ? (int64_t)fresh : 0;
}

/* Work on slot s: connections queued in its channel (sent - taken, clamped:
 * the worker may read a batch before we add it to sent), fresh ones, and
 * requests running. The loads go taken, fresh, active: the worker moves a
 * connection along those counts adding it to the next before taking it off
 * the previous (slot.c), so with acquire loads in this order we may count it
 * twice (harmless: one look later it is right) but never miss it. */
static int64_t pf__work(const pf_dispatcher *d, int s)
{
    uint64_t taken = __atomic_load_n(&d->board[s].taken, __ATOMIC_ACQUIRE);
    uint64_t sent = d->workers[s].sent;
    int64_t fresh = pf__fresh(d, s);
    uint32_t active = __atomic_load_n(&d->board[s].active, __ATOMIC_RELAXED);

    return (taken >= sent ? 0 : (int64_t)(sent - taken)) + fresh + (int64_t)active;
}

/* How busy slot s is, for least: its work, or its open connections when it
 * declared no capacity. */
static int64_t pf__busy(const pf_dispatcher *d, int s)
{
    return __atomic_load_n(&d->board[s].capacity, __ATOMIC_RELAXED) ? pf__work(d, s)
                                                                    : pf__open(d, s);
}

/* How many fds slot s can start now: free capacity (none declared: no
 * limit), never more than its room under the open-connection cap. */
static int64_t pf__free(const pf_dispatcher *d, int s)
{
    uint32_t cap = __atomic_load_n(&d->board[s].capacity, __ATOMIC_ACQUIRE);
    int64_t room = d->cfg.max_inflight - pf__open(d, s);
    int64_t idle;

    if (cap == 0)
        return room;
    idle = (int64_t)cap - pf__work(d, s);
    return idle < room ? idle : room;
}

/* Returns how many more fds slot s may take now (0 = none: skip it).
 * With no room it asks for a CREDIT, then looks again: we store want_credit,
 * fence, load taken/fresh/active/closed; the worker stores active (a request
 * finished) or fresh and closed (a connection closed), fences, loads
 * want_credit (slot.c). With both fences one side always sees the other's
 * store (Dekker), so room that frees up while we skip either shows up here or
 * sends the CREDIT. (A take or a request start moves a connection from one
 * count to the next without freeing room, so it needs no CREDIT. A fresh
 * connection that ages past PF_SLOT_FRESH_MS frees room with no store at
 * all: the loop's PF__RECHECK_MS poll while fds wait finds it.) */
static int64_t pf__room(pf_dispatcher *d, int s)
{
    int64_t room = pf__free(d, s);

    if (room > 0)
        return room;
    if (!d->workers[s].asked) {
        d->workers[s].asked = 1;
        d->n_asked++;
    }
    __atomic_store_n(&d->board[s].want_credit, 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    room = pf__free(d, s);
    return room > 0 ? room : 0;
}

static int pf__candidate(const pf_dispatcher *d, int s)
{
    const pf__worker *w = &d->workers[s];

    return w->state == PF_WORKER_READY && w->blocked == PF__BLK_NONE;
}

/* 1 when there are workers and each one's declared capacity is taken by its
 * work (queued + fresh + running): none can start a connection, and it is
 * the work that stops them, not the open-connection cap (a worker held back
 * by the cap, or with no declared capacity, keeps the ring's behaviour: a
 * pull would end at once, as the load looks gone, and start again). A look,
 * no CREDIT asked. */
static int pf__all_full(const pf_dispatcher *d)
{
    int n = 0;

    for (int s = 0; s < d->hi; s++) {
        uint32_t cap;

        if (!pf__candidate(d, s))
            continue;
        cap = __atomic_load_n(&d->board[s].capacity, __ATOMIC_ACQUIRE);
        if (cap == 0 || (int64_t)cap - pf__work(d, s) > 0)
            return 0;
        n++;
    }
    return n > 0;
}

/* Pulling: 1 when it is no longer needed, looked at every PF__RECHECK_MS:
 * every worker is idle (no request running, none queued or fresh: the load
 * is gone), or one was idle at the last look too and got nothing since (its
 * handled, taken and accepted counts did not move: with one client at a time
 * several idle workers race for each connection and one may win them all,
 * so the primary takes over, round robin). Not merely one idle worker: under
 * a saturating load one is idle between two requests at most looks, and each
 * end is a moment where the primary and a worker both accept (measured: a
 * longer light p99, bench/README.md session 29). */
int pf__pull_over(pf_dispatcher *d, uint64_t now)
{
    int n = 0, busy = 0, unused = 0;

    if (now < d->pull_look_ns)
        return 0;
    d->pull_look_ns = now + pf__ms_to_ns(PF__RECHECK_MS);
    for (int s = 0; s < d->hi; s++) {
        pf__worker *w = &d->workers[s];
        uint64_t mark;

        if (!pf__candidate(d, s))
            continue;
        n++;
        if (pf__work(d, s) != 0) {
            busy = 1;
            w->idle_mark = 0;
            continue;
        }
        mark = 1 + __atomic_load_n(&d->board[s].handled, __ATOMIC_RELAXED) +
               __atomic_load_n(&d->board[s].taken, __ATOMIC_RELAXED) +
               __atomic_load_n(&d->board[s].accepted, __ATOMIC_RELAXED);
        if (w->idle_mark == mark)
            unused = 1;
        w->idle_mark = mark;
    }
    return n > 0 && (!busy || unused);
}

/* ---- pull: the kernel's accept queue as the central queue ---------------------
 * A connection arrived and no worker can start one. Accepting it here would
 * cost an accept, a sendmsg and a close in the primary (and a wake-up) and a
 * recvmsg in the worker it is prefetched to; under a saturating load of new
 * connections that is the primary's ~20 us per connection that a sync worker
 * accepting for itself does not pay (bench/README.md, session 29). So leave
 * it in the kernel's queue and set pull on every line: a worker watches the
 * listeners (it inherits them) while pull is set and it has room, so the first
 * one to free room accepts it, and the next, as gunicorn's sync workers do.
 * Only when every worker is full by its declared capacity (pf__all_full).
 * Returns 1 when the pull started.
 * The primary stops polling the listeners meanwhile and looks every
 * PF__RECHECK_MS: the pull ends once the load is gone (pf__pull_over; at
 * light load the primary dispatches, round robin, as before), at once if
 * something waits in the ring (a parked connection's request: it must not
 * wait behind what the workers accept), and at a stop. A worker that accepts
 * just after a pull ended is harmless: the kernel gives each connection to
 * one accept(). */
int pf__pull_start(pf_dispatcher *d)
{
    if (!pf__all_full(d))
        return 0;
    for (int s = 0; s < d->hi; s++) {
        d->workers[s].idle_mark = 0;
        __atomic_store_n(&d->board[s].pull, 1, __ATOMIC_RELAXED);
    }
    /* A worker that finished a request just before the stores would look at
     * pull only before them, and sleep with only its channel watched: store,
     * fence, look again, as pf__room's CREDIT handshake (the worker stores
     * active or fresh, fences in slot.c, then reads pull). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!pf__all_full(d)) {
        pf__pull_end(d);
        return 0;
    }
    d->pulling = 1;
    d->st.pulls++;
    d->pull_look_ns = pf__now_ns() + pf__ms_to_ns(PF__RECHECK_MS);
    return 1;
}

void pf__pull_end(pf_dispatcher *d)
{
    d->pulling = 0;
    for (int s = 0; s < d->hi; s++)
        if (__atomic_load_n(&d->board[s].pull, __ATOMIC_RELAXED))
            __atomic_store_n(&d->board[s].pull, 0, __ATOMIC_RELAXED);
}

static int64_t pf__min64(int64_t a, int64_t b)
{
    return a < b ? a : b;
}

/* Can slot s take a prefetched connection (pf_internal.h)? A candidate
 * whose end we hold (only there can a connection be taken back) with a
 * declared capacity, fewer than PF__PREFETCH_MAX connections beyond it,
 * room under the open-connection cap, not barred, and either idle (what it
 * holds is about to start) or running a request that began < young_ns ago.
 * Returns 1 with its count beyond capacity in *extra and its busy_since_ns
 * in *since (0 = idle), or 0 when it cannot. */
static int pf__can_prefetch(pf_dispatcher *d, int s, uint64_t now, uint64_t young_ns,
                            int64_t *extra, uint64_t *since)
{
    uint32_t cap;

    if (!pf__candidate(d, s) || d->workers[s].peer < 0)
        return 0;
    cap = __atomic_load_n(&d->board[s].capacity, __ATOMIC_ACQUIRE);
    if (cap == 0 || d->cfg.max_inflight - pf__open(d, s) <= 0)
        return 0;
    *since = __atomic_load_n(&d->board[s].busy_since_ns, __ATOMIC_RELAXED);
    if (*since != 0 && *since + young_ns <= now)
        return 0;
    if (d->workers[s].barred) {
        if (*since == d->workers[s].barred_since)
            return 0;           /* what we just took back would come straight back */
        d->workers[s].barred = 0;   /* it moved on: a new request, or idle again */
    }
    *extra = pf__work(d, s) - (int64_t)cap;
    return *extra < PF__PREFETCH_MAX;
}

/* Prefetch: no worker can start one now. Of the slots pf__can_prefetch
 * accepts, one idle or whose request began < PF__RESCUE_US ago if there is
 * one (else pf__take_back_due would move the connection to it at once),
 * then the fewest beyond capacity, then the idle or most recently started
 * (the least likely to be stuck). Arms the take-back scan for it: the first
 * look is when the request it waits behind may be a slow one. Returns the
 * slot, or -1. */
static int pf__pick_prefetch(pf_dispatcher *d)
{
    uint64_t now = pf__now_ns(), bsince = 0, look;
    const uint64_t young = (uint64_t)PF__PREFETCH_US * PF__NS_PER_US;
    const uint64_t rescue = (uint64_t)PF__RESCUE_US * PF__NS_PER_US;
    int64_t bextra = 0;
    int best = -1, bfresh = 0;

    for (int s = 0; s < d->hi; s++) {
        uint64_t since;
        int64_t extra;
        int fresh;

        if (!pf__can_prefetch(d, s, now, young, &extra, &since))
            continue;
        fresh = since == 0 || since + rescue > now;
        if (since == 0)
            since = UINT64_MAX;     /* idle: as young as it gets */
        if (best < 0 || fresh > bfresh ||
            (fresh == bfresh && (extra < bextra || (extra == bextra && since > bsince))))
            best = s, bextra = extra, bsince = since, bfresh = fresh;
    }
    if (best < 0)
        return -1;
    if (!d->workers[best].behind) {
        d->workers[best].behind = 1;
        d->n_behind++;
    }
    look = bsince == UINT64_MAX ? now + (uint64_t)PF__TAKEBACK_US * PF__NS_PER_US : bsince + rescue;
    if (d->takeback_ns == 0 || look < d->takeback_ns)
        d->takeback_ns = look;
    return best;
}

/* rr: the next candidate after the last one served. Returns the slot and
 * the batch size in *n (share capped by room and PF_MAX_FDS), or -1. */
static int pf__pick_rr(pf_dispatcher *d, int share, int *n)
{
    for (int i = 0; i < d->hi; i++) {
        int s = (d->rr_next + i) % d->hi;
        int64_t room;

        if (!pf__candidate(d, s))
            continue;
        if ((room = pf__room(d, s)) == 0) {
            d->st.busy_skips++;
            continue;
        }
        *n = (int)pf__min64(pf__min64(share, room), PF_MAX_FDS);
        d->rr_next = s + 1;
        return s;
    }
    return -1;
}

/* least: is slot a (load la) a better choice than slot b (load lb)? */
static int pf__better(const pf_dispatcher *d, int a, int64_t la, int b, int64_t lb)
{
    uint64_t ba, bb;

    if (la != lb)
        return la < lb;
    ba = __atomic_load_n(&d->board[a].busy_since_ns, __ATOMIC_RELAXED);
    bb = __atomic_load_n(&d->board[b].busy_since_ns, __ATOMIC_RELAXED);
    if ((ba == 0) != (bb == 0))
        return ba == 0;         /* idle beats busy */
    return ba > bb;             /* busy since later = less likely stuck */
}

/* least: how long slot s's request in progress has been running, in units
 * of PF__LEAST_AGE_MS (0 when idle). */
static int64_t pf__age_units(const pf_dispatcher *d, int s, uint64_t now)
{
    uint64_t since = __atomic_load_n(&d->board[s].busy_since_ns, __ATOMIC_RELAXED);

    if (since == 0 || since >= now)
        return 0;
    return (int64_t)((now - since) / pf__ms_to_ns(PF__LEAST_AGE_MS));
}

/* least: the lowest-scoring candidate; *n brings it level with the runner-up.
 * The scan starts after the last slot chosen, so workers that tie on every
 * count take turns (an idle cluster at concurrency 1 is spread like rr). */
static int pf__pick_least(pf_dispatcher *d, int *n)
{
    int best = -1;
    int64_t bload = 0, second = INT64_MAX, broom = 0;
    uint64_t now = pf__now_ns();  /* vDSO clock_gettime: no syscall */

    for (int i = 0; i < d->hi; i++) {
        int s = (d->rr_next + i) % d->hi;
        int64_t room, load;

        if (!pf__candidate(d, s))
            continue;
        if ((room = pf__room(d, s)) == 0) {
            d->st.busy_skips++;
            continue;
        }
        load = pf__busy(d, s) + pf__age_units(d, s, now);
        if (best < 0 || pf__better(d, s, load, best, bload)) {
            if (best >= 0)
                second = pf__min64(second, bload);
            best = s, bload = load, broom = room;
        } else {
            second = pf__min64(second, load);
        }
    }
    if (best < 0)
        return -1;
    d->rr_next = best + 1;
    *n = (int)pf__min64(broom, PF_MAX_FDS);
    if (second != INT64_MAX && second - bload < *n)
        *n = second - bload > 1 ? (int)(second - bload) : 1;
    return best;
}

/* ---- sending --------------------------------------------------------------- */

/* Errors that mean the worker's end is closed for good. */
static int pf__gone_errno(int rc)
{
    return rc == -EPIPE || rc == -ECONNRESET || rc == -ECONNREFUSED ||
           rc == -ENOTCONN;
}

/* Sends the first n pending fds to slot s in one message; on failure the
 * fds stay pending and the worker is marked per the errno triage. */
static void pf__send_batch(pf_dispatcher *d, int s, int n)
{
    pf__worker *w = &d->workers[s];
    int fds[PF_MAX_FDS];
    int rc;

    if (n > d->pcount)
        n = d->pcount;
    pf__pend_peek(d, fds, n);
    rc = pf_send_msg(w->chan, PF_MSG_CONN, 0, NULL, 0, fds, n);
    if (rc == 0) {
        d->st.redispatched += (uint64_t)pf__pend_consume(d, n);
        d->st.dispatched += (uint64_t)n;
        w->sent += (uint64_t)n;
        __atomic_store_n(&d->board[s].sent, w->sent, __ATOMIC_RELEASE);
        return;
    }
    d->st.busy_skips++;
    if (rc == -EAGAIN) {
        /* The worker's queue is full: it is busy. EPOLLOUT fires once the
         * worker has read enough (unix_writable: a quarter of sndbuf). */
        w->blocked = PF__BLK_OUT;
        if (!w->out_armed && pf__chan_events(d, s, EPOLLOUT) < 0)
            w->blocked = PF__BLK_RETRY;
    } else if (pf__gone_errno(rc)) {
        pf__mark_gone(d, s);
    } else {
        w->blocked = PF__BLK_RETRY;
    }
    if (w->blocked == PF__BLK_RETRY && d->recheck_ns == 0)
        d->recheck_ns = pf__now_ns() + pf__ms_to_ns(PF__RECHECK_MS);
}

/* Returns nothing; sends pending fds until the ring is empty or no worker
 * can take more.
 * Terminates: every iteration either shrinks the ring or takes one worker
 * out of the candidates (blocked or gone). */
void pf__flush(pf_dispatcher *d)
{
    /* rr share, fixed for this flush: floor(pending / ready), at least 1,
     * so 7 fds over 3 workers go 2, 2, 2, 1 rather than 3, 2, 1, 1. */
    int share = d->n_ready > 0 ? d->pcount / d->n_ready : 1;

    if (share < 1)
        share = 1;
    while (d->pcount > 0) {
        int n = 0;
        int s = d->cfg.policy == PF_POLICY_LEAST ? pf__pick_least(d, &n)
                                                 : pf__pick_rr(d, share, &n);
        if (s < 0) {
            s = pf__pick_prefetch(d);
            n = 1;
        }
        if (s < 0)
            return;
        pf__send_batch(d, s, n);
    }
}

/* ---- take-back ---------------------------------------------------------------- */

/* Reads one CONN queued to slot s back from the worker's end we hold into
 * fds[]; returns how many fds it carried (0: none, or not safe to read).
 * SEQPACKET gives each datagram to one reader: either we get it or the
 * worker does. Only from a non-blocking file description (pyfork's workers
 * make theirs so): the worker may empty the queue between our look and our
 * read. If what we read is not a CONN (the worker took the CONN between the
 * peek and the read, and a message for it came next), it goes back. */
static int pf__take_back_one(pf_dispatcher *d, int s, int *fds)
{
    pf__worker *w = &d->workers[s];
    pf_msg_hdr h;
    int n;
    ssize_t k;

    do
        k = recv(w->peer, &h, sizeof(h), MSG_PEEK | MSG_DONTWAIT);
    while (k < 0 && errno == EINTR);
    if (k != (ssize_t)sizeof(h) || h.magic != PF_MSG_MAGIC || h.type != PF_MSG_CONN)
        return 0;
    n = pf_recv_msg(w->peer, &h, d->scratch, PF_MAX_PAYLOAD, fds, PF_MAX_FDS);
    if (n <= 0)
        return 0;               /* EAGAIN: the worker took it first */
    if (h.type != PF_MSG_CONN) {
        if (pf_send_msg(w->chan, h.type, h.arg, d->scratch, h.len, fds, n) < 0)
            d->st.dropped += (uint64_t)n;
        for (int i = 0; i < n; i++)
            close(fds[i]);
        return 0;
    }
    w->sent -= (uint64_t)n;     /* never reached the worker */
    __atomic_store_n(&d->board[s].sent, w->sent, __ATOMIC_RELEASE);
    return n;
}

/* Takes back what waits in slot s's channel, oldest first, to the front of
 * the ring (they were accepted before anything there), in their order. */
static void pf__take_back(pf_dispatcher *d, int s)
{
    int fds[PF__PREFETCH_MAX * PF_MAX_FDS], n = 0, fl;

    if (d->workers[s].peer < 0)
        return;
    fl = fcntl(d->workers[s].peer, F_GETFL);
    if (fl < 0 || !(fl & O_NONBLOCK))
        return;
    while (n + PF_MAX_FDS <= (int)(sizeof(fds) / sizeof(fds[0])) &&
           d->cfg.max_pending - d->pcount - n >= PF_MAX_FDS) {
        int k = pf__take_back_one(d, s, fds + n);

        if (k == 0)
            break;
        n += k;
    }
    while (n > 0)
        pf__pend_push_front(d, fds[--n]);     /* room checked above */
}

/* Returns 1 when a worker other than slot `except` (whose request has run
 * PF__RESCUE_US) would start a connection sooner: it can start one now, or
 * it could take a prefetched one behind a request that began less than
 * PF__RESCUE_US ago (a worker moving through light requests). Every busy
 * candidate that cannot is asked for a CREDIT (pf__room) on the way, so the
 * first to free room wakes us to look again. */
static int pf__someone_sooner(pf_dispatcher *d, int except, uint64_t now)
{
    const uint64_t young = (uint64_t)PF__RESCUE_US * PF__NS_PER_US;
    uint64_t since;
    int64_t extra;

    for (int s = 0; s < d->hi; s++) {
        if (s == except || !pf__candidate(d, s))
            continue;
        if (pf__can_prefetch(d, s, now, young, &extra, &since) || pf__room(d, s) > 0)
            return 1;
    }
    return 0;
}

/* Returns nothing; for every worker that may hold prefetched connections:
 * forgets it once its channel is empty (or it is no longer READY), takes
 * back what waits there once its request in progress has run
 * PF__RESCUE_US while another worker would start them sooner, or
 * PF__TAKEBACK_US whatever the others do -- or once it has looked idle for
 * PF__TAKEBACK_IDLE_US with them still queued (it is not reading) -- and
 * sets takeback_ns to the next look: every PF__TAKEBACK_US while a worker is
 * idle (its next request may start, and run long, any moment). Between
 * PF__RESCUE_US and PF__TAKEBACK_US with nobody sooner, the busy workers
 * are asked for a CREDIT, so the first that frees up wakes us, and
 * rescue_wait keeps pf__forget_credits from withdrawing that request. */
void pf__take_back_due(pf_dispatcher *d, uint64_t now)
{
    const uint64_t age = (uint64_t)PF__TAKEBACK_US * PF__NS_PER_US;
    const uint64_t rescue = (uint64_t)PF__RESCUE_US * PF__NS_PER_US;
    const uint64_t idle_age = (uint64_t)PF__TAKEBACK_IDLE_US * PF__NS_PER_US;

    d->takeback_ns = 0;
    d->rescue_wait = 0;
    /* After DRAINED nothing may come back to the ring: every worker is about
     * to drain, and it serves what waits in its channel before the DRAIN that
     * follows it; a connection taken back now would find no worker. */
    if (d->drained)
        return;
    for (int s = 0; s < d->hi && d->n_behind > 0; s++) {
        pf__worker *w = &d->workers[s];
        uint64_t since, due, taken;

        if (!w->behind)
            continue;
        taken = __atomic_load_n(&d->board[s].taken, __ATOMIC_ACQUIRE);
        since = __atomic_load_n(&d->board[s].busy_since_ns, __ATOMIC_RELAXED);
        if (w->state == PF_WORKER_READY && taken < w->sent) {
            if (since == 0 && w->idle_seen_ns == 0)
                w->idle_seen_ns = now;
            else if (since != 0)
                w->idle_seen_ns = 0;
            if (since == 0)
                due = w->idle_seen_ns + idle_age;
            else if (now < since + rescue)
                due = since + rescue;
            else if (now >= since + age)
                due = since + age;
            else if (pf__someone_sooner(d, s, now))
                due = now;
            else
                due = since + age, d->rescue_wait = 1;
            if (now < due) {
                /* idle: look again soon, a request may start meanwhile */
                uint64_t look = since == 0 && now + age < due ? now + age : due;

                if (d->takeback_ns == 0 || look < d->takeback_ns)
                    d->takeback_ns = look;
                continue;
            }
            pf__take_back(d, s);
            w->barred = 1;
            w->barred_since = since;
        }
        w->behind = 0;
        w->idle_seen_ns = 0;
        d->n_behind--;
    }
}

/* Returns nothing; nothing waits for room any more (the ring is empty, no
 * parked connection waits for it, no rescue is pending), so a CREDIT asked
 * for earlier would only wake us for nothing: withdraw every request for
 * one. Without this a worker skipped once as full sent a CREDIT at its next
 * idle moment whatever happened meanwhile -- at 4 clients on 2 sync workers,
 * 0.46 CREDITs per connection, each a sendmsg there and a wake-up and three
 * recvs here. Safe against the handshake in pf__room: a CREDIT is only a
 * hint to look again, and whoever needs room later asks anew (store, fence,
 * look). Only the lines we asked are touched, and read before written:
 * each is the line its worker writes at every request. */
void pf__forget_credits(pf_dispatcher *d)
{
    for (int s = 0; s < d->hi && d->n_asked > 0; s++) {
        if (!d->workers[s].asked)
            continue;
        d->workers[s].asked = 0;
        d->n_asked--;
        if (__atomic_load_n(&d->board[s].want_credit, __ATOMIC_RELAXED))
            __atomic_store_n(&d->board[s].want_credit, 0, __ATOMIC_RELAXED);
    }
    d->n_asked = 0;             /* a slot re-added since it was asked was zeroed */
}
