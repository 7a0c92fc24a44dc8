"""The child side: the Runtime a forked worker's interface serves with.

Theory of operation. pyfork.worker.boot takes a child from the fork to
``interface.serve(app, worker)`` (fork hygiene, signals, app import); this
module is what the interface talks to from then on. The ``Worker`` object is
both the runtime the interfaces serve with (the ``Runtime`` protocol of
pyfork/serve/runtime.py: take/take_fds/closed/request_started/request_finished/
tick/draining/fileno/wakeup_fd/tcp_cork...) and what ``pyfork.worker.current()``
returns (id, pid, send, on_message). READY goes over the channel when the interface
first asks for connections (fileno/take/tick), or when it calls ``ready()``.

With ``rr``/``least`` connections arrive as MSG_CONN on the channel, but for a
pull: while the primary has set ``pull`` on our scoreboard line (no worker could
start a new connection, so it left it in the kernel's queue), we accept from the
listeners we inherited whenever we have room. With ``shared``/``reuseport`` the
worker always accepts for itself. Either way ``fileno()`` is a private epoll fd
watching the channel and, while we accept, the listeners, so one readable fd covers
both (epoll fds are pollable); without listeners (a bare runtime) it is the channel.
A worker accepts only what it can start (_accept_room), counted on its line
(conn_accepted: the primary's view of what is open, and fresh, so no parked
connection is sent to it meanwhile); idle kept-alive connections it hands back
(park) return through the channel.

A worker takes from its channel only what it can start: at most its free
capacity (``set_capacity``, declared by the interface before READY: 1 for the
sync WSGI and raw interfaces, more for asyncio/ASGI) minus the requests it is
running and the connections it took whose first request has not begun, and
counts every fd it reads in the scoreboard's ``taken`` and ``fresh`` (the
writers of slot.c: a request start or a close ends a connection's freshness,
so a sync worker that took a connection is not idle before its request's
bytes arrive). The primary sends no more than that either, so a connection waits in the kernel's
accept queue (or the primary's ring) rather than behind a slow request here,
and a SIGKILLed worker loses only what it was running: what is still in its
channel is read back by the primary and re-dispatched. request_finished() and
closed() send MSG_CREDIT when the primary, finding no room, asked for one.

The per-connection path is kept lean because with ``Connection: close`` it
runs once per request: take() reads the queued channel messages it can start
in one call (bounded by READ_BATCH); a received fd becomes a socket object without a
syscall when the listeners' family is known (the dispatcher already made it
non-blocking and set TCP_NODELAY, which ``tcp_nodelay`` tells the interfaces),
and of a class whose ``family``/``type`` are plain class attributes, so interfaces and the event loop read
them without an enum conversion. take_fds() skips even that, for an interface
that builds its own connection objects (ASGI on uvloop). closed() and
request_* are the backend's SlotWriter (one C call each with the C backend).

``pyfork.worker.standalone.StandaloneRuntime`` is the same contract without a primary,
for testing an interface on its own.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import select
import socket
import struct
import sys
import termios
import time
from typing import Callable, List, Optional

from pyfork import _api
from pyfork.scoreboard import PARK_OFF_WORD, PULL_WORD
from pyfork.serve import connlimits

log = logging.getLogger("pyfork.worker")

_current = None

# Exit codes a worker uses itself (the primary logs them; any exit before
# READY is a rapid crash). 4 = the app, post_fork hook or interface failed to
# load (gunicorn uses 3 for boot errors and 4 for app load errors).
EXIT_LOAD_ERROR = 4
EXIT_ORPHANED = 1

# Seconds a worker that got SIGTERM waits for the primary's MSG_DRAIN before
# draining on its own (the primary normally answers in well under 1 ms).
LEAVE_FALLBACK = 2.0
# Connections accepted per listener per take() call in shared/reuseport mode:
# small so that one worker does not grab a burst that several could share.
ACCEPT_BATCH = 16
# Channel messages read per take(): bounded so a flood cannot starve the loop.
READ_BATCH = 256
# Connections a worker can start at once when its interface declares nothing
# (the dispatcher then applies only its open-connection cap).
NO_CAPACITY = 0
# In shared/reuseport mode a worker accepts only while it runs fewer requests than its
# capacity, as the primary sends for rr/least (work, not open connections: an idle
# kept-alive connection or a WebSocket costs memory, not a slot; issue 18, where a cap of
# 1000 open connections per worker locked new clients out behind 2,000 active keep-alive
# ones). MAX_OPEN caps open connections only for an interface that declares no capacity
# (the dispatcher's max_inflight does the same for rr/least).
MAX_OPEN = 1000
SEND_WAIT = 5.0   # seconds a worker waits for room in a full channel before dropping a message
# parks_settled(): how long a draining worker that parked waits for the primary to read
# what it sent (the primary's loop is C and never blocks: this is a bound, not a delay).
PARK_SETTLE_MAX = 2.0

def current():
    """The Worker this process is (None in the primary)."""
    return _current


def set_current(worker) -> None:
    """Makes ``worker`` what current() returns (pyfork.worker.boot, once, after fork)."""
    global _current
    _current = worker


# ---- connection sockets ----------------------------------------------------------
_STREAM_NB = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_INET = (socket.AF_INET, socket.AF_INET6)
_conn_classes: dict = {}


def conn_class(family: int):
    """The socket.socket subclass for connected stream sockets of ``family``: its
    ``family`` and ``type`` are class attributes (the same enum members the base class
    would build per access), so reading them costs no conversion. Same repr, same API."""
    cls = _conn_classes.get(family)
    if cls is None:
        fam = socket.AddressFamily(family)
        cls = type("socket", (socket.socket,), {
            "__slots__": (), "__module__": "socket", "__qualname__": "socket",
            "family": fam, "type": socket.SOCK_STREAM})
        _conn_classes[family] = cls
    return cls


def _conn_proto(family: int) -> int:
    # what socket.socket(fileno=fd) would read back with SO_PROTOCOL
    return socket.IPPROTO_TCP if family in _INET else 0


_raw_family = socket.SocketType.family.__get__   # the C getter (_socket.socket): a plain int


class Acceptor:
    """A listening socket a worker accepts from itself (shared/reuseport), what a
    connection accepted on it is built with, and the accept(2) errno triage of the
    C core's loop (csrc/dispatch_loop.c, errno classes from pyfork._api):
      the backlog is empty (EAGAIN)            -> AGAIN
      one connection's error (ECONNABORTED...) -> skip it, accept the next
      out of fds (EMFILE, ENFILE)              -> spend the reserve fd to accept and
                                                  serve the client at the head of the
                                                  backlog, then PAUSE
      not a listener any more (EBADF, EINVAL)  -> DEAD: never poll it again
      anything else (ENOBUFS, ENOMEM)          -> PAUSE (retrying at once would spin)
    After PAUSE the caller leaves the listener out of its poll set for ``pause_s``
    (emfile_pause_ms, as the dispatcher's). The reserve fd (/dev/null, opened with
    ``reserve=True``) is this acceptor's; close() closes it, never the listener."""

    AGAIN, MORE, PAUSE, DEAD = range(4)

    __slots__ = ("accept", "cls", "family", "nodelay", "proto", "sock", "pause_s",
                 "reserve", "_reserve_wanted")

    def __init__(self, sock: socket.socket, emfile_pause_ms: int = _api.EMFILE_PAUSE_MS,
                 reserve: bool = False):
        self.sock = sock
        self.accept = sock._accept           # (fd, addr); socket.accept() adds two enum conversions
        family = _raw_family(sock)
        self.cls = conn_class(family)
        self.family = family
        self.proto = _conn_proto(family)
        self.nodelay = family in _INET
        self.pause_s = _api.check_pause_ms(emfile_pause_ms) / 1000.0
        self.reserve = -1
        self._reserve_wanted = reserve
        self._reserve_open()

    def take(self) -> socket.socket:
        """One accepted connection, non-blocking, TCP_NODELAY for TCP (BlockingIOError
        when none; any other accept error is raised as it is)."""
        return self._build(self.accept()[0])

    def _build(self, fd: int) -> socket.socket:
        conn = self.cls(self.family, socket.SOCK_STREAM, self.proto, fd)
        conn.setblocking(False)
        if self.nodelay:
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        return conn

    def accept_some(self, out: list, budget: int) -> int:
        """Accepts up to ``budget`` connections into ``out`` with the triage above;
        returns AGAIN, MORE (budget spent), PAUSE or DEAD."""
        if self.reserve < 0 and self._reserve_wanted:
            self._reserve_open()    # spent on an EMFILE: fds may be free again
        accept = self.accept
        for _ in range(budget):
            try:
                fd = accept()[0]
            except (BlockingIOError, InterruptedError):
                return self.AGAIN
            except OSError as e:
                code = e.errno
                if code in _api.ACCEPT_CONTINUE:
                    continue
                if code in _api.ACCEPT_FD_EXHAUSTED:
                    self._on_emfile(out)
                    return self.PAUSE
                if code in _api.ACCEPT_DEAD:
                    return self.DEAD
                return self.PAUSE
            out.append(self._build(fd))
        return self.MORE

    def _on_emfile(self, out: list) -> None:
        # libuv's reserve-fd trick: free one fd, accept the client at the head of
        # the backlog (this worker serves it), take the fd back when one is free.
        if self.reserve < 0:
            return
        os.close(self.reserve)
        self.reserve = -1
        try:
            fd = self.accept()[0]
        except OSError:
            pass
        else:
            out.append(self._build(fd))
        self._reserve_open()

    def _reserve_open(self) -> None:
        if self.reserve < 0 and self._reserve_wanted:
            try:
                self.reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass    # still out of fds: retried by the next accept_some

    def close(self) -> None:
        """Closes the reserve fd (the listener stays the caller's)."""
        if self.reserve >= 0:
            os.close(self.reserve)
            self.reserve = -1
        self._reserve_wanted = False


def _unread_by_peer(chan: int) -> int:
    """Bytes we sent on channel `chan` that its reader has not consumed yet (SIOCOUTQ:
    on a Unix socket, the memory of our datagrams still queued at the peer)."""
    return struct.unpack("i", fcntl.ioctl(chan, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


class Worker:
    """Runtime for interfaces and handle for the app, in a forked worker."""

    tick_interval = 1.0
    tcp_nodelay = True    # sockets from take() have TCP_NODELAY already (the dispatcher sets it); see Runtime
    parks = True          # the primary parks the idle connections we hand back (every policy)

    def __init__(self, *, wid: int, slot: int, chan: int, backend, board_slot, policy: str = "rr",
                 listeners=(), max_requests: int = 0, primary_pid: Optional[int] = None,
                 conn_family: Optional[int] = None, emfile_pause_ms: int = _api.EMFILE_PAUSE_MS):
        self.id = wid
        self.pid = os.getpid()
        self.slot = slot
        self.log = log
        self.draining = False
        self._chan = chan
        self._b = backend
        self._board = board_slot
        self._policy = policy
        self._self_accept = policy in ("shared", "reuseport")
        # rr/least: the primary accepts, but while it sets our line's pull (no worker could
        # start a new connection) we accept from the listeners we inherited whenever we have
        # room (csrc/dispatch_send.c, pf__pull_start). Either way we hold an epoll of them.
        self._pulls = not self._self_accept and bool(listeners)
        self._accepts = self._self_accept or self._pulls
        self._max_requests = max_requests
        self._recycle_sent = False
        self._ready_sent = False
        self._primary_pid = primary_pid if primary_pid is not None else os.getppid()
        self._callbacks: List[Callable] = []
        self._sigterm = False
        self._leave_sent: Optional[float] = None
        self._open = 0
        self._parked = False      # a PARK went out since parks_settled() last looked
        self._accept_paused_until = 0.0
        self._backlog_more = False    # self-accept: the last accept() filled its budget
        self._sweep_due = False       # self-accept: draining, our backlog not swept yet
        self._listening = False
        self._listeners = [socket.socket(fileno=fd) for fd in listeners]
        self._acceptors = [Acceptor(ls, emfile_pause_ms, reserve=True) for ls in self._listeners]
        # Connections handed over on the channel: with the family known (every listener
        # has the same one), a socket object is built from the fd without a syscall (the
        # dispatcher made it non-blocking and set TCP_NODELAY).
        self.conn_family = conn_family    # of every connection fd, or None when listeners differ
        self._conn_cls = conn_class(conn_family) if conn_family is not None else None
        self._conn_proto = _conn_proto(conn_family) if conn_family is not None else 0
        self._wake_r = self._wake_w = -1
        self._ep = None
        os.set_blocking(chan, False)
        # Per request: the backend's writers of our scoreboard line (one C call each with
        # the C backend), without a Worker frame around them; request_finished needs
        # one only to count towards max_requests.
        writer = self._writer = backend.SlotWriter(board_slot.line)
        self.request_started = writer.request_started
        self._request_done = writer.request_finished     # true: the primary wants a CREDIT
        self._conn_taken = writer.conn_taken
        self._conn_accepted = writer.conn_accepted
        self._capacity = NO_CAPACITY
        # park(): pf_slot.park_off, the primary's "stopping: hand nothing back" (PARK_OFF_WORD).
        self._line_words = board_slot.line.cast("B").cast("I")
        # Per take(): a backend Receiver (set up once; None, not BlockingIOError, when empty).
        self._recv = backend.Receiver(chan).recv
        if self._accepts:
            self._ep = select.epoll()
            self._ep.register(chan, select.EPOLLIN)
            for ls in self._listeners:
                ls.setblocking(False)
            self._set_listening(self._self_accept)

    # ---- runtime contract (pyfork.serve.runtime.Runtime documents each member) ------
    def ready(self) -> None:
        """Tells the primary this worker can take connections (idempotent). Interfaces
        need not call it: the first fileno(), take() or tick() call does, because an
        interface asks for the fd to watch only once its own setup (for ASGI, the
        lifespan startup) is done. So a worker whose setup fails is a crash before
        READY, and a rolling restart waits for it."""
        if not self._ready_sent:
            self._ready_sent = True
            self._board.heartbeat()
            self._send(self._b.MSG_READY)

    def fileno(self) -> int:
        self.ready()
        return self._ep.fileno() if self._ep is not None else self._chan

    def wakeup_fd(self) -> int:
        return self._wake_r

    def take(self) -> List[socket.socket]:
        socks = self._sockets(self._take())     # fds from the channel
        if self._listening or self._sweep_due:
            self._accept_or_sweep(socks, len(socks))    # and sockets from our own accept()
        return socks

    def queued(self) -> bool:
        """True when connections the primary sent wait in our channel (a scoreboard read,
        no syscall), or, accepting for ourselves, when our last accept() filled its budget (so
        the backlog may hold more): a sync interface that is free again takes the next one
        without going back to its selector."""
        if self._accepts and self._backlog_more and self._listening:
            return True           # the last accept() filled its budget: try the backlog again
        return self._board.queued()

    def take_fds(self) -> List[int]:
        """take(), with each connection as a bare fd that the caller now owns: for an
        interface that builds its own connection object (ASGI on uvloop), so no socket
        object is made and detached per connection. ``conn_family`` says what they are."""
        if not self._ready_sent:
            self.ready()
        out: List[int] = []       # _take() inlined: this runs per channel wake-up
        self._read_channel(out)   # first: a DRAIN read here makes the sweep due
        if self._listening or self._sweep_due:
            socks: list = []
            self._accept_or_sweep(socks, len(out))
            out += [conn.detach() for conn in socks]
        return out

    def _take(self) -> List[int]:
        """The fds that arrived on the channel (rr/least: every connection; shared/
        reuseport: parked connections coming back)."""
        if not self._ready_sent:    # tested here: take() runs per channel wakeup
            self.ready()
        out: List[int] = []
        self._read_channel(out)
        return out

    def _accept_or_sweep(self, out: list, have: int) -> None:
        """Self-accept: what we can start now from our listeners (less the ``have`` this
        take() got from the channel), or once draining, all they hold (the final sweep)."""
        if self._sweep_due:
            self._final_sweep(out)
        elif self._listening and not self.draining:
            if self._may_accept():
                self._accept(out, have)
            else:
                self._set_listening(False)      # the primary's pull is over

    def _sockets(self, fds: List[int]) -> List[socket.socket]:
        cls = self._conn_cls
        if cls is not None:
            family, proto = self.conn_family, self._conn_proto
            return [cls(family, _STREAM_NB, proto, fd) for fd in fds]
        out = []
        for fd in fds:           # family unknown (mixed listeners): ask the kernel
            conn = socket.socket(fileno=fd)
            conn.setblocking(False)
            out.append(conn)
        return out

    def tcp_cork(self, fd: int, on: bool) -> None:
        self._b.tcp_cork(fd, on)

    def closed(self, n: int = 1) -> None:
        self._open -= n
        if self._writer.conn_closed(n):
            self._send(self._b.MSG_CREDIT, wait=0.0)
        if not self._listening and self._accepts and self._may_accept():
            self._resume_accepting(time.monotonic())

    def park(self, fds: List[int]) -> int:
        """Hands idle connections back to the primary (MSG_PARK, up to MAX_FDS a message):
        the first k of fds, k returned; see Runtime.park. Non-blocking and silent because the
        WSGI interface calls it from a SIGALRM handler while the application runs: a full
        channel keeps the rest here. Counted as closed on our line (they left this worker)."""
        if not self.parks or self.draining or not fds or self._line_words[PARK_OFF_WORD]:
            return 0
        b = self._b
        max_fds = b.MAX_FDS
        k = 0
        while k < len(fds):
            batch = fds[k:k + max_fds]
            try:
                b.send_msg(self._chan, b.MSG_PARK, 0, b"", batch)
            except OSError:
                break           # EAGAIN (full), EPIPE (primary gone: tick() finds out)
            k += len(batch)
        if k:
            self._parked = True
            self._open -= k
            if self._writer.conn_closed(k):
                # The primary asked for a CREDIT; a parked connection frees no room to
                # start a request, but the flag is cleared now, so answer it.
                try:
                    b.send_msg(self._chan, b.MSG_CREDIT)
                except OSError:
                    pass        # full: the primary is reading us anyway (10 ms recheck)
        return k

    def parks_settled(self) -> bool:
        """For a draining interface about to finish: True when no connection it parked can
        still come back. The primary sends a PARK it reads after its final dispatch back
        to us, as a CONN, before it consumes the PARK (csrc/park.c, pf__park_return), so:
        wait until it has read all we sent (the channel's SIOCOUTQ is 0), then anything
        coming back is in our channel. False: it is, take() it and serve it (CONNs after
        DRAIN are only those). A worker that never parked pays nothing."""
        if not self._parked:
            return True
        self._parked = False
        deadline = time.monotonic() + PARK_SETTLE_MAX
        while _unread_by_peer(self._chan) > 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        # The primary publishes `sent` before it consumes the PARK: sent > taken says a CONN
        # waits for us (a scoreboard read; no poll of the channel fd, whatever its number).
        return not self._board.queued()

    def request_started(self) -> None:     # replaced per instance in __init__
        self._writer.request_started()

    def request_finished(self) -> None:
        # A finished request is room to start another: a primary that found none
        # asked for a CREDIT (want_credit) and may have stopped accepting.
        if self._request_done():
            self._send(self._b.MSG_CREDIT, wait=0.0)
        if not self._listening and self._accepts and self._may_accept():   # room to accept again
            self._resume_accepting(time.monotonic())
        if self._max_requests and self.handled >= self._max_requests and not self._recycle_sent:
            self._recycle_sent = True
            self._ctl({"recycle": self.handled})

    @property
    def handled(self) -> int:
        """Requests this worker has finished (its scoreboard line counts them)."""
        return self._board.handled

    def tick(self) -> None:
        self.ready()
        self._board.heartbeat()
        if self._wake_r >= 0:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
        now = time.monotonic()
        if self._sigterm and self._leave_sent is None and not self.draining:
            # Let the primary drain us: it stops sending first, then MSG_DRAIN
            # arrives after the last connection queued for us (nothing lost).
            self._leave_sent = now
            self._ctl({"drain": True})
        if self._leave_sent is not None and not self.draining and now - self._leave_sent >= LEAVE_FALLBACK:
            log.warning("worker %d (pid %d): no DRAIN from the primary; draining anyway", self.id, self.pid)
            self._begin_drain()
        if os.getppid() != self._primary_pid:
            self._orphaned("primary is gone (parent changed)")
        rejected = connlimits.take_rejections()
        if rejected:    # --limit-concurrency 503s: one message per tick, never per request
            self._ctl({"rejected": rejected})
        if self._accepts:
            if not self._listening:
                self._resume_accepting(now)
            elif not self._may_accept():
                self._set_listening(False)      # the primary's pull is over

    def set_capacity(self, capacity: int) -> None:
        """Declares how many requests this worker can run at once (the interface's
        CAPACITY; pyfork.worker.boot calls it before READY): the dispatcher sends it
        a connection only while queued + running < capacity, and take() reads at
        most that many."""
        capacity = int(capacity)
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._capacity = capacity
        self._writer.set_capacity(capacity)

    # ---- app-facing API ------------------------------------------------------------
    def send(self, obj) -> None:
        """Sends a JSON-serialisable value to the primary ('message' event)."""
        payload = json.dumps(obj, separators=(",", ":")).encode()
        if len(payload) > self._b.MAX_PAYLOAD:
            raise ValueError(f"message too large: {len(payload)} bytes > {self._b.MAX_PAYLOAD}")
        self._send(self._b.MSG_USER, payload=payload)

    def on_message(self, callback: Callable) -> None:
        """callback(obj) for every message the primary sends this worker
        (delivered from take(), i.e. in the interface's loop)."""
        self._callbacks.append(callback)

    def __repr__(self) -> str:
        return f"<pyfork worker {self.id} pid {self.pid} slot {self.slot}>"

    # ---- internals -------------------------------------------------------------------
    def _set_listening(self, on: bool) -> None:
        if self._ep is None or on == self._listening:
            return
        for ls in self._listeners:
            if on:
                self._ep.register(ls.fileno(), select.EPOLLIN)
            else:
                self._ep.unregister(ls.fileno())
        self._listening = on

    def _accept_room(self) -> int:
        """Connections this self-accepting worker may accept now: capacity minus the requests
        it runs, up to a batch; room under MAX_OPEN for an interface without a capacity. A
        sync worker thus accepts one connection at a time, so it never holds a batch behind
        the slow request it starts first (a batch of 16 did: a 25 ms light p99 under a
        /sleep stream); queued() lets it try the backlog again at once, without a select().
        One it took before the request of the one before arrived is parked like an idle one
        if that request runs long (where the interface parks: WSGI with keep-alive, no TLS).
        Counting accepted connections as fresh work here too measured no better, and would
        stop a worker that holds a silent preconnect from accepting until a tick
        (bench/README.md, session 28)."""
        if self._capacity:
            return min(ACCEPT_BATCH, self._capacity - self._board.active)
        return MAX_OPEN - self._open

    def _may_accept(self) -> bool:
        """shared/reuseport: always; rr/least: while the primary's pull is on (one word
        of our scoreboard line, no syscall)."""
        return self._self_accept or self._line_words[PULL_WORD] != 0

    def _resume_accepting(self, now: float) -> None:
        if (not self.draining and now >= self._accept_paused_until and self._may_accept()
                and self._accept_room() > 0):
            self._set_listening(True)

    def _accept(self, out: list, have: int) -> None:
        """Accepts into ``out`` what we can start, less the ``have`` connections this take()
        already got (parked ones back from the channel, other listeners' in this loop)."""
        for acc in list(self._acceptors):
            room = self._accept_room()
            if room <= 0:
                self._set_listening(False)
                return
            room -= have
            if room <= 0:
                return
            n = len(out)
            r = acc.accept_some(out, min(ACCEPT_BATCH, room))
            if len(out) > n:
                self._open += len(out) - n
                self._conn_accepted(len(out) - n)
                have += len(out) - n
            self._backlog_more = r == Acceptor.MORE
            if r == Acceptor.PAUSE:
                # never spin on fd exhaustion: stop polling the listeners for a bit
                log.warning("worker %d: accept failed (out of fds or memory); pausing accepts "
                            "for %.0f ms", self.id, acc.pause_s * 1000)
                self._accept_paused_until = time.monotonic() + acc.pause_s
                self._set_listening(False)
                return
            if r == Acceptor.DEAD:
                log.warning("worker %d: listener fd %d is no longer listening; dropped",
                            self.id, acc.sock.fileno())
                self._drop_acceptor(acc)
        if self._accept_room() <= 0:
            self._set_listening(False)

    def _drop_acceptor(self, acc: Acceptor) -> None:
        if self._listening:
            self._ep.unregister(acc.sock.fileno())
        self._acceptors.remove(acc)
        self._listeners.remove(acc.sock)
        acc.close()
        acc.sock.close()

    def _final_sweep(self, out: list) -> None:
        """Draining in shared/reuseport mode: take what the kernel already queued on our
        listeners, then stop listening and drop our copies. Run by take(): on MSG_DRAIN the
        take() that read it returns what this accepts; after our own fallback in tick() the
        next take() does, if the interface makes one (WSGI with parking still watches the
        listeners; otherwise the connections stay in the kernel's queue for the others)."""
        self._sweep_due = False
        for acc in self._acceptors:
            n = len(out)
            while acc.accept_some(out, ACCEPT_BATCH) == Acceptor.MORE:
                pass
            if len(out) > n:
                self._open += len(out) - n
                self._conn_accepted(len(out) - n)     # counted as open, as any accepted one
        self._close_listeners()

    def _close_listeners(self) -> None:
        """Stop listening and drop our copies: once the primary closes its own at a stop,
        nothing may keep the sockets listening."""
        self._set_listening(False)
        for acc in self._acceptors:
            acc.close()
        for ls in self._listeners:
            ls.close()
        self._listeners = []
        self._acceptors = []

    def _begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self._sweep_due = self._self_accept
        if self._pulls:
            # The primary and the other workers keep the backlog: no sweep here.
            self._close_listeners()

    def _read_channel(self, out: list) -> None:
        b = self._b
        recv, msg_conn = self._recv, b.MSG_CONN
        # Only what we can start (the primary sends no more than that either): at
        # most capacity - (running + fresh: taken, first request not begun) fds, but
        # at least one message, or a readable channel would spin the interface's loop.
        cap = self._capacity
        board = self._board
        room = max(1, cap - board.active - board.fresh) if cap else READ_BATCH * b.MAX_FDS
        for _ in range(READ_BATCH):
            if room <= 0:
                return
            try:
                msg = recv()
            except (BlockingIOError, InterruptedError):
                return
            except BrokenPipeError:
                self._orphaned("channel closed by the primary")
            except OSError as e:
                log.warning("worker %d: dropped a malformed channel message: %s", self.id, e)
                continue
            if msg is None:      # the channel is empty
                return
            mtype, _arg, payload, fds = msg
            if mtype == msg_conn:
                n = len(fds)
                room -= n
                self._conn_taken(n)       # no longer queued: ours to serve (or close)
                # After DRAIN a CONN is only connections we parked, come back (parks_settled).
                out += fds
                self._open += n
                continue
            for fd in fds:
                os.close(fd)
            if mtype == b.MSG_DRAIN:
                self._begin_drain()
            elif mtype == b.MSG_USER:
                self._deliver(payload)

    def _deliver(self, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except ValueError:
            log.warning("worker %d: dropped a message that is not JSON", self.id)
            return
        for cb in list(self._callbacks):
            try:
                cb(obj)
            except Exception:
                log.exception("worker %d: on_message callback failed", self.id)

    def _ctl(self, obj) -> None:
        self._send(self._b.MSG_CTL, payload=json.dumps(obj).encode(), wait=1.0)

    def _send(self, mtype: int, arg: int = 0, payload: bytes = b"", wait: float = SEND_WAIT) -> bool:
        deadline = time.monotonic() + wait
        while True:
            try:
                self._b.send_msg(self._chan, mtype, arg, payload)
                return True
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning("worker %d: channel full, dropped a message of type %d", self.id, mtype)
                    return False
                p = select.poll()
                p.register(self._chan, select.POLLOUT)
                p.poll(min(left, 0.1) * 1000)
            except BrokenPipeError:
                self._orphaned("channel closed by the primary")

    def _orphaned(self, why: str) -> None:
        log.warning("worker %d (pid %d): %s; exiting", self.id, self.pid, why)
        flush_output()
        os._exit(EXIT_ORPHANED)

    # ---- for pyfork.worker.boot (set-up right after fork) ------------------------------
    def use_wakeup_pipe(self, r: int, w: int) -> None:
        """The pipe signal.set_wakeup_fd writes to: wakeup_fd() is its read end."""
        self._wake_r, self._wake_w = r, w

    def note_sigterm(self) -> None:
        """Called from the SIGTERM handler: only records; tick() asks the primary to drain us."""
        self._sigterm = True

    def say_online(self) -> None:
        """Tells the primary this process runs pyfork code (its 'online' event)."""
        self._ctl({"online": True})


def flush_output() -> None:
    """Flushes the logging handlers and stdout/stderr: before a fork (or the child writes
    the parent's buffered output again) and before os._exit (or it is lost)."""
    for h in logging.getLogger().handlers + logging.getLogger("pyfork").handlers:
        try:
            h.flush()
        except Exception:
            pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass

