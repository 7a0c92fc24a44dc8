"""The C backend: a thin cffi binding over the dispatch core (csrc/pyfork.h).

Theory of operation: this module owns ``_ffi``/``_lib`` of the compiled
extension pyfork._pyfork_cffi (out-of-line API mode, built by
pyfork/_build_ffi.py) and exposes exactly the interface of pyfork._pure, so
one test suite runs against both: the names, constants, tuples and argument
checks come from pyfork._api, and nothing else here has a public name. Each
call validates its Python arguments (ValueError), calls C, and turns
``rc < 0`` into ``OSError(-rc, ...)``, which Python maps to BrokenPipeError, BlockingIOError, FileExistsError and so on.
Nothing here retries, sleeps, logs or decides: policy lives in the arbiter.
cffi releases the GIL around every C call, so Dispatcher.run blocks in C
without holding it. Buffers are allocated once (per Dispatcher for events and
counters, per thread for recv_msg) so the hot paths allocate only the
objects they return.
"""

import errno as _errno
import functools as _functools
import math as _math
import os as _os
import threading as _threading

# The names both backends export come from pyfork._api; the helpers get
# underscore names so this module's public names are exactly PUBLIC_NAMES.
from pyfork import _api
from pyfork._api import (
    MAX_FDS, MAX_PAYLOAD, MSG_CONN, MSG_CREDIT, MSG_CTL, MSG_DRAIN, MSG_PARK, MSG_READY,
    MSG_USER, SLOT_SIZE, STATE_DRAINING, STATE_FREE, STATE_GONE, STATE_READY, STATE_SPAWNING, Event,
    Message,
)
from pyfork._api import check_backlog as _check_backlog
from pyfork._api import index_arg as _index
from pyfork._api import ranged_arg as _ranged
from pyfork._api import u32_arg as _u32
from pyfork.scoreboard import HIST_BUCKETS as _HIST_BUCKETS
from pyfork._pyfork_cffi import ffi as _ffi
from pyfork._pyfork_cffi import lib as _lib

# The compiled core and this binding must speak the same ABI (cryptography
# and argon2-cffi-bindings check a version constant the same way), and the
# constants pyfork._api gives both backends must be the core's.
if _lib.PF_VERSION != 3:
    raise ImportError("pyfork._pyfork_cffi has PF_VERSION %d, this binding expects 3; "
                      "rebuild pyfork" % _lib.PF_VERSION)
if ((_lib.PF_MAX_FDS, _lib.PF_MAX_PAYLOAD, _ffi.sizeof("pf_slot"),
     _lib.PF_MSG_CONN, _lib.PF_MSG_READY, _lib.PF_MSG_CREDIT, _lib.PF_MSG_DRAIN,
     _lib.PF_MSG_USER, _lib.PF_MSG_CTL, _lib.PF_MSG_PARK, _lib.PF_WORKER_FREE, _lib.PF_WORKER_SPAWNING,
     _lib.PF_WORKER_READY, _lib.PF_WORKER_DRAINING, _lib.PF_WORKER_GONE,
     _lib.PF_POLICY_RR, _lib.PF_POLICY_LEAST, _lib.PF_HIST_BUCKETS)
        != (MAX_FDS, MAX_PAYLOAD, SLOT_SIZE, MSG_CONN, MSG_READY, MSG_CREDIT, MSG_DRAIN,
            MSG_USER, MSG_CTL, MSG_PARK, STATE_FREE, STATE_SPAWNING, STATE_READY, STATE_DRAINING,
            STATE_GONE, _api.POLICIES.index("rr"), _api.POLICIES.index("least"), _HIST_BUCKETS)):
    raise ImportError("pyfork._pyfork_cffi disagrees with pyfork._api on a constant of "
                      "csrc/pyfork.h; rebuild pyfork")
from pyfork.scoreboard import (ACCEPTED_QWORD as _ACCEPTED_QWORD, PARK_OFF_WORD as _PARK_OFF_WORD,
                               PULL_WORD as _PULL_WORD, SENT_QWORD as _SENT_QWORD)
if (_ffi.offsetof("pf_slot", "park_off"), _ffi.offsetof("pf_slot", "pull"), _ffi.offsetof("pf_slot", "sent"),
        _ffi.offsetof("pf_slot", "accepted")) != (4 * _PARK_OFF_WORD, 4 * _PULL_WORD, 8 * _SENT_QWORD,
                                                  8 * _ACCEPTED_QWORD):
    raise ImportError("pyfork.scoreboard disagrees with csrc/pyfork.h on pf_slot's layout")

BACKEND = "c"

__all__ = list(_api.PUBLIC_NAMES)

_INT_MAX = 0x7FFFFFFF
# Indexed by pf_event.type (PF_EV_WATCH = 1 ... PF_EV_DRAINED = 4).
_KINDS = (None, "watch", "message", "hangup", "drained")
_STATS = ("accepted", "dispatched", "redispatched", "busy_skips", "fd_exhaustion",
          "accept_errors", "dropped", "wakeups", "pending", "accepting",
          "parks", "unparks", "park_closed", "parked", "park_cap", "pulls")


def _check(rc):
    if rc < 0:
        raise OSError(-rc, _os.strerror(-rc))
    return rc


# ---- messages ---------------------------------------------------------------

# The 64 kB payload buffers are allocated without zeroing: only the bytes a message
# brings are ever read, and a zeroed buffer is 16 pages a worker writes (and so owns,
# unshared) before its first message has a payload.
_new_unzeroed = _ffi.new_allocator(should_clear_after_alloc=False)

class _Buffers(_threading.local):
    """recv/send scratch space, one set per thread, allocated on first use."""

    def __init__(self):
        self.hdr = _ffi.new("pf_msg_hdr *")
        self.payload = _new_unzeroed("char[]", MAX_PAYLOAD)
        self.fds = _ffi.new("int[]", MAX_FDS)


_bufs = _Buffers()


def send_msg(fd, type, arg=0, payload=b"", fds=()):
    """Sends one message on channel fd. EMSGSIZE (payload > MAX_PAYLOAD or more
    than MAX_FDS fds), EINVAL (bad type), BlockingIOError when a non-blocking
    channel is full, BrokenPipeError when the peer is gone. Never closes fds."""
    fd = _index("fd", fd)
    type = _index("type", type)
    arg = _u32("arg", arg)
    if not 0 <= type <= _api.U32_MAX:
        raise OSError(_errno.EINVAL, _os.strerror(_errno.EINVAL))
    fds = [_index("fd", f) for f in fds]
    buf = _bufs.fds
    if len(fds) <= MAX_FDS:         # more: C answers EMSGSIZE without reading
        buf[0:len(fds)] = fds
    data = _ffi.from_buffer(payload)     # no copy; len() is its size in bytes
    _check(_lib.pf_send_msg(fd, type, arg, data, len(data), buf, len(fds)))


def recv_msg(fd, max_fds=MAX_FDS):
    """Receives one message from channel fd. BrokenPipeError on EOF,
    BlockingIOError when a non-blocking channel is empty, OSError(EBADMSG) for a
    malformed message, OSError(EMSGSIZE) when more than max_fds fds came; on
    every error all fds received are closed first. Received fds are CLOEXEC."""
    fd = _index("fd", fd)
    max_fds = _ranged("max_fds", max_fds, 0, MAX_FDS)
    b = _bufs
    n = _check(_lib.pf_recv_msg(fd, b.hdr, b.payload, MAX_PAYLOAD, b.fds, max_fds))
    h = b.hdr
    return Message(h.type, h.arg, _ffi.unpack(b.payload, h.len), _ffi.unpack(b.fds, n))


class Receiver:
    """recv_msg for one channel read on a hot path (the worker's take()):
    arguments are checked once here, buffers are its own, and recv() returns
    a plain (type, arg, payload, fds) tuple, or None when the non-blocking
    channel is empty -- no exception per empty read. Errors otherwise as
    recv_msg."""

    __slots__ = ("_fd", "_max_fds", "_hdr", "_payload", "_fds")

    def __init__(self, fd, max_fds=MAX_FDS):
        self._fd = _index("fd", fd)
        self._max_fds = _ranged("max_fds", max_fds, 0, MAX_FDS)
        self._hdr = _ffi.new("pf_msg_hdr *")
        self._payload = _new_unzeroed("char[]", MAX_PAYLOAD)
        self._fds = _ffi.new("int[]", MAX_FDS)

    def recv(self):
        fds = self._fds
        n = _lib.pf_recv_msg(self._fd, self._hdr, self._payload, MAX_PAYLOAD, fds, self._max_fds)
        if n < 0:
            if n == _NEG_EAGAIN:
                return None
            raise OSError(-n, _os.strerror(-n))
        h = self._hdr
        size = h.len
        return (h.type, h.arg, _ffi.unpack(self._payload, size) if size else b"",
                _ffi.unpack(fds, n) if n else [])


_NEG_EAGAIN = -_errno.EAGAIN


# ---- scoreboard line writers ------------------------------------------------

class SlotWriter:
    """The worker-side writers of one scoreboard line, in C (csrc/slot.c):
    request_started(), request_finished() and conn_closed(n) (the last two true
    when the primary asked for a CREDIT), conn_taken(n), conn_accepted(n) and set_capacity(n), as
    scoreboard.SlotView's, one C call each -- a worker calls them per request.
    ``line`` is the line's 64 writable bytes (SlotView.line), kept alive by
    this object."""

    __slots__ = ("request_started", "request_finished", "conn_closed", "conn_taken",
                 "conn_accepted", "set_capacity", "_ptr")

    def __init__(self, line):
        if memoryview(line).nbytes < SLOT_SIZE:
            raise ValueError("a scoreboard line has %d bytes, got %d" % (SLOT_SIZE, memoryview(line).nbytes))
        self._ptr = ptr = _ffi.from_buffer("pf_slot *", line, require_writable=True)
        self.request_started = _functools.partial(_lib.pf_slot_request_started, ptr)
        self.request_finished = _functools.partial(_lib.pf_slot_request_finished, ptr)
        self.conn_closed = _functools.partial(_lib.pf_slot_conn_closed, ptr)
        self.conn_taken = _functools.partial(_lib.pf_slot_conn_taken, ptr)
        self.conn_accepted = _functools.partial(_lib.pf_slot_conn_accepted, ptr)
        set_capacity = _functools.partial(_lib.pf_slot_set_capacity, ptr)
        self.set_capacity = lambda n: set_capacity(_u32("capacity", n))


# ---- listeners --------------------------------------------------------------

def listen_tcp(host, port, backlog=2048, reuseport=False):
    """Returns a listening TCP fd (non-blocking, CLOEXEC, SO_REUSEADDR) bound to
    host:port; host None or "" means any address."""
    port = _ranged("port", port, 0, 65535)
    backlog = _check_backlog(backlog)
    chost = host.encode("idna") if host else _ffi.NULL
    flags = _lib.PF_LISTEN_REUSEPORT if reuseport else 0
    return _check(_lib.pf_listen_tcp(chost, port, backlog, flags))


def listen_unix(path, backlog=2048, mode=0o666):
    """Returns a listening AF_UNIX fd at path (non-blocking, CLOEXEC), chmod'ed to
    mode. A stale socket file is replaced; any other existing file is
    EADDRINUSE."""
    path = _os.fsencode(path)
    backlog = _check_backlog(backlog)
    return _check(_lib.pf_listen_unix(path, backlog, _index("mode", mode)))


def adopt_listener(fd):
    """Returns fd after checking it is a listening stream socket and making it
    non-blocking and CLOEXEC: ENOTSOCK, EINVAL otherwise."""
    return _check(_lib.pf_listen_adopt(_index("fd", fd)))


# ---- connected sockets -------------------------------------------------------

def tcp_cork(fd, on):
    """TCP_CORK on or off for the connected TCP socket ``fd`` (csrc/tcp.c)."""
    _check(_lib.pf_tcp_cork(_index("fd", fd), 1 if on else 0))


# ---- dispatcher -------------------------------------------------------------

class Dispatcher:
    """The C accept loop and worker table (pf_dispatcher), fixed capacity."""

    def __init__(self, capacity, policy="rr", max_inflight=None, max_listeners=16,
                 max_watch=16, max_pending=1024, accept_batch=32, emfile_pause_ms=100):
        self._d = None      # closed until the handle exists
        checked = _api.dispatcher_config(capacity, policy, max_inflight, max_listeners,
                                         max_watch, max_pending, accept_batch, emfile_pause_ms)
        cfg = _ffi.new("pf_config *")
        for field, value in zip(checked._fields, checked):
            setattr(cfg, field, value)
        out = _ffi.new("pf_dispatcher **")
        _check(_lib.pf_dispatcher_new(cfg, out))
        raw = out[0]
        size = _ffi.new("size_t *")
        base = _ffi.cast("char *", _lib.pf_dispatcher_scoreboard(raw, size))
        # _ffi.gc on the handle, hung on the scoreboard pointer: the buffer keeps
        # that cdata alive, so a view that outlives this object (a Scoreboard
        # somebody kept) never points at unmapped memory. close() frees at once.
        self._owner = _ffi.gc(base, lambda _, d=raw: _lib.pf_dispatcher_free(d))
        self._view = memoryview(_ffi.buffer(self._owner, size[0]))
        self._capacity = cfg.capacity
        self._policy = policy
        # One run can report every worker, every watch and DRAINED.
        self._nev = cfg.capacity + cfg.max_watch + 1
        self._ev = _ffi.new("pf_event[]", self._nev)
        self._st = _ffi.new("pf_stats *")
        self._ws = _ffi.new("pf_worker_stats *")
        self._d = raw

    # -- plumbing -----------------------------------------------------------
    def _h(self):
        d = self._d
        if d is None:
            raise ValueError("dispatcher is closed")
        return d

    def _slot(self, slot):
        self._h()
        slot = _index("slot", slot)
        if not 0 <= slot < self._capacity:
            raise ValueError("slot %d out of range 0..%d" % (slot, self._capacity - 1))
        return slot

    def close(self):
        """Closes every fd the dispatcher owns (channels, peers, pending fds,
        epoll, reserve fd) and unmaps the scoreboard: views of it must not be
        used afterwards. Listeners and watched fds stay the caller's. Idempotent."""
        if self._d is None:
            return
        self._d = None
        try:
            self._view.release()
        except BufferError:
            pass    # a caller still holds a derived export; it must not use it
        _ffi.release(self._owner)    # runs pf_dispatcher_free now

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<pyfork._core.Dispatcher capacity=%d policy=%s%s>" % (
            self._capacity, self._policy, " closed" if self._d is None else "")

    @property
    def scoreboard(self):
        """Writable memoryview of capacity * SLOT_SIZE bytes, MAP_SHARED (forked
        workers inherit it)."""
        self._h()
        return self._view

    # -- listeners and watched fds -------------------------------------------
    def add_listener(self, fd):
        _check(_lib.pf_dispatcher_add_listener(self._h(), _index("fd", fd)))

    def remove_listener(self, fd):
        _check(_lib.pf_dispatcher_remove_listener(self._h(), _index("fd", fd)))

    def watch(self, fd, tag):
        d = self._h()
        tag = _u32("tag", tag)
        _check(_lib.pf_dispatcher_watch(d, _index("fd", fd), tag))

    def unwatch(self, fd):
        _check(_lib.pf_dispatcher_unwatch(self._h(), _index("fd", fd)))

    # -- workers --------------------------------------------------------------
    def add_worker(self, slot, chan, peer=-1):
        """Takes ownership of chan and peer (call before forking the worker)."""
        slot = self._slot(slot)
        chan = _index("chan", chan)
        peer = _index("peer", peer)
        if chan < 0 or peer < -1 or chan == peer:
            raise ValueError("bad channel fds chan=%d peer=%d" % (chan, peer))
        _check(_lib.pf_dispatcher_add_worker(self._d, slot, chan, peer))

    def set_ready(self, slot):
        slot = self._slot(slot)
        _check(_lib.pf_dispatcher_set_state(self._d, slot, _lib.PF_WORKER_READY))

    def set_draining(self, slot):
        slot = self._slot(slot)
        _check(_lib.pf_dispatcher_set_state(self._d, slot, _lib.PF_WORKER_DRAINING))

    def remove_worker(self, slot):
        """Returns how many queued connections were recovered and re-dispatched."""
        slot = self._slot(slot)
        return _check(_lib.pf_dispatcher_remove_worker(self._d, slot))

    def stop_accepting(self):
        _check(_lib.pf_dispatcher_stop_accepting(self._h()))

    def set_parking(self, max_parked, idle_timeout):
        """Idle kept-alive connections workers hand back (MSG_PARK) wait in the loop,
        at most max_parked (0 = off: dispatched at once), and are closed after
        idle_timeout seconds (csrc/park.c). OSError(EBUSY) to resize while some are parked."""
        max_parked, ms = _api.check_parking(max_parked, idle_timeout)
        _check(_lib.pf_dispatcher_set_parking(self._h(), max_parked, ms))

    def set_pull(self, on):
        """True: a new connection that no worker can start now stays in the kernel's queue,
        and the workers (which hold the listeners) accept it while pf_slot.pull is set
        (csrc/dispatch_send.c). False (the default): it waits in the ring or is prefetched."""
        _check(_lib.pf_dispatcher_set_pull(self._h(), 1 if on else 0))

    # -- the loop -------------------------------------------------------------
    def run(self, timeout=None):
        """Runs the loop until there are events or timeout seconds passed (None
        = no limit). Returns a list of Event; [] on timeout."""
        d = self._h()
        timeout = _api.check_timeout(timeout)
        if timeout is None:
            ms = -1
        else:
            # Round up: a 0.1 ms timeout must not become a busy 0 ms poll loop.
            ms = min(_math.ceil(timeout * 1000.0), _INT_MAX)
        ev = self._ev
        n = _check(_lib.pf_dispatcher_run(d, ms, ev, self._nev))
        return [Event(_KINDS[e.type], e.slot, e.tag) for e in ev[0:n]]

    # -- counters -------------------------------------------------------------
    def stats(self):
        st = self._st
        _check(_lib.pf_dispatcher_stats(self._h(), st))
        return {name: getattr(st, name) for name in _STATS}

    def worker_stats(self, slot):
        slot = self._slot(slot)
        ws = self._ws
        _check(_lib.pf_dispatcher_worker_stats(self._d, slot, ws))
        return {"state": ws.state, "sent": ws.sent, "closed": ws.closed, "inflight": ws.inflight}
