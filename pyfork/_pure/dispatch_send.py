"""From the pending ring to a worker's channel, pure backend (csrc/dispatch_send.c).

Theory of operation: accepted (or recovered) fds wait in the pending ring
(a deque of at most max_pending). _flush repeatedly picks a worker by
policy, takes a batch of fds from the front of the ring and sends them in
ONE sendmsg (up to MAX_FDS), then closes the primary's copies. A worker is
a candidate when it is READY, not blocked, and has room:
sent - scoreboard.closed < max_inflight.
  rr     round robin over candidates; each gets a fair share
         floor(pending / ready) of the batch (one sendmsg per worker, not
         one per fd).
  least  the candidate with the lowest score: connections in flight plus
         one for every _LEAST_AGE_NS its request in progress has been running
         (a worker stuck on one long request must not get the next one); ties
         go to an idle one, then to the one whose request in progress started
         most recently, then to the next after the last one chosen; it gets
         enough fds to catch up with the runner-up.
sendmsg errno triage: EAGAIN = that worker is busy, arm EPOLLOUT and try
the next; EPIPE & co = the worker is gone, HANGUP it and the same fds go to
the next; anything else = transient, retry on the recheck timer. _Send is a
mixin of Dispatcher (dispatch.py), whose __init__ sets the state used.
"""

import errno
import itertools
import select
import time

from pyfork._pure.fdpass import MAX_FDS, MSG_CONN, _close_all, _send
from pyfork._pure.internal import (
    _BLK_NONE, _BLK_OUT, _BLK_RETRY, _CHAN_EVENTS, _LEAST_AGE_NS, _RECHECK_S, STATE_FREE, STATE_GONE,
    STATE_READY,
)

_GONE_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN))


class _Send:
    """Dispatcher methods that choose workers and send them fds."""

    def _load(self, s):
        closed = self._slots[s].closed
        sent = self._workers[s].sent
        return 0 if closed >= sent else sent - closed

    def _room(self, s):
        """How many more fds slot s may take now; 0 = full, a busy skip. When
        full it asks for a CREDIT (want_credit), then looks again: a close that
        raced the skip either shows up here or sends the CREDIT (and the 10 ms
        recheck covers what Python cannot fence)."""
        room = self._max_inflight - self._load(s)
        if room > 0:
            return room
        self._slots[s].request_credit()
        room = self._max_inflight - self._load(s)
        if room > 0:
            return room
        self._st["busy_skips"] += 1
        return 0

    def _candidate(self, s):
        w = self._workers[s]
        return w.state == STATE_READY and w.blocked == _BLK_NONE

    def _pick_rr(self, share):
        hi = self._hi
        for i in range(hi):
            s = (self._rr_next + i) % hi
            if not self._candidate(s):
                continue
            room = self._room(s)
            if room == 0:
                continue
            self._rr_next = s + 1
            return s, min(share, room, MAX_FDS)
        return -1, 0

    def _better(self, a, la, b, lb):
        if la != lb:
            return la < lb
        ba = self._slots[a].busy_since_ns
        bb = self._slots[b].busy_since_ns
        if (ba == 0) != (bb == 0):
            return ba == 0      # idle beats busy
        return ba > bb          # busy since later = less likely stuck

    def _pick_least(self):
        """The emptiest candidate, with enough fds to catch up with the
        runner-up."""
        best = -1
        bload = broom = 0
        second = None
        now = time.monotonic_ns()
        hi = self._hi
        for i in range(hi):
            # From after the last slot chosen: full ties take turns.
            s = (self._rr_next + i) % hi
            if not self._candidate(s):
                continue
            room = self._room(s)
            if room == 0:
                continue
            since = self._slots[s].busy_since_ns
            age = (now - since) // _LEAST_AGE_NS if 0 < since < now else 0
            load = self._max_inflight - room + age
            if best < 0 or self._better(s, load, best, bload):
                if best >= 0:
                    second = bload if second is None else min(second, bload)
                best, bload, broom = s, load, room
            else:
                second = load if second is None else min(second, load)
        if best < 0:
            return -1, 0
        self._rr_next = best + 1
        n = min(broom, MAX_FDS)
        if second is not None and second - bload < n:
            n = max(second - bload, 1)
        return best, n

    def _chan_events(self, w, extra):
        self._ep.modify(w.chan, _CHAN_EVENTS | extra)
        w.out_armed = bool(extra & select.EPOLLOUT)

    def _mark_gone(self, s):
        """The channel is dead: no more sends, no more polling, and the caller
        is owed exactly one HANGUP (emitted by the loop)."""
        w = self._workers[s]
        if w.state in (STATE_GONE, STATE_FREE):
            return
        if w.state == STATE_READY:
            self._n_ready -= 1
        w.state = STATE_GONE
        w.blocked = _BLK_NONE
        if w.in_epoll:
            self._unregister(w.chan)
            w.in_epoll = w.out_armed = False
        w.hup_pending = True
        self._n_hup += 1

    def _clear_retry(self):
        for w in self._workers[:self._hi]:
            if w.blocked == _BLK_RETRY:
                w.blocked = _BLK_NONE
        self._recheck_at = 0.0

    def _send_batch(self, s, n):
        w = self._workers[s]
        batch = list(itertools.islice(self._pend, min(n, len(self._pend))))
        fds = [fd for fd, _ in batch]
        try:
            _send(w.sock, MSG_CONN, 0, b"", fds)
        except OSError as exc:
            code = exc.errno
        else:
            for _ in batch:
                self._pend.popleft()
            _close_all(fds)  # the worker holds its own copies now
            self._st["redispatched"] += sum(1 for _, r in batch if r)
            self._st["dispatched"] += len(batch)
            w.sent += len(batch)
            return
        self._st["busy_skips"] += 1
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            # The worker's queue is full: it is busy. EPOLLOUT fires once it
            # has read enough.
            w.blocked = _BLK_OUT
            if not w.out_armed:
                try:
                    self._chan_events(w, select.EPOLLOUT)
                except OSError:
                    w.blocked = _BLK_RETRY
        elif code in _GONE_ERRNOS:
            self._mark_gone(s)
        else:
            w.blocked = _BLK_RETRY  # ENOBUFS, ETOOMANYREFS: try again later
        if w.blocked == _BLK_RETRY and not self._recheck_at:
            self._recheck_at = time.monotonic() + _RECHECK_S

    def _flush(self):
        """Sends pending fds until none is left or no worker can take more.
        rr share, fixed for this flush: floor(pending / ready), at least 1."""
        share = max(len(self._pend) // self._n_ready, 1) if self._n_ready > 0 else 1
        while self._pend:
            if self._least:
                s, n = self._pick_least()
            else:
                s, n = self._pick_rr(share)
            if s < 0:
                return
            self._send_batch(s, n)
