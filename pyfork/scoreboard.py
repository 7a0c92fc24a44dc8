"""The shared scoreboard: one 256-byte line per worker slot (Apache httpd's idea).

Theory of operation: the dispatcher maps a MAP_SHARED|MAP_ANONYMOUS region of
``capacity * SLOT_SIZE`` bytes before the first fork, so every worker inherits the
same pages. Each worker writes only its own line (``pf_slot`` in
csrc/pyfork.h) and the primary reads it at dispatch time with no syscall:
``taken`` gives the connections a worker has read from its channel (queued =
sent - taken), ``fresh`` those of them whose first request has not begun yet
(work: a sync worker that took one is not idle, even before the request's
bytes arrive; it counts for FRESH_MS after it rose from 0, at ``fresh_ms``, so
an idle preconnect holds no worker), ``active``/``busy_since_ns`` say how busy
it is and ``capacity`` how many requests it can run at once, so the primary
sends a connection only to a worker that can start it now (queued + fresh +
active < capacity); ``closed`` gives the connections it has finished (open = sent -
closed, under a large safety cap); ``heartbeat_ns`` says it is alive. The
primary writes three fields: ``want_credit``, set when it skipped this worker
for lack of room, cleared by the worker when it next frees room (a request
finished, a connection closed), which then sends PF_MSG_CREDIT so a blocked
primary wakes up -- unless ``sent`` (what the primary has put in its channel)
is still above ``taken``: then the worker goes on to the next one and owes
nothing yet (the primary clears ``want_credit`` again once nothing waits for
room); and ``park_off`` once it stops. The first 64 bytes hold everything the dispatcher reads per
connection; the next 128 the request-duration histogram (``duration_le``,
``duration_sum_ns``), which the worker counts into in ``request_finished`` with
the clock reading it already makes, and the primary reads only for a metrics
scrape. A finished request's age is the mean age of the requests in progress
(``now - started_sum_ns / active``): exact for one request at a time, and
the sum of durations stays exact either way (csrc/slot.c says why).

Fields are accessed through memoryview casts ("Q"/"I" in native byte order,
which is the little-endian layout the C struct has on the targets we build
for), so every read and write is one aligned machine load or store.
"""

import sys
import time
from bisect import bisect_left as _bisect_left

from pyfork._api import SLOT_SIZE

# pf_slot offsets (bytes): closed 0, handled 8, heartbeat_ns 16,
# busy_since_ns 24, active 32, pid 36, want_credit 40, capacity 44, taken 48,
# fresh 56, fresh_ms 60, started_sum_ns 64, duration_sum_ns 72, duration_le[14] 80..191,
# park_off 192, pull 196, sent 200, accepted 208 (then reserved to 255). As indexes into the u64 and u32
# views of one line:
_Q_CLOSED, _Q_HANDLED, _Q_HEARTBEAT, _Q_BUSY_SINCE, _Q_TAKEN, _Q_SENT, _Q_ACCEPTED = 0, 1, 2, 3, 6, 25, 26
SENT_QWORD, ACCEPTED_QWORD = _Q_SENT, _Q_ACCEPTED    # checked against the C struct by pyfork._core
_Q_STARTED_SUM, _Q_DURATION_SUM, _Q_DURATION_LE = 8, 9, 10
_I_ACTIVE, _I_PID, _I_WANT_CREDIT, _I_CAPACITY, _I_FRESH, _I_FRESH_MS = 8, 9, 10, 11, 14, 15
# pf_slot.park_off as a u32 index into one line: the primary sets it when it stops, and a
# worker then hands no connection back (pyfork/_pure/park.py, pyfork/worker/runtime.py).
PARK_OFF_WORD = 48
# pf_slot.pull: the primary (rr, least) leaves new connections in the kernel's queue while it is
# set, and a worker with room accepts them itself (csrc/dispatch_send.c, pf__pull_start).
PULL_WORD = 49
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1
# PF_SLOT_FRESH_MS (csrc/pyfork.h, where the number is explained): how long a taken
# connection whose first request has not begun counts as work.
FRESH_MS = 5

_monotonic_ns = time.monotonic_ns

# Upper bounds (ns) of the duration buckets, the same as csrc/slot.c's
# (Prometheus' usual 1 ms .. 10 s spread); one more bucket, +Inf, follows.
HIST_BOUNDS_NS = (1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000, 50_000_000,
                  100_000_000, 250_000_000, 500_000_000, 1_000_000_000, 2_500_000_000,
                  5_000_000_000, 10_000_000_000)
HIST_BUCKETS = len(HIST_BOUNDS_NS) + 1

if sys.byteorder != "little":  # the layout is documented as little-endian
    raise ImportError("pyfork.scoreboard supports little-endian hosts only")

__all__ = ["FRESH_MS", "PARK_OFF_WORD", "PULL_WORD", "SENT_QWORD", "SLOT_SIZE", "HIST_BOUNDS_NS",
           "HIST_BUCKETS", "Scoreboard", "SlotView"]


class Scoreboard:
    """A view of ``capacity`` pf_slot lines over a writable buffer.

    ``buf`` is the dispatcher's ``scoreboard`` memoryview (either backend),
    or any writable bytes-like object of at least ``capacity * 64`` bytes.
    """

    __slots__ = ("capacity", "_raw", "_q", "_i")

    def __init__(self, buf, capacity):
        capacity = int(capacity)
        if capacity < 1:
            raise ValueError("scoreboard capacity must be >= 1, got %d" % capacity)
        mv = memoryview(buf)
        if mv.readonly:
            raise ValueError("scoreboard buffer must be writable")
        if not mv.c_contiguous:
            raise ValueError("scoreboard buffer must be contiguous")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        size = capacity * SLOT_SIZE
        if mv.nbytes < size:
            raise ValueError("scoreboard buffer has %d bytes, %d slots need %d"
                             % (mv.nbytes, capacity, size))
        self.capacity = capacity
        self._raw = mv[:size]
        self._q = self._raw.cast("Q")
        self._i = self._raw.cast("I")

    def slot(self, i):
        """Returns the SlotView of slot ``i`` (0 <= i < capacity)."""
        i = int(i)
        if not 0 <= i < self.capacity:
            raise ValueError("slot %d out of range 0..%d" % (i, self.capacity - 1))
        return SlotView(self, i)

    def __len__(self):
        return self.capacity

    def release(self):
        """Drops the views so the underlying mapping can be unmapped."""
        for mv in (self._q, self._i, self._raw):
            if mv is not None:
                mv.release()
        self._q = self._i = self._raw = None


class SlotView:
    """One worker's line. Worker-side writers, anyone-side readers."""

    __slots__ = ("index", "_q", "_i", "_qb", "_ib", "_qc", "_qh", "_qhb", "_qbs", "_qt", "_qs", "_qa",
                 "_ia", "_iw", "_qss", "_qds", "_qle", "_if", "_ifm")

    def __init__(self, board, index):
        self.index = index
        self._q = board._q
        self._i = board._i
        self._qb = qb = index * (SLOT_SIZE // 8)
        self._ib = ib = index * (SLOT_SIZE // 4)
        # absolute indexes of the fields the worker writes per request/connection
        self._qc, self._qh = qb + _Q_CLOSED, qb + _Q_HANDLED
        self._qhb, self._qbs = qb + _Q_HEARTBEAT, qb + _Q_BUSY_SINCE
        self._qt, self._qs, self._qa = qb + _Q_TAKEN, qb + _Q_SENT, qb + _Q_ACCEPTED
        self._ia, self._iw = ib + _I_ACTIVE, ib + _I_WANT_CREDIT
        self._qss, self._qds, self._qle = qb + _Q_STARTED_SUM, qb + _Q_DURATION_SUM, qb + _Q_DURATION_LE
        self._if, self._ifm = ib + _I_FRESH, ib + _I_FRESH_MS

    @property
    def line(self):
        """This slot's SLOT_SIZE bytes (a writable memoryview), for a backend's SlotWriter."""
        return self._q[self._qb:self._qb + SLOT_SIZE // 8]

    # -- readers -----------------------------------------------------------
    @property
    def closed(self):
        return self._q[self._qb + _Q_CLOSED]

    @property
    def handled(self):
        return self._q[self._qb + _Q_HANDLED]

    @property
    def heartbeat_ns(self):
        return self._q[self._qb + _Q_HEARTBEAT]

    @property
    def busy_since_ns(self):
        return self._q[self._qb + _Q_BUSY_SINCE]

    @property
    def active(self):
        return self._i[self._ib + _I_ACTIVE]

    @property
    def pid(self):
        return self._i[self._ib + _I_PID]

    @property
    def want_credit(self):
        return self._i[self._ib + _I_WANT_CREDIT]

    @property
    def capacity(self):
        """Requests the worker can run at once (0 = not declared)."""
        return self._i[self._ib + _I_CAPACITY]

    @property
    def accepted(self):
        """Connections the worker accepted itself (shared, reuseport)."""
        return self._q[self._qa]

    @property
    def taken(self):
        """Connections the worker has read from its channel."""
        return self._q[self._qb + _Q_TAKEN]

    def durations(self):
        """The request-duration histogram: ``{"counts": [...], "sum_ns": n}``, counts per
        bucket (not cumulative: one per HIST_BOUNDS_NS bound, then +Inf), sum of the
        durations in ns. Read while the worker writes: each value is current, the
        sum may be a request ahead of or behind the counts."""
        qle = self._qle
        return {"counts": self._q[qle:qle + HIST_BUCKETS].tolist(), "sum_ns": self._q[self._qds]}

    @property
    def fresh(self):
        """Taken connections whose first request has not begun (an estimate, never above
        the truth: any request start or connection close lowers it)."""
        return self._i[self._if]

    @property
    def fresh_ms(self):
        """CLOCK_MONOTONIC in ms (low 32 bits) when ``fresh`` last rose from 0."""
        return self._i[self._ifm]

    def fresh_work(self, now_ns=None):
        """``fresh`` while it counts as work (younger than FRESH_MS), else 0."""
        fresh = self._i[self._if]
        if not fresh:
            return 0
        now_ms = ((_monotonic_ns() if now_ns is None else now_ns) // 1_000_000) & _U32
        age = (now_ms - self._i[self._ifm]) & _U32
        if age >= 1 << 31:
            age -= 1 << 32      # signed, as the C core: a time ahead of ours is young
        return fresh if age < FRESH_MS else 0

    # -- worker-side writers ------------------------------------------------
    def set_pid(self, pid):
        self._i[self._ib + _I_PID] = pid & _U32
        self.heartbeat()

    def heartbeat(self):
        self._q[self._qb + _Q_HEARTBEAT] = time.monotonic_ns()

    def request_started(self):
        """A request began: active + 1 and one fresh connection fewer (if any; when the
        request is a kept-alive connection's, fresh drops below the truth, which only makes
        the worker look less busy). active rises before fresh falls: the primary reads
        fresh before active, so it never sees the connection in neither."""
        ia, iv, qv = self._ia, self._i, self._q
        now = _monotonic_ns()
        active = iv[ia]
        if active == 0:
            qv[self._qbs] = qv[self._qss] = now
        else:
            qss = self._qss
            qv[qss] = (qv[qss] + now) & _U64
        iv[ia] = (active + 1) & _U32
        qv[self._qhb] = now
        fresh = iv[self._if]
        if fresh:
            iv[self._if] = fresh - 1

    def request_finished(self):
        """Ends a request. Returns True when the primary asked for credit
        (want_credit was set; it is cleared here): the caller must then send
        MSG_CREDIT, since a finished request is room to start another."""
        # busy_since_ns is "busy without progress since": a finished request is
        # progress, so with requests still in progress it moves to now. That
        # keeps a steadily loaded async worker from looking stuck.
        ia, iv, qv = self._ia, self._i, self._q
        now = _monotonic_ns()
        active = iv[ia]
        if active == 1:                     # one at a time: the common case, exact
            qss = self._qss
            ns = (now - qv[qss]) & _U64
            qv[qss] = 0
            active = 0
            iv[ia] = 0
        elif active:
            # the mean age of those in progress, in wrapping u64 arithmetic as in
            # csrc/slot.c: active * now - started_sum is the sum of their ages
            qss = self._qss
            ns = ((active * now - qv[qss]) & _U64) // active
            qv[qss] = (qv[qss] - (now - ns)) & _U64
            active -= 1
            iv[ia] = active
        else:
            ns = 0                          # a finish with none started counts as 0 s
        b = self._qle + _bisect_left(HIST_BOUNDS_NS, ns)
        qv[b] += 1                          # u64 counts and ns sums: no wrap in 500 years
        qds = self._qds
        qv[qds] += ns
        qh = self._qh
        qv[qh] = (qv[qh] + 1) & _U64
        qv[self._qbs] = now if active else 0
        qv[self._qhb] = now
        # active is written before want_credit is read: the primary sets
        # want_credit and then re-reads active, so one of the two sees the other.
        return self._credit_wanted()

    def conn_closed(self, n=1):
        """Counts ``n`` closed connections. Returns True when the primary asked
        for credit (want_credit was set; it is cleared here): the caller must
        then send MSG_CREDIT on its channel."""
        qc, qv, iv = self._qc, self._q, self._i
        # A connection closed before its first request is work no more (as in
        # request_started, a kept-alive one's close may lower fresh below the truth).
        fresh = iv[self._if]
        if fresh:
            iv[self._if] = fresh - n if fresh > n else 0
        # fresh and closed are written before want_credit is read (as in request_finished).
        qv[qc] = (qv[qc] + n) & _U64
        return self._credit_wanted()

    def _credit_wanted(self):
        """After a store that frees room: True (and want_credit cleared) when the primary
        asked for a CREDIT -- unless we declared a capacity (so we count what we take) and
        connections still wait in our channel (sent > taken): then the room is not real,
        and the finish or close that leaves nothing queued sends it (csrc/slot.c
        pf__credit_wanted says why a stale sent is safe)."""
        w, iv, qv = self._iw, self._i, self._q
        if not iv[w] or (iv[self._ib + _I_CAPACITY] and qv[self._qs] > qv[self._qt]):
            return False
        iv[w] = 0
        return True

    def conn_taken(self, n=1):
        """Counts ``n`` connections read from the channel: no longer queued, but fresh
        (work until their first request begins). Frees no room, so it never owes a
        CREDIT. fresh is written before taken: the primary reads taken first."""
        self._fresh_add(n)
        qt, qv = self._qt, self._q
        qv[qt] = (qv[qt] + n) & _U64

    def conn_accepted(self, n=1):
        """Counts ``n`` connections the worker accepted itself (shared, reuseport): fresh,
        as conn_taken does (the primary sends no parked connection to a worker that has not
        started what it holds), and in ``accepted`` (open = sent + accepted - closed), never
        in ``taken`` (they were never queued)."""
        self._fresh_add(n)
        qa, qv = self._qa, self._q
        qv[qa] = (qv[qa] + n) & _U64

    def _fresh_add(self, n):
        iv, fresh = self._i, self._i[self._if]
        if not fresh:
            iv[self._ifm] = (_monotonic_ns() // 1_000_000) & _U32
        iv[self._if] = (fresh + n) & _U32

    def set_capacity(self, capacity):
        """The number of requests this worker can run at once (written before READY)."""
        self._i[self._ib + _I_CAPACITY] = capacity & _U32

    # -- primary-side -------------------------------------------------------
    @property
    def sent(self):
        """Connections the primary has put in this worker's channel (publish_sent)."""
        return self._q[self._qs]

    def queued(self):
        """True while connections the primary sent wait in the channel (sent > taken):
        a worker that has just finished one can read the next without polling first."""
        q = self._q
        return q[self._qs] > q[self._qt]

    def publish_sent(self, sent):
        """Primary: after each send to (or take-back from) this worker's channel."""
        self._q[self._qs] = sent & _U64

    def request_credit(self):
        """Primary: ask this worker for a MSG_CREDIT on its next close."""
        self._i[self._ib + _I_WANT_CREDIT] = 1

    def forget_credit(self):
        """Primary: withdraw that request (nothing waits for room any more)."""
        self._i[self._ib + _I_WANT_CREDIT] = 0

    @property
    def pull(self):
        """Set while the primary leaves new connections for the workers to accept."""
        return self._i[self._ib + PULL_WORD]

    def set_pull(self, on):
        """Primary: start (True) or end a pull on this line (csrc/dispatch_send.c)."""
        self._i[self._ib + PULL_WORD] = 1 if on else 0

    def clear(self):
        """Zeroes the whole line (done by add_worker before a fork)."""
        qb = self._qb
        for k in range(SLOT_SIZE // 8):
            self._q[qb + k] = 0

    def __repr__(self):
        return ("SlotView(%d, pid=%d, closed=%d, handled=%d, active=%d, busy_since_ns=%d, "
                "taken=%d, fresh=%d, capacity=%d)"
                % (self.index, self.pid, self.closed, self.handled, self.active,
                   self.busy_since_ns, self.taken, self.fresh, self.capacity))
