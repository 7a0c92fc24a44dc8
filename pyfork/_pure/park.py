"""Idle kept-alive connections parked in the primary, pure backend (csrc/park.c).

Theory of operation: a sync worker inside a long request hands its idle
kept-alive connections back with MSG_PARK (pyfork/serve/wsgi.py decides when).
They wait here in the dispatcher's epoll (EPOLLIN|EPOLLRDHUP|EPOLLONESHOT), at
most ``cap`` of them (set_parking). When one turns readable its next request is
in the kernel (bytes travel with the fd, so pipelining keeps its order): it goes
into the pending ring exactly like a freshly accepted connection, and the central
queue sends it to a worker that can start it now. ONESHOT, and the fd leaves the
poll set before it leaves the table, so a connection is never held or sent twice.
  hang-up    RDHUP/HUP/ERR with nothing to read: closed here;
  idle       a coarse sweep closes entries parked longer than the idle timeout;
  no room    parking off or full: to the ring at once; ring full as well:
             readable entries wait flagged ready and move on in a later tick;
  stopping   every parked fd goes back to the ring at once, so the workers
             (READY until DRAINED) take them and apply their drain rules;
             closing them here could reset a request already in flight; each
             worker's scoreboard line gets park_off, so none are handed back
             (one sent before its worker saw the flag and read after DRAINED
             goes back to that worker: _return).
The functions take the dispatcher's State as ``d``, as the C ones take pf_dispatcher.
"""

import errno
import os
import select
import socket
import time

from pyfork._api import MAX_FDS, MSG_CONN, MSG_PARK, SLOT_SIZE
from pyfork._pure.fdpass import recv_on, send_on
from pyfork._pure.internal import close_all, unregister
from pyfork.scoreboard import PARK_OFF_WORD

PARK_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT
_HUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# The sweep runs every idle_timeout / 4 within [10 ms, 1 s] (as PF__PARK_SWEEP_*).
_SWEEP_MIN, _SWEEP_MAX = 0.010, 1.0


class Parking:
    """The parking table (pf__parking): fd -> parked-at time, and the ready set."""

    __slots__ = ("cap", "idle", "since", "ready", "sweep_at", "off_told")

    def __init__(self, cap, idle):
        self.cap = cap
        self.idle = idle            # seconds
        self.since = {}             # fd -> time.monotonic() when parked (in the poll set)
        self.ready = []             # readable fds waiting for room in the ring (out of it)
        self.sweep_at = 0.0         # next idle sweep, 0 = none due
        self.off_told = False       # stopping: park_off set on every scoreboard line

    def period(self):
        return min(_SWEEP_MAX, max(_SWEEP_MIN, self.idle / 4))


def count(d):
    pk = d.park
    return 0 if pk is None else len(pk.since) + len(pk.ready)


def stats(d):
    """The parked/park_cap counters stats() adds (the rest live in d.st)."""
    return {"parked": count(d), "park_cap": 0 if d.park is None else d.park.cap}


def _drop(d, fd):
    os.close(fd)
    d.st["park_closed"] += 1


def _to_ring(d, fd):
    if len(d.pend) >= d.cfg.max_pending:
        _drop(d, fd)
        return
    d.pend.append((fd, False))
    d.st["unparks"] += 1


def _add(d, fd, now):
    d.st["parks"] += 1
    pk = d.park
    if pk is None or count(d) >= pk.cap or d.stopping:
        _to_ring(d, fd)     # off, full, or stopping: to a worker now
        return
    try:
        d.ep.register(fd, PARK_EVENTS)
    except OSError:
        _to_ring(d, fd)     # not pollable: let a worker find out
        return
    pk.since[fd] = now
    if not pk.sweep_at:
        pk.sweep_at = now + pk.period()


def _return(d, s):
    """A PARK read after DRAINED (no worker takes from the ring then): its fds go back to
    worker slot s, which sent it, as a CONN, sent before the PARK is consumed (see
    pf__park_return in csrc/park.c for why that order)."""
    w = d.workers[s]
    try:
        msg = recv_on(w.sock, MAX_FDS, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        msg = None          # malformed: consumed below
    if msg is not None and msg.fds:
        d.st["parks"] += len(msg.fds)
        try:
            send_on(w.sock, MSG_CONN, 0, b"", msg.fds)
        except OSError:
            d.st["park_closed"] += len(msg.fds)
        else:
            d.st["unparks"] += len(msg.fds)
            d.st["dispatched"] += len(msg.fds)
            w.sent += len(msg.fds)
            d.slots[s].publish_sent(w.sent)
        close_all(msg.fds)  # our duplicates
    try:
        close_all(recv_on(w.sock, MAX_FDS).fds)     # now consume it
    except OSError:
        pass


def recv(d, s):
    """Reads one MSG_PARK message from worker slot s's channel (its header was peeked)
    and parks its fds; after DRAINED they go back to that worker (_return)."""
    if d.drained:
        _return(d, s)
        return
    try:
        msg = recv_on(d.workers[s].sock, MAX_FDS)
    except OSError:
        return              # consumed either way; fds already closed
    now = time.monotonic()
    for fd in msg.fds:
        _add(d, fd, now)


def salvage(d, sock):
    """Parks the connections of the PARK messages a removed worker's channel still
    holds (other messages are dropped): it may have handed them back and exited before
    the loop read them. Bounded, in case the peer is alive and still writing."""
    now = time.monotonic()
    for _ in range(4096):
        try:
            msg = recv_on(sock, MAX_FDS)
        except OSError as exc:
            if exc.errno == errno.EBADMSG:
                continue        # consumed; next
            return              # EAGAIN: empty; EPIPE: EOF
        for fd in msg.fds:
            if msg.type == MSG_PARK:
                _add(d, fd, now)
            else:
                os.close(fd)


def is_parked(d, fd):
    return d.park is not None and fd in d.park.since


def on_event(d, fd, events):
    """A parked fd reported (once). Data: to the ring (or ready while it is full);
    hung up with nothing to read: closed."""
    pk = d.park
    if events & _HUP:
        s = socket.socket(fileno=fd)
        try:
            n = len(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            n = -1
        except OSError:
            n = 0
        finally:
            s.detach()
        if n < 0:           # spurious: watch again
            try:
                d.ep.modify(fd, PARK_EVENTS)
                return
            except OSError:
                n = 0
        if n == 0:
            del pk.since[fd]
            unregister(d, fd)
            _drop(d, fd)
            return
        # a request followed by a half-close: serve the request
    del pk.since[fd]
    unregister(d, fd)
    if len(d.pend) >= d.cfg.max_pending:
        pk.ready.append(fd)
        return
    _to_ring(d, fd)


def tick(d, now):
    """Ready fds (once stopping, every one) to the ring while it has room; the
    idle sweep when due."""
    pk = d.park
    if pk is None:
        return
    if d.stopping and not pk.off_told:
        # Workers stop handing connections back: one that arrived after DRAINED
        # would find no READY worker left to take it.
        words = d.view.cast("I")
        try:
            for s in range(d.hi):
                words[s * (SLOT_SIZE // 4) + PARK_OFF_WORD] = 1
        finally:
            words.release()
        pk.off_told = True
    if d.stopping:
        for fd in list(pk.since):
            if len(d.pend) + len(pk.ready) >= d.cfg.max_pending:
                break
            del pk.since[fd]
            unregister(d, fd)
            pk.ready.append(fd)
    while pk.ready:
        if len(d.pend) >= d.cfg.max_pending:
            break
        _to_ring(d, pk.ready.pop(0))
    if not pk.sweep_at or now < pk.sweep_at:
        return
    for fd, since in list(pk.since.items()):
        if now - since >= pk.idle:
            del pk.since[fd]
            unregister(d, fd)
            _drop(d, fd)
    pk.sweep_at = now + pk.period() if count(d) else 0.0


def waiting(d):
    """True while parked fds wait for room in the ring: readable ones (ready), or, once
    stopping, every one (pf__park_waiting)."""
    pk = d.park
    return pk is not None and bool(pk.ready or (d.stopping and pk.since))


def due(d):
    """When the loop must wake for the sweep (0 = no need)."""
    return 0.0 if d.park is None else d.park.sweep_at


def close_all_parked(d):
    """Closes every parked fd (the dispatcher is closing)."""
    pk = d.park
    if pk is None:
        return
    for fd in list(pk.since):
        unregister(d, fd)
        _drop(d, fd)
    for fd in pk.ready:
        _drop(d, fd)
    pk.since.clear()
    pk.ready.clear()
    pk.sweep_at = 0.0


def set_parking(d, max_parked, idle_ms):
    """As pf_dispatcher_set_parking (arguments checked by pyfork._api.check_parking)."""
    pk = d.park
    cap = 0 if pk is None else pk.cap
    if max_parked == cap:
        if pk is not None:
            pk.idle = idle_ms / 1000.0
        return
    if count(d):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    d.park = Parking(max_parked, idle_ms / 1000.0) if max_parked else None
