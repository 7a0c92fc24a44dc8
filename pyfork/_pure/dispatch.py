"""The pure backend's Dispatcher (csrc/dispatch.c): the handle and its tables.

Theory of operation: Dispatcher() creates everything the object will ever
use (worker table, listener and watch tables, the pending ring, the epoll
object, the MAP_SHARED scoreboard, a reserve fd on /dev/null) so the loop
only fills and empties them. The methods here are what the caller (the
arbiter) calls between runs: add/remove listeners and watched fds, add a
worker's channel before forking it, mark it READY or DRAINING, remove it
after it died -- recovering connections still queued in its channel through
the peer end we kept (Node loses those) -- stop accepting, read counters,
close. Sending comes from _Send (dispatch_send.py) and run() from
_Loop (dispatch_loop.py); the structure follows csrc/dispatch*.c
function by function (pf__tick, pf__flush, pf__pick_rr, ...), so a
behaviour found in one is easy to find in the other.
"""

import errno
import mmap
import os
import select
import socket
import sys
from collections import deque

from pyfork._pure.fdpass import (
    _U32, MAX_FDS, MSG_CONN, _borrow, _close_all, _index, _oserror, _recv, _wrap,
)
from pyfork._pure.dispatch_loop import _Loop
from pyfork._pure.dispatch_send import _Send
from pyfork._pure.internal import (
    _CHAN_EVENTS, _EPOLLIN, SLOT_SIZE, STATE_DRAINING, STATE_FREE, STATE_GONE, STATE_READY,
    STATE_SPAWNING, Event, _Listener, _Worker,
)
from pyfork.scoreboard import Scoreboard

_POLICIES = {"rr": 0, "least": 1}


def _ranged(name, value, lo, hi):
    value = _index(name, value)
    if not lo <= value <= hi:
        raise ValueError("%s must be %d..%d, got %d" % (name, lo, hi, value))
    return value


def _is_seqpacket(fd):
    try:
        sock = _borrow(fd)
    except OSError:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_SEQPACKET
    except OSError:
        return False
    finally:
        sock.detach()



def _listener_nodelay(sock):
    """As pf__listener_nodelay: Linux copies TCP_NODELAY from the listener to
    each accepted socket, so set it once here. True when accepted sockets
    will carry it (else it is set on each one)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    except OSError:
        return False


class Dispatcher(_Send, _Loop):
    """Accept loop + worker table, fixed capacity. See the module docstring."""

    def __init__(self, capacity, policy="rr", max_inflight=1000, max_listeners=16,
                 max_watch=16, max_pending=1024, accept_batch=32, emfile_pause_ms=100):
        self._closed = True  # until everything below exists (close() is a no-op)
        if not isinstance(policy, str) or policy not in _POLICIES:
            raise ValueError("unknown policy %r: expected 'rr' or 'least'" % (policy,))
        self._capacity = _ranged("capacity", capacity, 1, 4096)
        self._policy = policy
        self._least = policy == "least"
        self._max_inflight = _ranged("max_inflight", max_inflight, 1, 1 << 20)
        self._max_listeners = _ranged("max_listeners", max_listeners, 1, 64)
        self._max_watch = _ranged("max_watch", max_watch, 0, 64)
        self._max_pending = _ranged("max_pending", max_pending, 1, 65536)
        self._accept_batch = _ranged("accept_batch", accept_batch, 1, self._max_pending)
        # >= 1 so EMFILE can never become a spin; <= 60 s (longer is an outage).
        self._pause_s = _ranged("emfile_pause_ms", emfile_pause_ms, 1, 60000) / 1000.0

        self._workers = [_Worker() for _ in range(self._capacity)]
        self._by_chan = {}        # chan fd -> slot
        self._hi = 0              # slots >= hi were never used: scans stop there
        self._n_ready = 0
        self._rr_next = 0
        self._n_hup = 0           # workers owed a HANGUP event
        self._listeners = []      # [_Listener], order as in C (swap-remove)
        self._watches = []        # [[fd, tag]]
        self._pend = deque()      # (fd, recovered), at most max_pending
        self._accepting = True    # listeners are (wanted) in the poll set
        self._stopping = False
        self._drained = False
        self._drained_unreported = False
        self._more = False        # a drain pass has work left: poll without sleeping
        self._pause_until = 0.0   # EMFILE pause end (monotonic s), 0 = none
        self._recheck_at = 0.0    # _BLK_RETRY flags clear then, 0 = none
        self._out = None          # the run call's event list
        self._st = dict.fromkeys(("accepted", "dispatched", "redispatched", "busy_skips",
                                  "fd_exhaustion", "accept_errors", "dropped", "wakeups"), 0)
        self._map = mmap.mmap(-1, self._capacity * SLOT_SIZE)  # MAP_SHARED|MAP_ANONYMOUS
        try:
            self._ep = select.epoll()
        except BaseException:
            self._map.close()
            raise
        # No /dev/null (odd chroot) only costs the EMFILE trick, not the loop.
        try:
            self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._reserve = -1
        self._reserve_wanted = self._reserve >= 0
        self._view = memoryview(self._map)
        self._board = Scoreboard(self._view, self._capacity)
        self._slots = [self._board.slot(i) for i in range(self._capacity)]
        self._closed = False

    # -- plumbing ---------------------------------------------------------
    def _check(self):
        if self._closed:
            raise ValueError("dispatcher is closed")

    def _slot(self, slot):
        self._check()
        slot = _index("slot", slot)
        if not 0 <= slot < self._capacity:
            raise ValueError("slot %d out of range 0..%d" % (slot, self._capacity - 1))
        return slot

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from a finalizer
            pass

    def __repr__(self):
        return "<pyfork._pure.Dispatcher capacity=%d policy=%s%s>" % (
            self._capacity, self._policy, " closed" if self._closed else "")

    @property
    def scoreboard(self):
        self._check()
        return self._view

    def _emit(self, kind, slot, tag):
        if self._out is None:
            return False
        self._out.append(Event(kind, slot, tag))
        return True

    # -- listeners and watched fds ------------------------------------------
    def _find_listener(self, fd):
        for lst in self._listeners:
            if lst.fd == fd:
                return lst
        return None

    def add_listener(self, fd):
        self._check()
        fd = _index("fd", fd)
        if fd < 0:
            raise _oserror(errno.EINVAL)
        if self._find_listener(fd) is not None:
            raise _oserror(errno.EEXIST)
        if len(self._listeners) >= self._max_listeners:
            raise _oserror(errno.ENOSPC)
        # The family is fixed for the socket's life: decide TCP_NODELAY once
        # (the probe is getsockname, as in C: ENOTSOCK, EBADF).
        sock = _wrap(fd)
        try:
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            lst = _Listener(fd, sock, tcp, tcp and not _listener_nodelay(sock))
            if self._accepting:
                self._ep.register(fd, _EPOLLIN)
                lst.in_poll = True
        except BaseException:
            sock.detach()
            raise
        self._listeners.append(lst)

    def remove_listener(self, fd):
        self._check()
        lst = self._find_listener(_index("fd", fd))
        if lst is None:
            raise _oserror(errno.ENOENT)
        if lst.in_poll:
            self._unregister(lst.fd)  # EBADF if the caller closed it first: fine
        i = self._listeners.index(lst)
        last = self._listeners.pop()
        if last is not lst:
            self._listeners[i] = last
        lst.sock.detach()

    def watch(self, fd, tag):
        self._check()
        fd = _index("fd", fd)
        tag = _index("tag", tag)
        if not 0 <= tag <= _U32:
            raise ValueError("tag must be 0..2**32-1, got %d" % tag)
        if fd < 0:
            raise _oserror(errno.EINVAL)
        if any(w[0] == fd for w in self._watches):
            raise _oserror(errno.EEXIST)
        if len(self._watches) >= self._max_watch:
            raise _oserror(errno.ENOSPC)
        self._ep.register(fd, _EPOLLIN)
        self._watches.append([fd, tag])

    def unwatch(self, fd):
        self._check()
        fd = _index("fd", fd)
        for i, w in enumerate(self._watches):
            if w[0] == fd:
                self._unregister(fd)
                last = self._watches.pop()
                if last is not w:
                    self._watches[i] = last
                return
        raise _oserror(errno.ENOENT)

    def _unregister(self, fd):
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass  # the caller closed it already: epoll forgot it by itself

    # -- workers ----------------------------------------------------------
    def add_worker(self, slot, chan, peer=-1):
        slot = self._slot(slot)
        chan = _index("chan", chan)
        peer = _index("peer", peer)
        if chan < 0 or peer < -1 or chan == peer:
            raise ValueError("bad channel fds chan=%d peer=%d" % (chan, peer))
        w = self._workers[slot]
        if w.state != STATE_FREE:
            raise _oserror(errno.EEXIST)
        # Channels are SOCK_SEQPACKET: anything else (or no fd at all) is
        # refused here rather than misparsed later.
        if not _is_seqpacket(chan) or (peer >= 0 and not _is_seqpacket(peer)):
            raise _oserror(errno.EINVAL)
        was_blocking = os.get_blocking(chan)
        os.set_blocking(chan, False)
        try:
            self._ep.register(chan, _CHAN_EVENTS)
        except BaseException:
            os.set_blocking(chan, was_blocking)  # "nothing is owned": as it was
            raise
        # From here on both fds are ours.
        self._slots[slot].clear()
        w.reset()
        w.chan, w.peer = chan, peer
        w.sock = _wrap(chan, socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if peer >= 0:
            w.psock = _wrap(peer, socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w.state = STATE_SPAWNING
        w.in_epoll = True
        self._by_chan[chan] = slot
        if slot >= self._hi:
            self._hi = slot + 1

    def _set_state(self, slot, state):
        """A GONE worker stays GONE: draining it is vacuously done, making it
        READY is EPIPE (its channel is closed)."""
        w = self._workers[self._slot(slot)]
        if w.state == STATE_FREE:
            raise _oserror(errno.ENOENT)
        if w.state == STATE_GONE:
            if state == STATE_DRAINING:
                return
            raise _oserror(errno.EPIPE)
        if w.state == STATE_READY:
            self._n_ready -= 1
        if state == STATE_READY:
            self._n_ready += 1
        w.state = state

    def set_ready(self, slot):
        self._set_state(slot, STATE_READY)

    def set_draining(self, slot):
        self._set_state(slot, STATE_DRAINING)

    def remove_worker(self, slot):
        """Frees the slot, reads back the CONN messages still queued to it (from
        the held peer end) and re-dispatches them (or holds them pending), then
        closes chan and peer. Returns how many fds were recovered."""
        slot = self._slot(slot)
        w = self._workers[slot]
        if w.state == STATE_FREE:
            raise _oserror(errno.ENOENT)
        # Free the slot first so the recovery's flush cannot pick it.
        if w.state == STATE_READY:
            self._n_ready -= 1
        if w.hup_pending:
            self._n_hup -= 1
        if w.in_epoll:
            self._unregister(w.chan)
        sock, psock, chan = w.sock, w.psock, w.chan
        del self._by_chan[chan]
        w.reset()
        got = 0
        if psock is not None:
            got = self._recover(psock)
            psock.close()
        sock.close()
        return got

    def _recover(self, psock):
        try:
            # The worker is dead or being discarded: a recv that blocks on its
            # (maybe blocking) file description would hang the primary.
            psock.setblocking(False)
        except OSError:
            return 0
        got = 0
        while True:
            try:
                msg = _recv(psock, MAX_FDS)
            except OSError as exc:
                if exc.errno in (errno.EBADMSG, errno.EMSGSIZE):
                    continue  # that datagram is consumed; next
                break         # EAGAIN: the queue is empty
            if msg.payload:   # C reads with no payload room: EMSGSIZE, skipped
                _close_all(msg.fds)
                continue
            for fd in msg.fds:
                if msg.type != MSG_CONN:
                    os.close(fd)
                    continue
                if len(self._pend) >= self._max_pending:
                    self._flush()
                    if len(self._pend) >= self._max_pending:
                        os.close(fd)
                        self._st["dropped"] += 1
                        continue
                self._pend.append((fd, True))
                got += 1
            self._flush()
        return got

    def stop_accepting(self):
        self._check()
        if self._stopping:
            return
        self._stopping = True
        self._accepting = False  # the next turn takes them out of the poll set
        for lst in self._listeners:
            lst.at_eagain = False

    # -- stats --------------------------------------------------------------
    def stats(self):
        self._check()
        st = dict(self._st)
        st["pending"] = len(self._pend)
        st["accepting"] = 1 if self._accepting and self._listeners else 0
        return st

    def worker_stats(self, slot):
        slot = self._slot(slot)
        w = self._workers[slot]
        if w.state == STATE_FREE:
            return {"state": STATE_FREE, "sent": 0, "closed": 0, "inflight": 0}
        closed = self._slots[slot].closed
        return {"state": w.state, "sent": w.sent, "closed": closed, "inflight": w.sent - closed}

    # -- close ----------------------------------------------------------------
    def close(self):
        """Closes every fd the dispatcher owns (channels, peers, pending fds,
        epoll, reserve fd) and drops the scoreboard. Listeners and watched fds
        stay the caller's. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers[:self._hi]:
            if w.sock is not None:
                w.sock.close()
            if w.psock is not None:
                w.psock.close()
            w.reset()
        self._by_chan.clear()
        _close_all(fd for fd, _ in self._pend)
        self._pend.clear()
        for lst in self._listeners:
            lst.sock.detach()  # the caller's fd
        self._listeners = []
        self._watches = []
        self._ep.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
        self._slots = []
        self._board.release()
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view: unmapped when that goes away
