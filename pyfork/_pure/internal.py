"""The dispatcher's shared state for the pure backend (csrc/pf_internal.h).

Theory of operation: the Dispatcher (dispatch.py) is one object whose
tables are sized at creation, and its methods are split by job over three
files, as csrc/dispatch*.c are: dispatch.py (lifetime and the table
API), dispatch_send.py (pending ring, worker choice, batched sends) and
dispatch_loop.py (run: epoll, accept triage, EMFILE, credits, drain).
What more than one of them needs lives here: the worker states, the Event
tuple, the per-worker and per-listener records and the shared constants.
"""

import select
from typing import NamedTuple

STATE_FREE, STATE_SPAWNING, STATE_READY, STATE_DRAINING, STATE_GONE = 0, 1, 2, 3, 4
SLOT_SIZE = 64

# While fds wait for a worker, re-check this often even without a CREDIT: a
# worker written against the raw protocol may never send one, and a close can
# race the want_credit flag. 100 wakeups/s while stalled is not a spin.
_RECHECK_S = 0.010
# least: a request running this long counts as one more connection in flight
# (PF__LEAST_AGE_MS in csrc/pf_internal.h, where the number is explained).
_LEAST_AGE_NS = 5_000_000

_EPOLLIN = select.EPOLLIN
_BLK_NONE, _BLK_OUT, _BLK_RETRY = 0, 1, 2      # why a READY worker is skipped
_CHAN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP  # a channel's poll mask (+EPOLLOUT when busy)


class Event(NamedTuple):
    kind: str   # "watch", "message", "hangup", "drained"
    slot: int   # worker slot, or -1
    tag: int    # "watch": the tag given to Dispatcher.watch


class _Worker:
    __slots__ = ("chan", "peer", "sock", "psock", "state", "blocked", "in_epoll",
                 "out_armed", "hup_pending", "sent")

    def __init__(self):
        self.reset()

    def reset(self):
        self.chan = self.peer = -1
        self.sock = self.psock = None
        self.state = STATE_FREE
        self.blocked = _BLK_NONE
        self.in_epoll = self.out_armed = self.hup_pending = False
        self.sent = 0


class _Listener:
    __slots__ = ("fd", "sock", "tcp", "nodelay_each", "in_poll", "at_eagain", "dead")

    def __init__(self, fd, sock, tcp, nodelay_each):
        self.fd, self.sock, self.tcp, self.nodelay_each = fd, sock, tcp, nodelay_each
        self.in_poll = self.at_eagain = self.dead = False
