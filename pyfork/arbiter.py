"""The primary: binds, forks, reaps, and runs the one loop that everything else hangs off.

Theory of operation (gunicorn's arbiter + CPython's forkserver): signal
handlers only record the signal; ``signal.set_wakeup_fd`` writes a byte to a
pipe that the dispatcher watches, so the dispatcher's ``run()`` -- the C accept
loop with the GIL released, or its pure-Python twin -- is the only blocking
call. When it returns the loop handles, in order: dispatcher events (worker
messages, the control socket, "drained"), recorded signals, reaping, and a
``Tick`` for timers. Every decision (respawn, backoff, drain, kill, exit) comes
from ``pyfork.policy.Lifecycle`` as actions; this module only carries them out:
``spawn_worker``, ``reap_workers``, ``kill_worker``, and the ``handle_<signal>``
methods.

Ownership: listeners, the wakeup pipe and the control socket belong to the
arbiter; worker channels (both ends) belong to the dispatcher from
``add_worker`` on, which is called *before* fork so a worker's queued
connections can be recovered by ``remove_worker`` if it dies.

Policies ``shared`` and ``reuseport`` have no accept loop in the primary: the
workers accept, the dispatcher still carries channels and watched fds. For
``reuseport`` the primary creates one SO_REUSEPORT listener per worker slot and
keeps it, so a respawned or replacement worker inherits the same socket and
nothing queued on it is reset when a worker dies.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import time
from collections import deque
from typing import Callable, Dict, List, Optional

from pyfork import policy as P
from pyfork import worker as W
from pyfork.config import BindAddr, Settings

log = logging.getLogger("pyfork.arbiter")

EXIT_OK, EXIT_INTERNAL, EXIT_STARTUP, EXIT_GAVE_UP = 0, 1, 2, 3
TAG_WAKEUP, TAG_CONTROL = 0, 1          # control clients use tags >= 2
TICK = 1.0                               # heartbeat check period (the worker ticks every 1 s)
MAX_MSGS_PER_EVENT = 256                 # fairness: messages read from one channel per wakeup
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
SIG_NAMES = {s: signal.Signals(s).name for s in HANDLED_SIGNALS}


class StartupError(Exception):
    """Anything that must stop the primary before the first fork (exit code 2)."""


class WorkerHandle:
    """The primary's view of one worker (what cluster.workers holds)."""

    def __init__(self, arbiter, wid: int, slot: int):
        self._arb = arbiter
        self.id = wid
        self.slot = slot
        self.pid: Optional[int] = None
        self.state = P.SPAWNING
        self.started = time.monotonic()
        self._disconnected = False

    def send(self, obj) -> bool:
        """Sends a JSON value to the worker. Returns False (and logs) when it cannot
        be delivered now (channel full, worker gone); ValueError when not JSON or too large."""
        return self._arb.send_to(self.id, obj)

    def __repr__(self) -> str:
        return f"<WorkerHandle id={self.id} pid={self.pid} slot={self.slot} state={self.state}>"


class _Proc:
    __slots__ = ("wid", "slot", "phys", "chan", "pid", "handle", "board")

    def __init__(self, wid, slot, phys, chan, handle, board):
        self.wid, self.slot, self.phys, self.chan, self.handle, self.board = wid, slot, phys, chan, handle, board
        self.pid = None


def _url(addr: BindAddr, fd: int) -> str:
    if addr.kind == "unix":
        return f"unix:{addr.path}"
    s = socket.socket(fileno=os.dup(fd))
    try:
        name = s.getsockname()
        fam = s.family
    finally:
        s.close()
    if fam == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
    host, port = name[0], name[1]
    return f"http://[{host}]:{port}" if fam == socket.AF_INET6 else f"http://{host}:{port}"


def _bound_port(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.getsockname()[1]
    finally:
        s.close()


class Arbiter:
    def __init__(self, settings: Settings, *, emit: Callable = None, post_fork: Callable = None):
        self.cfg = settings
        self._emit_cb = emit
        self.post_fork = post_fork
        self.backend = None
        self.disp = None
        self.board = None
        self.policy: Optional[P.Lifecycle] = None
        self.listeners: List[tuple] = []          # (BindAddr, fd, adopted)
        self.slot_listeners: Dict[int, List[int]] = {}   # reuseport: logical slot -> fds
        self.reuse_ports: List[int] = []
        self.procs: Dict[int, _Proc] = {}
        self.by_pid: Dict[int, int] = {}
        self.by_phys: Dict[int, int] = {}
        self.handles: Dict[int, WorkerHandle] = {}
        self.free_phys: List[int] = []
        self.capacity = 0
        self.control = None
        self._wake_r = self._wake_w = -1
        self._sigq: deque = deque()
        self._chld = False
        self._got_int = False
        self._requests: deque = deque()          # policy events queued from API calls / control
        self._exit: Optional[int] = None
        self._next_tick = 0.0
        self._old_handlers: Dict[int, object] = {}
        self._old_wakeup = -1
        self.baseline_fds: List[int] = []
        self.prepared = False
        self.closed = False
        self.started_at = time.monotonic()
        self.target = settings.app
        self.rng = random.Random()

    # ---- setup (before any fork) ---------------------------------------------------
    def prepare(self) -> None:
        """Loads the backend, checks the app, binds. Raises StartupError (nothing forked)."""
        if self.prepared:
            return
        cfg = self.cfg
        self.baseline_fds = [int(x) for x in os.listdir("/proc/self/fd")]
        import pyfork.backend
        try:
            self.backend = pyfork.backend.load(cfg.backend)
        except (ImportError, ValueError) as e:
            raise StartupError(str(e).splitlines()[0]) from None
        self._check_app()
        try:
            self._bind()
            self._make_dispatcher()
            if cfg.control:
                from pyfork.control import ControlServer
                try:
                    self.control = ControlServer(cfg.control, self)
                except OSError as e:
                    raise StartupError(f"cannot create control socket {cfg.control}: {e}") from None
        except BaseException:
            self._teardown()
            raise
        self.prepared = True

    def _check_app(self) -> None:
        cfg = self.cfg
        app = cfg.app
        if isinstance(app, str):
            from pyfork import applib
            try:
                app = applib.validate_app(app)
            except applib.AppImportError as e:
                raise StartupError(str(e)) from None
        try:
            import pyfork.serve
        except ImportError:  # interfaces not installed: the worker reports it
            return
        try:
            pyfork.serve.resolve(app, cfg.interface)
        except ImportError as e:
            raise StartupError(f"interface {cfg.interface!r} is not available: {e}") from None
        except ValueError as e:
            raise StartupError(str(e).splitlines()[0]) from None

    def _listen(self, addr: BindAddr, reuseport: bool = False, port: Optional[int] = None) -> int:
        b = self.backend
        if addr.kind == "tcp":
            return b.listen_tcp(addr.host, addr.port if port is None else port, 2048, reuseport)
        if addr.kind == "unix":
            return b.listen_unix(addr.path, 2048)
        return b.adopt_listener(addr.fd)

    def _bind(self) -> None:
        reuse = self.cfg.policy == "reuseport"
        for addr in self.cfg.bind:
            try:
                fd = self._listen(addr, reuseport=reuse)
            except (OSError, ValueError) as e:
                raise StartupError(f"cannot bind {addr.text}: {e}") from None
            self.listeners.append((addr, fd, addr.kind == "fd"))
        if reuse:
            # slot 0 uses the listeners bound above; their real ports (0 = any) are
            # what the other slots bind to.
            self.reuse_ports = [_bound_port(fd) for _, fd, _ in self.listeners]
            self.slot_listeners[0] = [fd for _, fd, _ in self.listeners]

    def _make_dispatcher(self) -> None:
        cfg = self.cfg
        # Room for every worker plus one replacement each and old workers still
        # draining after a reload or scale-down (and TTIN headroom).
        self.capacity = min(4096, max(16, 4 * cfg.workers + 8))
        disp_policy = cfg.policy if cfg.policy in ("rr", "least") else "rr"
        self.disp = self.backend.Dispatcher(self.capacity, policy=disp_policy, max_watch=64)
        from pyfork.scoreboard import Scoreboard
        self.board = Scoreboard(self.disp.scoreboard, self.capacity)
        self.free_phys = list(range(self.capacity - 1, -1, -1))
        if cfg.policy in ("rr", "least"):
            for _, fd, _ in self.listeners:
                self.disp.add_listener(fd)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.disp.watch(self._wake_r, TAG_WAKEUP)

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> int:
        import threading
        if threading.current_thread() is not threading.main_thread():
            log.error("Cluster.run() must be called from the main thread (it installs signal handlers)")
            self._teardown()
            return EXIT_STARTUP
        if not self.prepared:
            try:
                self.prepare()
            except StartupError as e:
                log.error("%s", e)
                return EXIT_STARTUP
        cfg = self.cfg
        try:
            self._install_signals()
            self.policy = P.Lifecycle(min_uptime=cfg.min_uptime, max_restarts=cfg.max_restarts,
                                      timeout=cfg.timeout, graceful_timeout=cfg.graceful_timeout,
                                      ready_timeout=cfg.ready_timeout,
                                      max_workers=max(1, (self.capacity - 8) // 2))
            urls = ", ".join(_url(a, fd) for a, fd, _ in self.listeners)
            log.info("Listening at %s (policy %s, backend %s, %d workers)", urls, cfg.policy,
                     self.backend.BACKEND, cfg.workers)
            if self.control is not None:
                log.info("control socket at %s", cfg.control)
            self._feed(P.Start(cfg.workers))
            while self._exit is None:
                self._loop_once()
            return self._exit
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                log.error("interrupted; killing workers")
            else:
                log.exception("internal error in the primary; killing workers")
            self._kill_all_now()
            return EXIT_INTERNAL
        finally:
            self._teardown()

    def _loop_once(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, self._next_tick - now)
        dl = self.policy.next_deadline(now)
        if dl is not None:
            timeout = min(timeout, max(0.0, dl - now))
        if self._sigq or self._chld or self._requests:
            timeout = 0.0
        events = self.disp.run(min(timeout, TICK))
        for ev in events:
            if ev.kind == "watch":
                if ev.tag == TAG_WAKEUP:
                    self._drain_wakeup()
                elif self.control is not None:
                    self.control.on_readable(ev.tag)
            elif ev.kind == "message":
                self._on_messages(ev.slot)
            elif ev.kind == "hangup":
                self._chld = True       # a worker closed its channel: it is exiting
            elif ev.kind == "drained":
                self._feed(P.Drained())
        self._handle_signals()
        while self._requests:
            self._feed(self._requests.popleft())
        if self._chld:
            self._chld = False
            self.reap_workers()
        now = time.monotonic()
        if now >= self._next_tick or (dl is not None and now >= dl):
            self._next_tick = now + TICK
            self.reap_workers()      # belt and braces: a lost SIGCHLD never strands a slot
            self._feed(P.Tick(self._beats()))
            if self.control is not None:
                self.control.expire(now)

    def _beats(self) -> Dict[int, float]:
        out = {}
        for wid, p in self.procs.items():
            ns = p.board.heartbeat_ns
            if ns:
                out[wid] = ns / 1e9
        return out

    def _feed(self, event) -> None:
        """Gives an event to the policy and carries out the actions (which may
        produce more events, e.g. a failed fork)."""
        todo = deque([event])
        while todo:
            ev = todo.popleft()
            for act in self.policy.handle(ev, time.monotonic()):
                more = self._act(act)
                if more is not None:
                    todo.append(more)

    def _act(self, act):
        if isinstance(act, P.Log):
            getattr(log, act.level)("%s", act.message)
        elif isinstance(act, P.Spawn):
            return self.spawn_worker(act.wid, act.slot, act.generation)
        elif isinstance(act, P.Activate):
            p = self.procs.get(act.wid)
            if p is not None:
                self.disp.set_ready(p.phys)
                p.handle.state = P.READY
                self._emit("ready", p.handle)
        elif isinstance(act, P.Drain):
            self._drain_worker(act.wid)
        elif isinstance(act, P.Kill):
            self.kill_worker(act.wid, act.sig)
        elif isinstance(act, P.StopAccepting):
            if self.cfg.policy in ("rr", "least"):
                self.disp.stop_accepting()
            else:
                # workers accept for themselves: each takes its backlog on DRAIN
                return P.Drained()
        elif isinstance(act, P.ReleaseSlot):
            self._close_slot_listeners(act.slot)
        elif isinstance(act, P.Exit):
            self._exit = act.code
        return None

    # ---- workers -----------------------------------------------------------------------
    def _listeners_for(self, slot: int) -> List[int]:
        pol = self.cfg.policy
        if pol == "shared":
            return [fd for _, fd, _ in self.listeners]
        if pol == "reuseport":
            fds = self.slot_listeners.get(slot)
            if fds is None:
                fds = []
                try:
                    for (addr, _, _), port in zip(self.listeners, self.reuse_ports):
                        fds.append(self._listen(addr, reuseport=True, port=port))
                except OSError:
                    for fd in fds:
                        os.close(fd)
                    raise
                self.slot_listeners[slot] = fds
            return fds
        return []

    def _close_slot_listeners(self, slot: int) -> None:
        """reuseport: a slot with no worker must not keep a listener in the SO_REUSEPORT
        group, or the kernel keeps hashing connections to a socket nobody accepts from
        (a respawn later creates a new one)."""
        fds = self.slot_listeners.pop(slot, [])
        for fd in fds:
            os.close(fd)
        if fds:
            self.listeners = [(a, -1 if fd in fds else fd, ad) for a, fd, ad in self.listeners]

    def spawn_worker(self, wid: int, slot: int, generation: int):
        """Forks worker ``wid`` into logical ``slot``. Returns a policy event on failure."""
        if not self.free_phys:
            log.error("worker %d: no free dispatcher slot (capacity %d)", wid, self.capacity)
            return P.Exited(wid)
        try:
            listeners = self._listeners_for(slot)
        except OSError as e:
            log.error("worker %d: cannot create its SO_REUSEPORT listener: %s", wid, e)
            return P.Exited(wid)
        try:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:   # EMFILE & co: a failed spawn, counted like a crash before READY
            log.error("worker %d: cannot create its channel: %s", wid, e)
            return P.Exited(wid)
        chan, peer = a.detach(), b.detach()
        phys = self.free_phys.pop()
        try:
            self.disp.add_worker(phys, chan, peer)
        except OSError as e:   # on error the dispatcher owns nothing
            os.close(chan)
            os.close(peer)
            self.free_phys.append(phys)
            log.error("worker %d: add_worker failed: %s", wid, e)
            return P.Exited(wid)
        handle = WorkerHandle(self, wid, slot)
        proc = _Proc(wid, slot, phys, chan, handle, self.board.slot(phys))
        cfg = self.cfg
        max_req = cfg.max_requests + self.rng.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        spec = W.WorkerSpec(
            wid=wid, slot=slot, chan=peer, backend=self.backend, board_slot=proc.board, policy=cfg.policy,
            listeners=list(listeners), max_requests=max_req, primary_pid=os.getpid(),
            primary_signals=HANDLED_SIGNALS, baseline_fds=self.baseline_fds,
            primary_fds=[fd for _, fd, _ in self.listeners if fd >= 0]
            + [fd for fds in self.slot_listeners.values() for fd in fds],
            target=self.target, interface=cfg.interface, post_fork=self.post_fork)
        W._flush()
        try:
            pid = os.fork()
        except OSError as e:
            log.error("worker %d: fork failed: %s", wid, e)
            self.disp.remove_worker(phys)
            self.free_phys.append(phys)
            return P.Exited(wid)
        if pid == 0:  # pragma: no cover - child
            W.main(spec)
        proc.pid = handle.pid = pid
        self.procs[wid] = proc
        self.by_pid[pid] = wid
        self.by_phys[phys] = wid
        self.handles[wid] = handle
        self.policy.handle(P.Forked(wid, pid), time.monotonic())
        self._emit("fork", handle)
        return None

    def reap_workers(self) -> None:
        """waitpid(WNOHANG) every worker until none is left to reap. Only our own
        children are waited for, so the app's subprocesses keep their statuses."""
        for pid in list(self.by_pid):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            except InterruptedError:
                continue
            if got == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            sig = -code if code < 0 else None
            self._worker_exited(pid, None if sig else code, sig)

    def _worker_exited(self, pid: int, code, sig) -> None:
        wid = self.by_pid.pop(pid)
        p = self.procs.pop(wid)
        self.by_phys.pop(p.phys, None)
        try:
            n = self.disp.remove_worker(p.phys)
        except OSError as e:
            log.error("worker %d: remove_worker failed: %s", wid, e)
            n = 0
        self.free_phys.append(p.phys)
        if n:
            log.warning("worker %d (pid %d): recovered %d queued connection(s) and re-dispatched them", wid, pid, n)
        self._feed(P.Exited(wid, code, sig))
        h = self.handles.pop(wid, None)
        if h is not None:
            h.state = P.EXITED
            if not h._disconnected:
                h._disconnected = True
                self._emit("disconnect", h)
            self._emit("exit", h, code, sig)

    def kill_worker(self, wid: int, sig: int) -> None:
        p = self.procs.get(wid)
        if p is None or p.pid is None:
            return
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass

    def _drain_worker(self, wid: int) -> None:
        p = self.procs.get(wid)
        if p is None:
            return
        try:
            self.disp.set_draining(p.phys)
        except (OSError, ValueError):
            pass
        p.handle.state = P.DRAINING
        try:
            self.backend.send_msg(p.chan, self.backend.MSG_DRAIN)
        except BlockingIOError:
            # channel full: SIGTERM makes the worker drain by itself
            self.kill_worker(wid, signal.SIGTERM)
        except OSError:
            pass
        if not p.handle._disconnected:
            p.handle._disconnected = True
            self._emit("disconnect", p.handle)

    def _kill_all_now(self) -> None:
        for p in list(self.procs.values()):
            self.kill_worker(p.wid, signal.SIGKILL)
        for pid in list(self.by_pid):
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass
            wid = self.by_pid.pop(pid)
            p = self.procs.pop(wid, None)
            if p is not None:
                try:
                    self.disp.remove_worker(p.phys)
                except Exception:
                    pass

    # ---- messages ------------------------------------------------------------------------
    def _on_messages(self, phys: int) -> None:
        wid = self.by_phys.get(phys)
        p = self.procs.get(wid) if wid is not None else None
        if p is None:
            return
        b = self.backend
        for _ in range(MAX_MSGS_PER_EVENT):
            try:
                msg = b.recv_msg(p.chan, 0)
            except (BlockingIOError, InterruptedError):
                return
            except BrokenPipeError:
                self._chld = True
                return
            except OSError as e:
                log.warning("worker %d: dropped a malformed message: %s", wid, e)
                continue
            for fd in msg.fds:
                os.close(fd)
            try:
                self._on_message(p, msg)
            except Exception:
                log.exception("worker %d: error handling a message of type %d", wid, msg.type)
            if wid not in self.procs:
                return

    def _on_message(self, p: _Proc, msg) -> None:
        b = self.backend
        if msg.type == b.MSG_READY:
            self._feed(P.Ready(p.wid))
        elif msg.type == b.MSG_USER:
            try:
                obj = json.loads(msg.payload)
            except ValueError:
                log.warning("worker %d: dropped a message that is not JSON (%d bytes)", p.wid, len(msg.payload))
                return
            self._emit("message", p.handle, obj)
        elif msg.type == b.MSG_CTL:
            try:
                obj = json.loads(msg.payload)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                log.warning("worker %d: dropped a malformed control message", p.wid)
            elif obj.get("online"):
                self._emit("online", p.handle)
            elif "recycle" in obj:
                self._feed(P.RecycleRequested(p.wid))
            elif obj.get("drain"):
                self._feed(P.Leaving(p.wid))
            else:
                log.warning("worker %d: unknown control message %.80r", p.wid, obj)
        else:
            log.warning("worker %d: dropped a message of unexpected type %d", p.wid, msg.type)

    def send_to(self, wid: int, obj) -> bool:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        if len(payload) > self.backend.MAX_PAYLOAD:
            raise ValueError(f"message too large: {len(payload)} bytes > {self.backend.MAX_PAYLOAD}")
        p = self.procs.get(wid)
        if p is None:
            log.warning("worker %d is gone; message dropped", wid)
            return False
        try:
            self.backend.send_msg(p.chan, self.backend.MSG_USER, 0, payload)
            return True
        except BlockingIOError:
            log.warning("worker %d: channel full; message dropped", wid)
        except OSError as e:
            log.warning("worker %d: cannot send message: %s", wid, e)
        return False

    def broadcast(self, obj) -> int:
        n = 0
        for wid, p in list(self.procs.items()):
            if p.handle.state == P.READY and self.send_to(wid, obj):
                n += 1
        return n

    # ---- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # Only records (STYLE.md principle 8); the loop does the work.
        if signum == signal.SIGCHLD:
            self._chld = True
        elif len(self._sigq) < 32:
            self._sigq.append(signum)

    def _install_signals(self) -> None:
        for sig in HANDLED_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _restore_signals(self) -> None:
        if not self._old_handlers:
            return
        try:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
        except (ValueError, OSError):
            signal.set_wakeup_fd(-1)
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h if h is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _handle_signals(self) -> None:
        while self._sigq:
            sig = self._sigq.popleft()
            name = SIG_NAMES.get(sig, str(sig))
            handler = getattr(self, "handle_" + name[3:].lower(), None)
            if handler is not None:
                handler()

    def handle_term(self) -> None:
        log.info("SIGTERM: graceful stop")
        self._feed(P.Stop(graceful=True))

    def handle_int(self) -> None:
        if self._got_int:
            log.info("second SIGINT: stopping at once")
            self._feed(P.Stop(graceful=False))
        else:
            self._got_int = True
            log.info("SIGINT: graceful stop (interrupt again to stop at once)")
            self._feed(P.Stop(graceful=True))

    def handle_quit(self) -> None:
        log.info("SIGQUIT: stopping at once")
        self._feed(P.Stop(graceful=False))

    def handle_hup(self) -> None:
        log.info("SIGHUP: rolling restart")
        self._feed(P.Reload())

    def handle_ttin(self) -> None:
        self._feed(P.Scale(len(self.policy.slots) + 1))

    def handle_ttou(self) -> None:
        self._feed(P.Scale(len(self.policy.slots) - 1))

    def handle_chld(self) -> None:
        self.reap_workers()

    # ---- requests from the API / control socket (loop thread or another thread) -------------
    def request(self, event) -> None:
        self._requests.append(event)
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def status(self) -> dict:
        now = time.monotonic()
        rows = []
        pol = self.policy
        for wid in sorted(self.procs):
            p = self.procs[wid]
            rec = pol.workers.get(wid) if pol else None
            slot = pol.slots.get(p.slot) if pol else None
            rows.append({
                "id": wid, "pid": p.pid, "slot": p.slot,
                "state": rec.state if rec else p.handle.state,
                "uptime": round(now - p.handle.started, 3),
                "handled": p.board.handled, "active": p.board.active,
                "restarts": slot.restarts if slot else 0,
                "generation": rec.generation if rec else 0,
            })
        slots = []
        if pol:
            for s in sorted(pol.slots.values(), key=lambda s: s.index):
                slots.append({"slot": s.index, "state": s.state, "crashes": s.crashes, "restarts": s.restarts})
        return {"pid": os.getpid(), "policy": self.cfg.policy, "backend": self.backend.BACKEND,
                "workers_wanted": len(pol.slots) if pol else 0, "stopping": bool(pol and pol.stopping),
                "reloading": bool(pol and pol.reloading), "uptime": round(now - self.started_at, 3),
                "workers": rows, "slots": slots}

    # ---- events for the Cluster API -------------------------------------------------------
    def _emit(self, name: str, *args) -> None:
        if self._emit_cb is None:
            return
        try:
            self._emit_cb(name, *args)
        except Exception:
            log.exception("cluster %r callback failed", name)

    # ---- teardown ----------------------------------------------------------------------
    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._restore_signals()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.board is not None:
            self.board.release()
            self.board = None
        for p in self.procs.values():
            p.board = None
        if self.disp is not None:
            self.disp.close()
            self.disp = None
        for slot in list(self.slot_listeners):
            self._close_slot_listeners(slot)
        for addr, fd, adopted in self.listeners:
            if adopted or fd < 0:
                continue   # fd://N stays the caller's; -1 = closed with its reuseport slot
            os.close(fd)
            if addr.kind == "unix":
                try:
                    os.unlink(addr.path)
                except OSError:
                    pass
        self.listeners = []
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
