"""From the pending ring to a worker's channel, pure backend (csrc/dispatch_send.c).

Theory of operation: accepted (or recovered) fds wait in the pending ring
(a deque of at most max_pending). flush(d) repeatedly picks a worker by
policy, takes a batch of fds from the front of the ring and sends them in
ONE sendmsg (up to MAX_FDS), then closes the primary's copies. A worker is
a candidate when it is READY, not blocked, and can start a connection now
(the central queue, M/G/k; see csrc/dispatch_send.c):
  queued + fresh + active < capacity, queued = sent - scoreboard.taken,
(fresh: taken, first request not begun yet; csrc/pyfork.h) and it gets at
most capacity - (queued + fresh + active) fds (one for a sync worker).
A worker that declared no capacity (0) is limited only by the separate,
large open-connection cap: sent - scoreboard.closed < max_inflight.
  rr     round robin over candidates; each gets a fair share
         floor(pending / ready) of the batch, capped by its room.
  least  the candidate with the lowest load: queued + active (open
         connections without a declared capacity) plus one for every
         LEAST_AGE_NS its request in progress has been running; ties go to
         an idle one, then to the one whose request in progress started most
         recently, then to the next after the last one chosen; it gets
         enough fds to catch up with the runner-up.
Prefetch with take-back: when no worker can start one, up to PREFETCH_MAX,
one per message, may wait in the channel of a worker that is idle or whose
request began < PREFETCH_NS ago; once that request has run TAKEBACK_NS (or
RESCUE_NS, when another worker would start them sooner), take_back_due reads
them back through the worker's end the primary holds, for the first worker
that can start them (csrc/dispatch_send.c and
pf_internal.h say why).
Skipping a worker for lack of room sets its want_credit; it sends MSG_CREDIT
when it next frees room; once nothing waits for room, forget_credits withdraws
the requests (each tick). When no worker can start, the fds stay in the ring
(at most accept_batch) and the loop leaves the listeners out of the poll set:
the ring and then the kernel's backlog are the central FIFO (why listeners
stay polled while the ring is empty: csrc/dispatch_send.c).
sendmsg errno triage: EAGAIN = that worker is busy, arm EPOLLOUT and try
the next; EPIPE & co = the worker is gone, HANGUP it and the same fds go to
the next; anything else = transient, retry on the recheck timer. Every
function takes the dispatcher's State (internal.py) as ``d``, as the C ones
take pf_dispatcher; flush, mark_gone, clear_retry, chan_events, take_back_due
and forget_credits are the ones the other modules call (pf_internal.h declares
the same six).
"""

import errno
import fcntl
import itertools
import os
import select
import socket
import time

from pyfork._api import MAX_FDS, MSG_CONN, STATE_FREE, STATE_GONE, STATE_READY
from pyfork._pure.fdpass import HDR, HDR_SIZE, MSG_MAGIC, recv_on, send_on
from pyfork._pure.internal import (
    BLK_NONE, BLK_OUT, BLK_RETRY, CHAN_EVENTS, LEAST_AGE_NS, PREFETCH_MAX, PREFETCH_NS, RECHECK_S,
    RESCUE_NS, TAKEBACK_IDLE_NS, TAKEBACK_NS, close_all, unregister,
)

_U64_MAX = (1 << 64) - 1
_GONE_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN))


def _open(d, s):
    """Connections open on slot s: sent + accepted (by the worker itself) - closed
    (clamped at 0)."""
    sv = d.slots[s]
    closed = sv.closed
    sent = d.workers[s].sent + sv.accepted
    return 0 if closed >= sent else sent - closed


def _work(d, s):
    """Queued (sent - taken, clamped), fresh (taken, first request not begun, for at most
    FRESH_MS) and running on slot s, read in that order (csrc/dispatch_send.c says why)."""
    slot = d.slots[s]
    taken = slot.taken
    sent = d.workers[s].sent
    return (0 if taken >= sent else sent - taken) + slot.fresh_work() + slot.active


def _busy(d, s):
    """least's load: work, or open connections without a declared capacity."""
    return _work(d, s) if d.slots[s].capacity else _open(d, s)


def _free(d, s):
    """How many fds slot s can start now, within the open-connection cap."""
    room = d.cfg.max_inflight - _open(d, s)
    cap = d.slots[s].capacity
    if cap == 0:
        return room
    return min(cap - _work(d, s), room)


def _room(d, s):
    """How many more fds slot s may take now; 0 = none (skip it). With no
    room it asks for a CREDIT (want_credit), then looks again: room freed
    meanwhile (a request finished, a connection closed) either shows up here
    or sends the CREDIT (and the 10 ms recheck covers what Python cannot
    fence)."""
    room = _free(d, s)
    if room > 0:
        return room
    if not d.workers[s].asked:
        d.workers[s].asked = True
        d.n_asked += 1
    d.slots[s].request_credit()
    room = _free(d, s)
    return room if room > 0 else 0


def _candidate(d, s):
    w = d.workers[s]
    return w.state == STATE_READY and w.blocked == BLK_NONE


def _all_full(d):
    """True when there are workers and each one's declared capacity is taken by its work:
    none can start a connection, and not because of the open-connection cap
    (csrc/dispatch_send.c pf__all_full says why). A look: no CREDIT asked."""
    n = 0
    for s in range(d.hi):
        if not _candidate(d, s):
            continue
        cap = d.slots[s].capacity
        if cap == 0 or cap - _work(d, s) > 0:
            return False
        n += 1
    return n > 0


def pull_over(d, now):
    """Pulling: True when it is no longer needed, looked at every RECHECK_S: every worker
    is idle, or one was idle at the last look too and got nothing since (its handled,
    taken and accepted counts did not move); csrc/dispatch_send.c pf__pull_over says why."""
    if now < d.pull_look_at:
        return False
    d.pull_look_at = now + RECHECK_S
    n, busy, unused = 0, False, False
    for s in range(d.hi):
        if not _candidate(d, s):
            continue
        n += 1
        w = d.workers[s]
        if _work(d, s):
            busy = True
            w.idle_mark = 0
            continue
        sv = d.slots[s]
        mark = 1 + sv.handled + sv.taken + sv.accepted
        if w.idle_mark == mark:
            unused = True
        w.idle_mark = mark
    return n > 0 and (not busy or unused)


def pull_start(d):
    """When every worker is full: leave the new connection in the kernel's queue, and let
    the first worker that frees room accept it itself (csrc/dispatch_send.c says why).
    True when the pull started."""
    if not _all_full(d):
        return False
    for s in range(d.hi):
        d.workers[s].idle_mark = 0
        d.slots[s].set_pull(True)
    if not _all_full(d):     # look again after the stores (C fences here; pull_over covers us)
        pull_end(d)
        return False
    d.pulling = True
    d.st["pulls"] += 1
    d.pull_look_at = time.monotonic() + RECHECK_S
    return True


def pull_end(d):
    d.pulling = False
    for s in range(d.hi):
        if d.slots[s].pull:
            d.slots[s].set_pull(False)


def _can_prefetch(d, s, now, young_ns):
    """Can slot s take a prefetched connection? A candidate whose end we hold (only there can
    one be taken back) with a declared capacity, fewer than PREFETCH_MAX beyond it, room under
    the open-connection cap, not barred, and idle or running a request that began < young_ns
    ago. Returns (its count beyond capacity, its busy_since_ns), or None
    (csrc/dispatch_send.c pf__can_prefetch)."""
    if not _candidate(d, s) or d.workers[s].psock is None:
        return None
    slot = d.slots[s]
    cap = slot.capacity
    if not cap or d.cfg.max_inflight - _open(d, s) <= 0:
        return None
    since = slot.busy_since_ns
    if since and since + young_ns <= now:
        return None
    w = d.workers[s]
    if w.barred_since is not None:
        if since == w.barred_since:
            return None         # what we just took back would come straight back
        w.barred_since = None   # it moved on: a new request, or idle again
    extra = _work(d, s) - cap
    return (extra, since) if extra < PREFETCH_MAX else None


def _pick_prefetch(d):
    """No worker can start one now: of the slots _can_prefetch accepts, one idle or whose
    request began < RESCUE_NS ago if there is one (else take_back_due would move the
    connection to it at once), then the fewest beyond capacity, then the idle or most
    recently started. Arms the take-back scan for it (first look: when the request it waits
    behind may be a slow one). Returns the slot or -1 (csrc/dispatch_send.c
    pf__pick_prefetch)."""
    best, bextra, bsince, bfresh = -1, 0, 0, False
    now = time.monotonic_ns()
    for s in range(d.hi):
        got = _can_prefetch(d, s, now, PREFETCH_NS)
        if got is None:
            continue
        extra, since = got
        fresh = not since or since + RESCUE_NS > now
        since = since or _U64_MAX       # idle: as young as it gets
        if (best < 0 or fresh > bfresh
                or (fresh == bfresh and (extra < bextra or (extra == bextra and since > bsince)))):
            best, bextra, bsince, bfresh = s, extra, since, fresh
    if best < 0:
        return -1
    if not d.workers[best].behind:
        d.workers[best].behind = True
        d.n_behind += 1
    look_ns = now + TAKEBACK_NS if bsince == _U64_MAX else bsince + RESCUE_NS
    at = time.monotonic() + (look_ns - now) / 1e9
    if not d.takeback_at or at < d.takeback_at:
        d.takeback_at = at
    return best


def _pick_rr(d, share):
    hi = d.hi
    for i in range(hi):
        s = (d.rr_next + i) % hi
        if not _candidate(d, s):
            continue
        room = _room(d, s)
        if room == 0:
            d.st["busy_skips"] += 1
            continue
        d.rr_next = s + 1
        return s, min(share, room, MAX_FDS)
    return -1, 0


def _better(d, a, la, b, lb):
    if la != lb:
        return la < lb
    ba = d.slots[a].busy_since_ns
    bb = d.slots[b].busy_since_ns
    if (ba == 0) != (bb == 0):
        return ba == 0      # idle beats busy
    return ba > bb          # busy since later = less likely stuck


def _pick_least(d):
    """The emptiest candidate, with enough fds to catch up with the
    runner-up."""
    best = -1
    bload = broom = 0
    second = None
    now = time.monotonic_ns()
    hi = d.hi
    for i in range(hi):
        # From after the last slot chosen: full ties take turns.
        s = (d.rr_next + i) % hi
        if not _candidate(d, s):
            continue
        room = _room(d, s)
        if room == 0:
            d.st["busy_skips"] += 1
            continue
        since = d.slots[s].busy_since_ns
        age = (now - since) // LEAST_AGE_NS if 0 < since < now else 0
        load = _busy(d, s) + age
        if best < 0 or _better(d, s, load, best, bload):
            if best >= 0:
                second = bload if second is None else min(second, bload)
            best, bload, broom = s, load, room
        else:
            second = load if second is None else min(second, load)
    if best < 0:
        return -1, 0
    d.rr_next = best + 1
    n = min(broom, MAX_FDS)
    if second is not None and second - bload < n:
        n = max(second - bload, 1)
    return best, n


def chan_events(d, w, extra):
    """Sets worker w's channel poll mask to CHAN_EVENTS | extra (EPOLLOUT or 0)."""
    d.ep.modify(w.chan, CHAN_EVENTS | extra)
    w.out_armed = bool(extra & select.EPOLLOUT)


def mark_gone(d, s):
    """The channel is dead: no more sends, no more polling, and the caller
    is owed exactly one HANGUP (emitted by the loop)."""
    w = d.workers[s]
    if w.state in (STATE_GONE, STATE_FREE):
        return
    if w.state == STATE_READY:
        d.n_ready -= 1
    w.state = STATE_GONE
    w.blocked = BLK_NONE
    if w.in_epoll:
        unregister(d, w.chan)
        w.in_epoll = w.out_armed = False
    w.hup_pending = True
    d.n_hup += 1


def clear_retry(d):
    """The recheck timer is due: workers skipped for a transient send error
    are candidates again."""
    for w in d.workers[:d.hi]:
        if w.blocked == BLK_RETRY:
            w.blocked = BLK_NONE
    d.recheck_at = 0.0


def _send_batch(d, s, n):
    w = d.workers[s]
    pend = d.pend
    batch = list(itertools.islice(pend, min(n, len(pend))))
    fds = [fd for fd, _ in batch]
    try:
        send_on(w.sock, MSG_CONN, 0, b"", fds)
    except OSError as exc:
        code = exc.errno
    else:
        for _ in batch:
            pend.popleft()
        close_all(fds)  # the worker holds its own copies now
        st = d.st
        st["redispatched"] += sum(1 for _, r in batch if r)
        st["dispatched"] += len(batch)
        w.sent += len(batch)
        d.slots[s].publish_sent(w.sent)
        return
    d.st["busy_skips"] += 1
    if code in (errno.EAGAIN, errno.EWOULDBLOCK):
        # The worker's queue is full: it is busy. EPOLLOUT fires once it
        # has read enough.
        w.blocked = BLK_OUT
        if not w.out_armed:
            try:
                chan_events(d, w, select.EPOLLOUT)
            except OSError:
                w.blocked = BLK_RETRY
    elif code in _GONE_ERRNOS:
        mark_gone(d, s)
    else:
        w.blocked = BLK_RETRY  # ENOBUFS, ETOOMANYREFS: try again later
    if w.blocked == BLK_RETRY and not d.recheck_at:
        d.recheck_at = time.monotonic() + RECHECK_S


def flush(d):
    """Sends pending fds until none is left or no worker can take more.
    rr share, fixed for this flush: floor(pending / ready), at least 1."""
    pend = d.pend
    share = max(len(pend) // d.n_ready, 1) if d.n_ready > 0 else 1
    while pend:
        if d.least:
            s, n = _pick_least(d)
        else:
            s, n = _pick_rr(d, share)
        if s < 0:
            s, n = _pick_prefetch(d), 1
        if s < 0:
            return
        _send_batch(d, s, n)


# ---- take-back ------------------------------------------------------------------

def _take_back_one(d, w):
    """One CONN read back from worker w's end into a list of fds ([]: none, or not safe);
    see csrc/dispatch_send.c pf__take_back_one."""
    psock = w.psock
    try:
        head = psock.recv(HDR_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return []
    if len(head) != HDR_SIZE:
        return []
    magic, mtype = HDR.unpack(head)[:2]
    if magic != MSG_MAGIC or mtype != MSG_CONN:
        return []
    try:
        msg = recv_on(psock, MAX_FDS, socket.MSG_DONTWAIT)
    except OSError:
        return []               # EAGAIN: the worker took it first
    if msg.type != MSG_CONN:    # the worker took the CONN first: give this one back
        try:
            send_on(w.sock, msg.type, msg.arg, msg.payload, msg.fds)
        except OSError:
            d.st["dropped"] += len(msg.fds)
        close_all(msg.fds)
        return []
    w.sent -= len(msg.fds)      # never reached the worker
    return msg.fds


def _take_back(d, s):
    """Takes back what waits in slot s's channel, oldest first, to the front of the ring."""
    w = d.workers[s]
    if w.psock is None:
        return
    try:
        if not fcntl.fcntl(w.peer, fcntl.F_GETFL) & os.O_NONBLOCK:
            return
    except OSError:
        return
    got = []
    while (len(got) + MAX_FDS <= PREFETCH_MAX * MAX_FDS
           and d.cfg.max_pending - len(d.pend) - len(got) >= MAX_FDS):
        fds = _take_back_one(d, w)
        if not fds:
            break
        got += fds
    d.slots[s].publish_sent(w.sent)
    d.pend.extendleft((fd, True) for fd in reversed(got))


def _someone_sooner(d, except_s, now):
    """True when a worker other than except_s (whose request has run RESCUE_NS) would start a
    connection sooner: it can start one now, or take a prefetched one behind a request that
    began < RESCUE_NS ago. Busy candidates that cannot are asked for a CREDIT (_room)
    (csrc/dispatch_send.c pf__someone_sooner)."""
    for s in range(d.hi):
        if s == except_s or not _candidate(d, s):
            continue
        if _can_prefetch(d, s, now, RESCUE_NS) is not None or _room(d, s) > 0:
            return True
    return False


def take_back_due(d):
    """For every worker that may hold prefetched connections: forgets it once its channel
    is empty (or it is not READY), takes back what waits there once its request has run
    RESCUE_NS while another worker would start them sooner, or TAKEBACK_NS whatever the
    others do (or once it has looked idle for TAKEBACK_IDLE_NS with them queued), and sets
    takeback_at to the next look (csrc/dispatch_send.c pf__take_back_due)."""
    d.takeback_at = 0.0
    d.rescue_wait = False
    if not d.n_behind or d.drained:
        return      # after DRAINED a connection taken back would find no worker to go to
    now = time.monotonic_ns()
    for s in range(d.hi):
        w = d.workers[s]
        if not w.behind:
            continue
        slot = d.slots[s]
        taken, since = slot.taken, slot.busy_since_ns
        if w.state == STATE_READY and taken < w.sent:
            if not since and not w.idle_seen_ns:
                w.idle_seen_ns = now
            elif since:
                w.idle_seen_ns = 0
            if not since:
                due = w.idle_seen_ns + TAKEBACK_IDLE_NS
            elif now < since + RESCUE_NS:
                due = since + RESCUE_NS
            elif now >= since + TAKEBACK_NS:
                due = since + TAKEBACK_NS
            elif _someone_sooner(d, s, now):
                due = now
            else:
                due = since + TAKEBACK_NS
                d.rescue_wait = True
            if now < due:
                # idle: look again soon, a request may start meanwhile
                look = min(due, now + TAKEBACK_NS) if not since else due
                at = time.monotonic() + (look - now) / 1e9
                if not d.takeback_at or at < d.takeback_at:
                    d.takeback_at = at
                continue
            _take_back(d, s)
            w.barred_since = since
        w.behind = False
        w.idle_seen_ns = 0
        d.n_behind -= 1


def forget_credits(d):
    """Nothing waits for room any more: withdraw every CREDIT asked for, or a worker
    skipped once as full would wake us for nothing at its next idle moment. Only the
    slots asked are touched (csrc/dispatch_send.c pf__forget_credits)."""
    if not d.n_asked:
        return
    for s in range(d.hi):
        w = d.workers[s]
        if w.asked:
            w.asked = False
            if d.slots[s].want_credit:
                d.slots[s].forget_credit()
    d.n_asked = 0
