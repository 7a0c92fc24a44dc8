"""The C backend: a thin cffi binding over the dispatch core (csrc/pyfork.h).

Theory of operation: this module owns ``ffi``/``lib`` of the compiled
extension pyfork._pyfork_cffi (out-of-line API mode, built by
pyfork/_build_ffi.py) and exposes exactly the interface of pyfork._pure, so
one test suite runs against both. Each call validates its Python arguments
(ValueError), calls C, and turns ``rc < 0`` into ``OSError(-rc, ...)``, which
Python maps to BrokenPipeError, BlockingIOError, FileExistsError and so on.
Nothing here retries, sleeps, logs or decides: policy lives in the arbiter.
cffi releases the GIL around every C call, so Dispatcher.run blocks in C
without holding it. Buffers are allocated once (per Dispatcher for events and
counters, per thread for recv_msg) so the hot paths allocate only the
objects they return.
"""

import errno
import functools
import math
import operator
import os
import threading
from typing import NamedTuple

from pyfork._pyfork_cffi import ffi, lib

# The compiled core and this binding must speak the same ABI (cryptography
# and argon2-cffi-bindings check a version constant the same way).
if lib.PF_VERSION != 1:
    raise ImportError("pyfork._pyfork_cffi has PF_VERSION %d, this binding expects 1; "
                      "rebuild pyfork" % lib.PF_VERSION)

BACKEND = "c"

MAX_FDS = lib.PF_MAX_FDS
MAX_PAYLOAD = lib.PF_MAX_PAYLOAD
MSG_CONN, MSG_READY, MSG_CREDIT, MSG_DRAIN, MSG_USER, MSG_CTL = (
    lib.PF_MSG_CONN, lib.PF_MSG_READY, lib.PF_MSG_CREDIT, lib.PF_MSG_DRAIN,
    lib.PF_MSG_USER, lib.PF_MSG_CTL)
STATE_FREE, STATE_SPAWNING, STATE_READY, STATE_DRAINING, STATE_GONE = (
    lib.PF_WORKER_FREE, lib.PF_WORKER_SPAWNING, lib.PF_WORKER_READY,
    lib.PF_WORKER_DRAINING, lib.PF_WORKER_GONE)
SLOT_SIZE = ffi.sizeof("pf_slot")

__all__ = [
    "BACKEND", "MAX_FDS", "MAX_PAYLOAD", "SLOT_SIZE", "Message", "Event", "Dispatcher",
    "send_msg", "recv_msg", "Receiver", "SlotWriter", "tcp_cork",
    "listen_tcp", "listen_unix", "adopt_listener",
    "MSG_CONN", "MSG_READY", "MSG_CREDIT", "MSG_DRAIN", "MSG_USER", "MSG_CTL",
    "STATE_FREE", "STATE_SPAWNING", "STATE_READY", "STATE_DRAINING", "STATE_GONE",
]

_U32 = 0xFFFFFFFF
_INT_MAX = 0x7FFFFFFF
_POLICIES = {"rr": lib.PF_POLICY_RR, "least": lib.PF_POLICY_LEAST}
# Indexed by pf_event.type (PF_EV_WATCH = 1 ... PF_EV_DRAINED = 4).
_KINDS = (None, "watch", "message", "hangup", "drained")
_STATS = ("accepted", "dispatched", "redispatched", "busy_skips", "fd_exhaustion",
          "accept_errors", "dropped", "wakeups", "pending", "accepting")


class Message(NamedTuple):
    type: int
    arg: int
    payload: bytes
    fds: list


class Event(NamedTuple):
    kind: str   # "watch", "message", "hangup", "drained"
    slot: int   # worker slot, or -1
    tag: int    # "watch": the tag given to Dispatcher.watch


def _check(rc):
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def _index(name, value):
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError("%s must be an integer, got %r" % (name, value)) from None


def _ranged(name, value, lo, hi):
    value = _index(name, value)
    if not lo <= value <= hi:
        raise ValueError("%s must be %d..%d, got %d" % (name, lo, hi, value))
    return value


# ---- messages ---------------------------------------------------------------

class _Buffers(threading.local):
    """recv/send scratch space, one set per thread, allocated on first use."""

    def __init__(self):
        self.hdr = ffi.new("pf_msg_hdr *")
        self.payload = ffi.new("char[]", MAX_PAYLOAD)
        self.fds = ffi.new("int[]", MAX_FDS)


_bufs = _Buffers()


def send_msg(fd, type, arg=0, payload=b"", fds=()):
    """Sends one message on channel fd. EMSGSIZE (payload > MAX_PAYLOAD or more
    than MAX_FDS fds), EINVAL (bad type), BlockingIOError when a non-blocking
    channel is full, BrokenPipeError when the peer is gone. Never closes fds."""
    fd = _index("fd", fd)
    type = _index("type", type)
    arg = _index("arg", arg)
    if not 0 <= arg <= _U32:
        raise ValueError("arg must be 0..2**32-1, got %d" % arg)
    if not 0 <= type <= _U32:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    fds = [_index("fd", f) for f in fds]
    buf = _bufs.fds
    if len(fds) <= MAX_FDS:         # more: C answers EMSGSIZE without reading
        buf[0:len(fds)] = fds
    data = ffi.from_buffer(payload)     # no copy; len() is its size in bytes
    _check(lib.pf_send_msg(fd, type, arg, data, len(data), buf, len(fds)))


def recv_msg(fd, max_fds=MAX_FDS):
    """Receives one message from channel fd. BrokenPipeError on EOF,
    BlockingIOError when a non-blocking channel is empty, OSError(EBADMSG) for a
    malformed message, OSError(EMSGSIZE) when more than max_fds fds came; on
    every error all fds received are closed first. Received fds are CLOEXEC."""
    fd = _index("fd", fd)
    max_fds = _ranged("max_fds", max_fds, 0, MAX_FDS)
    b = _bufs
    n = _check(lib.pf_recv_msg(fd, b.hdr, b.payload, MAX_PAYLOAD, b.fds, max_fds))
    h = b.hdr
    return Message(h.type, h.arg, ffi.unpack(b.payload, h.len), ffi.unpack(b.fds, n))


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
        self._hdr = ffi.new("pf_msg_hdr *")
        self._payload = ffi.new("char[]", MAX_PAYLOAD)
        self._fds = ffi.new("int[]", MAX_FDS)

    def recv(self):
        fds = self._fds
        n = lib.pf_recv_msg(self._fd, self._hdr, self._payload, MAX_PAYLOAD, fds, self._max_fds)
        if n < 0:
            if n == _NEG_EAGAIN:
                return None
            raise OSError(-n, os.strerror(-n))
        h = self._hdr
        size = h.len
        return (h.type, h.arg, ffi.unpack(self._payload, size) if size else b"",
                ffi.unpack(fds, n) if n else [])


_NEG_EAGAIN = -errno.EAGAIN


# ---- scoreboard line writers ------------------------------------------------

class SlotWriter:
    """The worker-side writers of one scoreboard line, in C (csrc/slot.c):
    request_started(), request_finished() and conn_closed(n) (true when the
    primary asked for a CREDIT), as scoreboard.SlotView's, one C call each --
    a worker calls them per request. ``line`` is the line's 64 writable bytes
    (SlotView.line), kept alive by this object."""

    __slots__ = ("request_started", "request_finished", "conn_closed", "_ptr")

    def __init__(self, line):
        if memoryview(line).nbytes < SLOT_SIZE:
            raise ValueError("a scoreboard line has %d bytes, got %d" % (SLOT_SIZE, memoryview(line).nbytes))
        self._ptr = ptr = ffi.from_buffer("pf_slot *", line, require_writable=True)
        self.request_started = functools.partial(lib.pf_slot_request_started, ptr)
        self.request_finished = functools.partial(lib.pf_slot_request_finished, ptr)
        self.conn_closed = functools.partial(lib.pf_slot_conn_closed, ptr)


# ---- listeners --------------------------------------------------------------

def _check_backlog(backlog):
    backlog = _index("backlog", backlog)
    if backlog < 1:
        raise ValueError("backlog must be >= 1, got %d" % backlog)
    return backlog


def listen_tcp(host, port, backlog=2048, reuseport=False):
    """Returns a listening TCP fd (non-blocking, CLOEXEC, SO_REUSEADDR) bound to
    host:port; host None or "" means any address."""
    port = _ranged("port", port, 0, 65535)
    backlog = _check_backlog(backlog)
    chost = host.encode("idna") if host else ffi.NULL
    flags = lib.PF_LISTEN_REUSEPORT if reuseport else 0
    return _check(lib.pf_listen_tcp(chost, port, backlog, flags))


def listen_unix(path, backlog=2048, mode=0o666):
    """Returns a listening AF_UNIX fd at path (non-blocking, CLOEXEC), chmod'ed to
    mode. A stale socket file is replaced; any other existing file is
    EADDRINUSE."""
    path = os.fsencode(path)
    backlog = _check_backlog(backlog)
    return _check(lib.pf_listen_unix(path, backlog, _index("mode", mode)))


def adopt_listener(fd):
    """Returns fd after checking it is a listening stream socket and making it
    non-blocking and CLOEXEC: ENOTSOCK, EINVAL otherwise."""
    return _check(lib.pf_listen_adopt(_index("fd", fd)))


# ---- connected sockets -------------------------------------------------------

def tcp_cork(fd, on):
    """TCP_CORK on or off for the connected TCP socket ``fd`` (csrc/tcp.c)."""
    _check(lib.pf_tcp_cork(_index("fd", fd), 1 if on else 0))


# ---- dispatcher -------------------------------------------------------------

class Dispatcher:
    """The C accept loop and worker table (pf_dispatcher), fixed capacity."""

    def __init__(self, capacity, policy="rr", max_inflight=1000, max_listeners=16,
                 max_watch=16, max_pending=1024, accept_batch=32, emfile_pause_ms=100):
        self._d = None      # closed until the handle exists
        if not isinstance(policy, str) or policy not in _POLICIES:
            raise ValueError("unknown policy %r: expected 'rr' or 'least'" % (policy,))
        cfg = ffi.new("pf_config *")
        cfg.capacity = _ranged("capacity", capacity, 1, 4096)
        cfg.policy = _POLICIES[policy]
        cfg.max_inflight = _ranged("max_inflight", max_inflight, 1, 1 << 20)
        cfg.max_listeners = _ranged("max_listeners", max_listeners, 1, 64)
        cfg.max_watch = _ranged("max_watch", max_watch, 0, 64)
        cfg.max_pending = _ranged("max_pending", max_pending, 1, 65536)
        cfg.accept_batch = _ranged("accept_batch", accept_batch, 1, cfg.max_pending)
        # >= 1 so EMFILE can never become a spin; <= 60 s (longer is an outage).
        cfg.emfile_pause_ms = _ranged("emfile_pause_ms", emfile_pause_ms, 1, 60000)
        out = ffi.new("pf_dispatcher **")
        _check(lib.pf_dispatcher_new(cfg, out))
        raw = out[0]
        size = ffi.new("size_t *")
        base = ffi.cast("char *", lib.pf_dispatcher_scoreboard(raw, size))
        # ffi.gc on the handle, hung on the scoreboard pointer: the buffer keeps
        # that cdata alive, so a view that outlives this object (a Scoreboard
        # somebody kept) never points at unmapped memory. close() frees at once.
        self._owner = ffi.gc(base, lambda _, d=raw: lib.pf_dispatcher_free(d))
        self._view = memoryview(ffi.buffer(self._owner, size[0]))
        self._capacity = cfg.capacity
        self._policy = policy
        # One run can report every worker, every watch and DRAINED.
        self._nev = cfg.capacity + cfg.max_watch + 1
        self._ev = ffi.new("pf_event[]", self._nev)
        self._st = ffi.new("pf_stats *")
        self._ws = ffi.new("pf_worker_stats *")
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
        ffi.release(self._owner)    # runs pf_dispatcher_free now

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
        _check(lib.pf_dispatcher_add_listener(self._h(), _index("fd", fd)))

    def remove_listener(self, fd):
        _check(lib.pf_dispatcher_remove_listener(self._h(), _index("fd", fd)))

    def watch(self, fd, tag):
        d = self._h()
        tag = _ranged("tag", tag, 0, _U32)
        _check(lib.pf_dispatcher_watch(d, _index("fd", fd), tag))

    def unwatch(self, fd):
        _check(lib.pf_dispatcher_unwatch(self._h(), _index("fd", fd)))

    # -- workers --------------------------------------------------------------
    def add_worker(self, slot, chan, peer=-1):
        """Takes ownership of chan and peer (call before forking the worker)."""
        slot = self._slot(slot)
        chan = _index("chan", chan)
        peer = _index("peer", peer)
        if chan < 0 or peer < -1 or chan == peer:
            raise ValueError("bad channel fds chan=%d peer=%d" % (chan, peer))
        _check(lib.pf_dispatcher_add_worker(self._d, slot, chan, peer))

    def set_ready(self, slot):
        slot = self._slot(slot)
        _check(lib.pf_dispatcher_set_state(self._d, slot, lib.PF_WORKER_READY))

    def set_draining(self, slot):
        slot = self._slot(slot)
        _check(lib.pf_dispatcher_set_state(self._d, slot, lib.PF_WORKER_DRAINING))

    def remove_worker(self, slot):
        """Returns how many queued connections were recovered and re-dispatched."""
        slot = self._slot(slot)
        return _check(lib.pf_dispatcher_remove_worker(self._d, slot))

    def stop_accepting(self):
        _check(lib.pf_dispatcher_stop_accepting(self._h()))

    # -- the loop -------------------------------------------------------------
    def run(self, timeout=None):
        """Runs the loop until there are events or timeout seconds passed (None
        = no limit). Returns a list of Event; [] on timeout."""
        d = self._h()
        if timeout is None:
            ms = -1
        else:
            timeout = float(timeout)
            if not timeout >= 0:
                raise ValueError("timeout must be >= 0 or None, got %r" % timeout)
            # Round up: a 0.1 ms timeout must not become a busy 0 ms poll loop.
            ms = min(math.ceil(timeout * 1000.0), _INT_MAX)
        ev = self._ev
        n = _check(lib.pf_dispatcher_run(d, ms, ev, self._nev))
        return [Event(_KINDS[e.type], e.slot, e.tag) for e in ev[0:n]]

    # -- counters -------------------------------------------------------------
    def stats(self):
        st = self._st
        _check(lib.pf_dispatcher_stats(self._h(), st))
        return {name: getattr(st, name) for name in _STATS}

    def worker_stats(self, slot):
        slot = self._slot(slot)
        ws = self._ws
        _check(lib.pf_dispatcher_worker_stats(self._d, slot, ws))
        return {"state": ws.state, "sent": ws.sent, "closed": ws.closed, "inflight": ws.inflight}
