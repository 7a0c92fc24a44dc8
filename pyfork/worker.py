"""The child side: what a forked worker does, and the Runtime interfaces serve with.

Theory of operation. The arbiter forks inside ``spawn_worker`` and calls
``main(spec)`` in the child, which never returns (it ends in ``os._exit``, as
CPython's forkserver children do, so no primary-side atexit/finalizer runs
twice). ``main``:

1. fork hygiene: clear the wakeup fd and the primary's signal handlers; close
   every fd the primary opened after it started (sibling channels, the held
   peer ends, the dispatcher's epoll, the control socket, accepted fds pending
   in the primary) except this worker's channel and, for ``shared`` /
   ``reuseport``, its listeners; PR_SET_PDEATHSIG(SIGKILL) then a getppid()
   check, so a worker never outlives its primary (channel EOF is the second
   line of defence);
2. signals: SIGTERM asks the primary to drain us, SIGQUIT exits at once,
   SIGINT/SIGHUP/SIGTTIN/SIGTTOU are ignored (Ctrl-C and job control hit the
   whole process group; the primary orchestrates);
3. the user's ``post_fork(worker)`` hook, then the app import (a failure is
   logged with its traceback and exits with code 4 before READY, which the
   primary counts as a rapid crash), then the interface lookup;
4. ``interface.serve(app, runtime)``; READY goes over the channel when the
   interface first asks for connections (its setup, e.g. the ASGI lifespan
   startup, is done by then), or when it calls ``rt.ready()``.

The ``Worker`` object is both the Runtime of SPEC.md (take/closed/
request_started/request_finished/tick/draining/fileno/wakeup_fd) and what
``pyfork.worker.current()`` returns (id, pid, send, on_message).

With ``rr``/``least`` connections arrive as MSG_CONN on the channel and
``fileno()`` is the channel. With ``shared``/``reuseport`` the worker accepts
for itself: ``fileno()`` is a private epoll fd watching the channel and the
listeners, so one readable fd covers both (epoll fds are pollable).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Callable, List, Optional

log = logging.getLogger("pyfork.worker")

_current = None

# Exit codes a worker uses itself (the primary logs them; any exit before
# READY is a rapid crash). 4 = the app, post_fork hook or interface failed to
# load (gunicorn uses 3 for boot errors and 4 for app load errors).
EXIT_LOAD_ERROR = 4
EXIT_ORPHANED = 1

PR_SET_PDEATHSIG = 1
# Seconds a worker that got SIGTERM waits for the primary's MSG_DRAIN before
# draining on its own (the primary normally answers in well under 1 ms).
LEAVE_FALLBACK = 2.0
# Connections accepted per listener per take() call in shared/reuseport mode:
# small so that one worker does not grab a burst that several could share.
ACCEPT_BATCH = 16
# Channel messages read per take(): bounded so a flood cannot starve the loop.
READ_BATCH = 256
# In shared/reuseport mode a worker stops accepting above this many open
# connections (the dispatcher's max_inflight does the same for rr/least).
MAX_OPEN = 1000
SEND_WAIT = 5.0   # seconds a worker waits for room in a full channel before dropping a message

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def current():
    """The Worker this process is (None in the primary)."""
    return _current


class Worker:
    """Runtime for interfaces and handle for the app, in a forked worker."""

    tick_interval = 1.0

    def __init__(self, *, wid: int, slot: int, chan: int, backend, board_slot, policy: str = "rr",
                 listeners=(), max_requests: int = 0, primary_pid: Optional[int] = None):
        self.id = wid
        self.pid = os.getpid()
        self.slot = slot
        self.log = log
        self.draining = False
        self.handled = 0
        self._chan = chan
        self._b = backend
        self._board = board_slot
        self._policy = policy
        self._self_accept = policy in ("shared", "reuseport")
        self._max_requests = max_requests
        self._recycle_sent = False
        self._ready_sent = False
        self._primary_pid = primary_pid if primary_pid is not None else os.getppid()
        self._callbacks: List[Callable] = []
        self._sigterm = False
        self._leave_sent: Optional[float] = None
        self._open = 0
        self._accept_paused_until = 0.0
        self._listening = False
        self._listeners = [socket.socket(fileno=fd) for fd in listeners]
        self._wake_r = self._wake_w = -1
        self._ep = None
        os.set_blocking(chan, False)
        if self._self_accept:
            self._ep = select.epoll()
            self._ep.register(chan, select.EPOLLIN)
            for ls in self._listeners:
                ls.setblocking(False)
            self._set_listening(True)

    # ---- runtime contract ------------------------------------------------------
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
        self.ready()
        out: List[socket.socket] = []
        self._read_channel(out)
        if self._self_accept and self._listening and not self.draining:
            self._accept(out)
        return out

    def closed(self, n: int = 1) -> None:
        self._open -= n
        if self._board.conn_closed(n) and not self._self_accept:
            self._send(self._b.MSG_CREDIT, wait=0.0)
        if (self._self_accept and not self._listening and not self.draining and self._open < MAX_OPEN
                and time.monotonic() >= self._accept_paused_until):
            self._set_listening(True)

    def request_started(self) -> None:
        self._board.request_started()

    def request_finished(self) -> None:
        self._board.request_finished()
        self.handled += 1
        if self._max_requests and self.handled >= self._max_requests and not self._recycle_sent:
            self._recycle_sent = True
            self._ctl({"recycle": self.handled})

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
        if (self._self_accept and not self._listening and not self.draining and self._open < MAX_OPEN
                and now >= self._accept_paused_until):
            self._set_listening(True)

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

    def _accept(self, out: list) -> None:
        for ls in self._listeners:
            for _ in range(ACCEPT_BATCH):
                if self._open >= MAX_OPEN:
                    self._set_listening(False)
                    return
                try:
                    conn, _addr = ls.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                        continue
                    if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        # never spin on fd exhaustion: stop polling the listeners for a bit
                        log.warning("worker %d: accept: %s; pausing accepts for 100 ms", self.id, e)
                        self._accept_paused_until = time.monotonic() + 0.1
                        self._set_listening(False)
                        return
                    raise
                self._prep(conn)
                out.append(conn)

    def _prep(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._open += 1

    def _final_sweep(self, out: list) -> None:
        """On DRAIN in shared/reuseport mode: take what the kernel already queued
        on our listeners, then stop listening and drop our copies."""
        if not self._self_accept:
            return
        for ls in self._listeners:
            while True:
                try:
                    conn, _ = ls.accept()
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    if e.errno in (errno.ECONNABORTED, errno.EPROTO):
                        continue
                    break
                self._prep(conn)
                out.append(conn)
        self._set_listening(False)
        for ls in self._listeners:
            ls.close()
        self._listeners = []

    def _begin_drain(self, out: Optional[list] = None) -> None:
        if self.draining:
            return
        self.draining = True
        if self._self_accept:
            self._final_sweep(out if out is not None else [])

    def _read_channel(self, out: list) -> None:
        b = self._b
        for _ in range(READ_BATCH):
            try:
                msg = b.recv_msg(self._chan)
            except (BlockingIOError, InterruptedError):
                return
            except BrokenPipeError:
                self._orphaned("channel closed by the primary")
            except OSError as e:
                log.warning("worker %d: dropped a malformed channel message: %s", self.id, e)
                continue
            if msg.type == b.MSG_CONN:
                if self.draining:
                    # The primary promised no CONN after DRAIN; account and close.
                    for fd in msg.fds:
                        os.close(fd)
                    self._board.conn_closed(len(msg.fds))
                    continue
                for fd in msg.fds:
                    conn = socket.socket(fileno=fd)
                    conn.setblocking(False)
                    self._open += 1
                    out.append(conn)
            elif msg.type == b.MSG_DRAIN:
                for fd in msg.fds:
                    os.close(fd)
                self._begin_drain(out)
            elif msg.type == b.MSG_USER:
                for fd in msg.fds:
                    os.close(fd)
                self._deliver(msg.payload)
            else:
                for fd in msg.fds:
                    os.close(fd)

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
        _flush()
        os._exit(EXIT_ORPHANED)


class StandaloneRuntime:
    """A Runtime without a primary, for testing an interface on its own:
    take() accepts from ``listen_sock``; closed()/request_* are counters; stop()
    sets draining (and wakes the loop through wakeup_fd())."""

    tick_interval = 1.0

    def __init__(self, listen_sock: socket.socket, id: int = 0):
        self.id = id
        self.pid = os.getpid()
        self.log = logging.getLogger("pyfork.worker")
        self.draining = False
        self.taken = self.closed_count = self.started = self.finished = 0
        self.ticks = 0
        self.sent: list = []
        self._callbacks: List[Callable] = []
        self._sock = listen_sock
        listen_sock.setblocking(False)
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def ready(self) -> None:
        pass

    def fileno(self) -> int:
        return self._sock.fileno()

    def wakeup_fd(self) -> int:
        return self._r

    def take(self) -> List[socket.socket]:
        out: List[socket.socket] = []
        if self.draining:
            return out
        for _ in range(64):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out.append(conn)
        self.taken += len(out)
        return out

    def closed(self, n: int = 1) -> None:
        self.closed_count += n

    def request_started(self) -> None:
        self.started += 1

    def request_finished(self) -> None:
        self.finished += 1

    def tick(self) -> None:
        self.ticks += 1
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass

    def stop(self) -> None:
        self.draining = True
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass

    def send(self, obj) -> None:
        self.sent.append(json.loads(json.dumps(obj)))

    def on_message(self, callback: Callable) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- the child's main -------------------------------------------------------------
class WorkerSpec:
    """Everything the child needs, built by the arbiter just before fork."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _flush() -> None:
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


def _open_fds() -> List[int]:
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:  # pragma: no cover - no /proc
        return list(range(3, 1024))


def _hygiene(spec) -> None:
    # 1. signals: the primary's handlers and its wakeup fd must not fire here.
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in spec.primary_signals:
        signal.signal(sig, signal.SIG_DFL)
    # 2. fds: everything the primary opened since it started, except ours.
    keep = {0, 1, 2, spec.chan, *spec.listeners}
    close = (set(_open_fds()) - set(spec.baseline_fds)) | set(spec.primary_fds)
    for fd in sorted(close - keep):
        try:
            os.close(fd)
        except OSError:
            pass
    # 3. die with the primary: PR_SET_PDEATHSIG, then close the race where it
    # died between fork() and prctl() (we would already be reparented).
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != spec.primary_pid:
        os._exit(EXIT_ORPHANED)


def _install_signals(w: Worker) -> None:
    r, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    w._wake_r, w._wake_w = r, wfd

    def on_term(signum, frame):   # only records; tick() acts
        w._sigterm = True

    def on_quit(signum, frame):
        os._exit(0)

    def ignore(signum, frame):
        pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGQUIT, on_quit)
    # No-op handlers rather than SIG_IGN: handlers reset to default across exec,
    # so subprocesses the app runs still get Ctrl-C normally.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, ignore)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)


def _resolve_interface(app, name):
    import pyfork.serve
    return pyfork.serve.resolve(app, name)


def _boot(spec) -> int:
    global _current
    _hygiene(spec)
    w = Worker(wid=spec.wid, slot=spec.slot, chan=spec.chan, backend=spec.backend, board_slot=spec.board_slot,
               policy=spec.policy, listeners=spec.listeners, max_requests=spec.max_requests,
               primary_pid=spec.primary_pid)
    _current = w
    _install_signals(w)
    spec.board_slot.set_pid(w.pid)
    w._ctl({"online": True})
    where = f"worker {w.id} (pid {w.pid})"
    if spec.post_fork is not None:
        try:
            spec.post_fork(w)
        except Exception:
            log.error("%s: post_fork hook failed:\n%s", where, traceback.format_exc().rstrip())
            return EXIT_LOAD_ERROR
    app = spec.target
    if isinstance(app, str):
        from pyfork import applib
        try:
            app = applib.load_app(app)
        except applib.AppImportError as e:
            cause = e.__cause__
            tb = "".join(traceback.format_exception(cause)).rstrip() if cause is not None else ""
            log.error("%s: %s%s", where, e, ("\n" + tb) if tb else "")
            return EXIT_LOAD_ERROR
    try:
        iface = _resolve_interface(app, spec.interface)
    except Exception:
        log.error("%s: no interface for the app:\n%s", where, traceback.format_exc().rstrip())
        return EXIT_LOAD_ERROR
    # READY goes out when the interface first asks for connections (Worker.ready()).
    spec.board_slot.heartbeat()
    iface.serve(app, w)
    return 0


def main(spec) -> None:
    """Child entry point; never returns."""
    code = 1
    try:
        code = _boot(spec)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        try:
            log.error("worker %s (pid %d) died:\n%s", getattr(spec, "wid", "?"), os.getpid(),
                      traceback.format_exc().rstrip())
        except BaseException:
            pass
        code = 1
    finally:
        _flush()
        os._exit(code)
