"""The pure backend's Dispatcher (csrc/dispatch.c): the handle and its tables.

Theory of operation: Dispatcher() creates everything the object will ever
use (worker table, listener and watch tables, the pending ring, the epoll
object, the MAP_SHARED scoreboard, a reserve fd on /dev/null) so the loop
only fills and empties them. The methods here are what the caller (the
arbiter) calls between runs: add/remove listeners and watched fds, add a
worker's channel before forking it, mark it READY or DRAINING, remove it
after it died -- recovering connections still queued in its channel through
the peer end we kept (Node loses those) -- stop accepting, read counters,
close. Its state is one internal.State (struct pf_dispatcher), and the work
is done by functions over it: flush and friends in dispatch_send.py, run in
dispatch_loop.py, the table code here. The structure follows csrc/dispatch*.c
function by function (pf__tick, pf__flush, pf__pick_rr, ...), so a behaviour
found in one is easy to find in the other.
"""

import errno
import mmap
import os
import select
import socket
import sys

from pyfork import _api
from pyfork._api import (
    MAX_FDS, MSG_CONN, SLOT_SIZE, STATE_DRAINING, STATE_FREE, STATE_GONE, STATE_READY,
    STATE_SPAWNING, index_arg, u32_arg,
)
from pyfork._pure import dispatch_loop, park
from pyfork._pure.dispatch_send import flush, pull_end
from pyfork._pure.fdpass import recv_on
from pyfork._pure.internal import (
    CHAN_EVENTS, EPOLLIN, Listener, State, borrow_fd, close_all, find_listener, oserror,
    unregister, wrap_fd,
)
from pyfork.scoreboard import Scoreboard


def _is_seqpacket(fd):
    try:
        sock = borrow_fd(fd)
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


def _recover(d, psock):
    """Reads back the CONN messages still queued to a removed worker (from
    the held peer end) and re-dispatches them (or holds them pending).
    Returns how many fds were recovered."""
    try:
        # The worker is dead or being discarded: a recv that blocks on its
        # (maybe blocking) file description would hang the primary.
        psock.setblocking(False)
    except OSError:
        return 0
    got = 0
    max_pending = d.cfg.max_pending
    while True:
        try:
            msg = recv_on(psock, MAX_FDS)
        except OSError as exc:
            if exc.errno in (errno.EBADMSG, errno.EMSGSIZE):
                continue  # that datagram is consumed; next
            break         # EAGAIN: the queue is empty
        if msg.payload:   # C reads with no payload room: EMSGSIZE, skipped
            close_all(msg.fds)
            continue
        for fd in msg.fds:
            if msg.type != MSG_CONN:
                os.close(fd)
                continue
            if len(d.pend) >= max_pending:
                flush(d)
                if len(d.pend) >= max_pending:
                    os.close(fd)
                    d.st["dropped"] += 1
                    continue
            d.pend.append((fd, True))
            got += 1
        flush(d)
    return got


class Dispatcher:
    """Accept loop + worker table, fixed capacity. See the module docstring."""

    def __init__(self, capacity, policy="rr", max_inflight=None, max_listeners=16,
                 max_watch=16, max_pending=1024, accept_batch=32,
                 emfile_pause_ms=_api.EMFILE_PAUSE_MS):
        self._d = None  # closed until everything below exists (close() is a no-op)
        cfg = _api.dispatcher_config(capacity, policy, max_inflight, max_listeners,
                                     max_watch, max_pending, accept_batch, emfile_pause_ms)
        self._policy = policy
        self._capacity = cfg.capacity
        d = State(cfg, least=policy == "least")
        d.map = mmap.mmap(-1, cfg.capacity * SLOT_SIZE)  # MAP_SHARED|MAP_ANONYMOUS
        try:
            d.ep = select.epoll()
        except BaseException:
            d.map.close()
            raise
        # No /dev/null (odd chroot) only costs the EMFILE trick, not the loop.
        try:
            d.reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            d.reserve = -1
        d.reserve_wanted = d.reserve >= 0
        d.view = memoryview(d.map)
        d.board = Scoreboard(d.view, cfg.capacity)
        d.slots = [d.board.slot(i) for i in range(cfg.capacity)]
        self._d = d

    # -- plumbing ---------------------------------------------------------
    def _h(self):
        d = self._d
        if d is None:
            raise ValueError("dispatcher is closed")
        return d

    def _slot(self, slot):
        d = self._h()
        slot = index_arg("slot", slot)
        if not 0 <= slot < d.cfg.capacity:
            raise ValueError("slot %d out of range 0..%d" % (slot, d.cfg.capacity - 1))
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
            self._capacity, self._policy, " closed" if self._d is None else "")

    @property
    def scoreboard(self):
        """Writable memoryview of capacity * SLOT_SIZE bytes, MAP_SHARED (forked
        workers inherit it)."""
        return self._h().view

    # -- listeners and watched fds ------------------------------------------
    def add_listener(self, fd):
        d = self._h()
        fd = index_arg("fd", fd)
        if fd < 0:
            raise oserror(errno.EINVAL)
        if find_listener(d, fd) is not None:
            raise oserror(errno.EEXIST)
        if len(d.listeners) >= d.cfg.max_listeners:
            raise oserror(errno.ENOSPC)
        # The family is fixed for the socket's life: decide TCP_NODELAY once
        # (the probe is getsockname, as in C: ENOTSOCK, EBADF).
        sock = wrap_fd(fd)
        try:
            tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
            lst = Listener(fd, sock, tcp, tcp and not _listener_nodelay(sock))
            if d.accepting:
                d.ep.register(fd, EPOLLIN)
                lst.in_poll = True
        except BaseException:
            sock.detach()
            raise
        d.listeners.append(lst)

    def remove_listener(self, fd):
        d = self._h()
        lst = find_listener(d, index_arg("fd", fd))
        if lst is None:
            raise oserror(errno.ENOENT)
        if lst.in_poll:
            unregister(d, lst.fd)  # EBADF if the caller closed it first: fine
        i = d.listeners.index(lst)
        last = d.listeners.pop()
        if last is not lst:
            d.listeners[i] = last
        lst.sock.detach()

    def watch(self, fd, tag):
        d = self._h()
        fd = index_arg("fd", fd)
        tag = u32_arg("tag", tag)
        if fd < 0:
            raise oserror(errno.EINVAL)
        if any(w[0] == fd for w in d.watches):
            raise oserror(errno.EEXIST)
        if len(d.watches) >= d.cfg.max_watch:
            raise oserror(errno.ENOSPC)
        d.ep.register(fd, EPOLLIN)
        d.watches.append([fd, tag])

    def unwatch(self, fd):
        d = self._h()
        fd = index_arg("fd", fd)
        for i, w in enumerate(d.watches):
            if w[0] == fd:
                unregister(d, fd)
                last = d.watches.pop()
                if last is not w:
                    d.watches[i] = last
                return
        raise oserror(errno.ENOENT)

    # -- workers ----------------------------------------------------------
    def add_worker(self, slot, chan, peer=-1):
        """Takes ownership of chan and peer (call before forking the worker)."""
        slot = self._slot(slot)
        d = self._d
        chan = index_arg("chan", chan)
        peer = index_arg("peer", peer)
        if chan < 0 or peer < -1 or chan == peer:
            raise ValueError("bad channel fds chan=%d peer=%d" % (chan, peer))
        w = d.workers[slot]
        if w.state != STATE_FREE:
            raise oserror(errno.EEXIST)
        # Channels are SOCK_SEQPACKET: anything else (or no fd at all) is
        # refused here rather than misparsed later.
        if not _is_seqpacket(chan) or (peer >= 0 and not _is_seqpacket(peer)):
            raise oserror(errno.EINVAL)
        was_blocking = os.get_blocking(chan)
        os.set_blocking(chan, False)
        try:
            d.ep.register(chan, CHAN_EVENTS)
        except BaseException:
            os.set_blocking(chan, was_blocking)  # "nothing is owned": as it was
            raise
        # From here on both fds are ours.
        d.slots[slot].clear()
        w.reset()
        w.chan, w.peer = chan, peer
        w.sock = wrap_fd(chan, socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if peer >= 0:
            w.psock = wrap_fd(peer, socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w.state = STATE_SPAWNING
        w.in_epoll = True
        d.by_chan[chan] = slot
        if slot >= d.hi:
            d.hi = slot + 1

    def _set_state(self, slot, state):
        """A GONE worker stays GONE: draining it is vacuously done, making it
        READY is EPIPE (its channel is closed)."""
        d = self._d
        w = d.workers[slot]
        if w.state == STATE_FREE:
            raise oserror(errno.ENOENT)
        if w.state == STATE_GONE:
            if state == STATE_DRAINING:
                return
            raise oserror(errno.EPIPE)
        if w.state == STATE_READY:
            d.n_ready -= 1
        if state == STATE_READY:
            d.n_ready += 1
        w.state = state
        if state == STATE_READY and d.pulling:
            pull_end(d)     # a newcomer can start one, and asleep it would not see the word

    def set_ready(self, slot):
        self._set_state(self._slot(slot), STATE_READY)

    def set_draining(self, slot):
        self._set_state(self._slot(slot), STATE_DRAINING)

    def remove_worker(self, slot):
        """Frees the slot, reads back the CONN messages still queued to it (from
        the held peer end) and re-dispatches them (or holds them pending), then
        closes chan and peer. Returns how many fds were recovered."""
        slot = self._slot(slot)
        d = self._d
        w = d.workers[slot]
        if w.state == STATE_FREE:
            raise oserror(errno.ENOENT)
        # Free the slot first so the recovery's flush cannot pick it.
        if w.state == STATE_READY:
            d.n_ready -= 1
        if w.hup_pending:
            d.n_hup -= 1
        if w.behind:
            d.n_behind -= 1
        if w.in_epoll:
            unregister(d, w.chan)
        sock, psock, chan = w.sock, w.psock, w.chan
        del d.by_chan[chan]
        w.reset()
        got = 0
        if psock is not None:
            got = _recover(d, psock)
            psock.close()
        park.salvage(d, sock)   # connections it handed back, not yet read
        sock.close()
        return got

    def stop_accepting(self):
        d = self._h()
        if d.stopping:
            return
        d.stopping = True
        d.accepting = False  # the next turn takes them out of the poll set
        for lst in d.listeners:
            lst.at_eagain = False

    def set_parking(self, max_parked, idle_timeout):
        """Idle kept-alive connections workers hand back (MSG_PARK) wait in the loop,
        at most max_parked (0 = off: dispatched at once), and are closed after
        idle_timeout seconds (park.py). OSError(EBUSY) to resize while some are parked."""
        d = self._h()
        max_parked, ms = _api.check_parking(max_parked, idle_timeout)
        park.set_parking(d, max_parked, ms)

    def set_pull(self, on):
        """True: a new connection that no worker can start now stays in the kernel's queue,
        and the workers (which hold the listeners) accept it while pf_slot.pull is set
        (dispatch_send.py). False (the default): it waits in the ring or is prefetched."""
        d = self._h()
        d.pull_on = bool(on)
        if not on and d.pulling:
            pull_end(d)

    # -- the loop -------------------------------------------------------------
    def run(self, timeout=None):
        """Runs the loop until there are events or timeout seconds passed (None
        = no limit). Returns a list of Event; [] on timeout."""
        d = self._h()
        return dispatch_loop.run(d, _api.check_timeout(timeout))

    # -- counters -------------------------------------------------------------
    def stats(self):
        d = self._h()
        st = dict(d.st)
        st["pending"] = len(d.pend)
        st["accepting"] = 1 if d.accepting and d.listeners else 0
        st.update(park.stats(d))
        return st

    def worker_stats(self, slot):
        slot = self._slot(slot)
        d = self._d
        w = d.workers[slot]
        if w.state == STATE_FREE:
            return {"state": STATE_FREE, "sent": 0, "closed": 0, "inflight": 0}
        sv = d.slots[slot]
        closed = sv.closed
        return {"state": w.state, "sent": w.sent, "closed": closed,
                "inflight": w.sent + sv.accepted - closed}

    # -- close ----------------------------------------------------------------
    def close(self):
        """Closes every fd the dispatcher owns (channels, peers, pending fds,
        epoll, reserve fd) and drops the scoreboard. Listeners and watched fds
        stay the caller's. Idempotent."""
        d = self._d
        if d is None:
            return
        self._d = None
        for w in d.workers[:d.hi]:
            if w.sock is not None:
                w.sock.close()
            if w.psock is not None:
                w.psock.close()
            w.reset()
        d.by_chan.clear()
        close_all(fd for fd, _ in d.pend)
        d.pend.clear()
        park.close_all_parked(d)    # parked connections are idle: closed
        for lst in d.listeners:
            lst.sock.detach()  # the caller's fd
        d.listeners = []
        d.watches = []
        d.ep.close()
        if d.reserve >= 0:
            os.close(d.reserve)
            d.reserve = -1
        d.slots = []
        d.board.release()
        d.view.release()
        try:
            d.map.close()
        except BufferError:
            pass  # a caller still holds a view: unmapped when that goes away
