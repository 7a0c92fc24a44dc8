"""The primary: binds, forks, reaps, and runs the one loop that everything else hangs off.

Theory of operation (gunicorn's arbiter + CPython's forkserver): signal
handlers only record the signal; ``signal.set_wakeup_fd`` writes a byte to a
pipe that the dispatcher watches, so the dispatcher's ``run()`` -- the C accept
loop with the GIL released, or its pure-Python twin -- is the only blocking
call. When it returns the loop handles, in order: dispatcher events (worker
messages, the control socket, "drained"), recorded signals, reaping, and a
``Tick`` for timers. Every decision (respawn, backoff, drain, kill, exit) comes
from ``pyfork.primary.lifecycle.Lifecycle`` as actions; this module only carries them out:
``spawn_worker``, ``reap_workers``, ``kill_worker``, and the ``handle_<signal>``
methods. Around it: pyfork.primary.listeners binds the addresses, pyfork.primary.wakeup is the
signal inbox, pyfork.primary.messages reads and writes worker messages, and
pyfork.primary.eventstream carries what happened (fork, ready, exit, reload, ...) to
subscribers and JSON-lines readers. Each of them is given what it needs; none reaches
into the arbiter.

Ownership: listeners, the wakeup pipe and the control socket belong to the
arbiter; worker channels (both ends) belong to the dispatcher from
``add_worker`` on, which is called *before* fork so a worker's queued
connections can be recovered by ``remove_worker`` if it dies.

Policies ``shared`` and ``reuseport`` have no accept loop in the primary: the
workers accept (on the sockets pyfork.primary.listeners gives each slot), the dispatcher
still carries channels, watched fds and the idle connections workers park.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import time
from collections import deque
from typing import Callable, Dict, List, Optional

from pyfork.primary import lifecycle as P
from pyfork.primary import sched
from pyfork.primary.lifecycle.events import Note
from pyfork.worker import boot as worker_boot
from pyfork.worker.runtime import flush_output
from pyfork.config import Settings
from pyfork.primary.eventstream import EventStream, open_sink
from pyfork.primary.listeners import BindError, Listeners
from pyfork.primary.messages import WorkerChannels, WorkerHandle
from pyfork.primary.recycling import Recycler
from pyfork.primary import fdlimit, hygiene
from pyfork.primary.hooks import Server, ServerHooks
from pyfork.primary.systemd import Notifier
from pyfork.primary.procstat import cpu_and_rss
from pyfork.primary.tally import Tally
from pyfork.primary.wakeup import Wakeup

log = logging.getLogger("pyfork.arbiter")
# Parked idle connections at most (--keep-alive, every policy; csrc/park.c): 1.5 MiB of table.
PARK_TABLE_MAX = 65536

EXIT_OK, EXIT_INTERNAL, EXIT_STARTUP, EXIT_GAVE_UP = 0, 1, 2, 3
TAG_WAKEUP = 0                           # the control socket uses tags >= 1 (pyfork.primary.control)
PULL_ENV = "PYFORK_PULL"                 # "0": no pull (see _make_dispatcher)
TICK = 1.0                               # heartbeat check period (the worker ticks every 1 s)
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1)
SIG_NAMES = {s: signal.Signals(s).name for s in HANDLED_SIGNALS}


class StartupError(Exception):
    """Anything that must stop the primary before the first fork (exit code 2)."""


class _Proc:
    __slots__ = ("wid", "slot", "phys", "chan", "pid", "handle", "board", "ready", "asked", "recycling", "recycled")

    def __init__(self, wid, slot, phys, chan, handle, board):
        self.wid, self.slot, self.phys, self.chan, self.handle, self.board = wid, slot, phys, chan, handle, board
        self.pid = None
        self.ready = False          # it reached READY once
        self.asked = None           # why the primary asked it to go: "drained", "hung", "stop", ...
        self.recycling = None       # a replacement is starting because of: "max_requests", "memory", "lifetime"
        self.recycled = None        # ... and it is READY: this worker drains for that cause


class Arbiter:
    def __init__(self, settings: Settings, *, events: Optional[EventStream] = None,
                 events_target: Optional[str] = None, post_fork: Callable = None,
                 hooks: Optional[Dict[str, Callable]] = None):
        """``events``: the stream to emit on (pyfork.Cluster passes its own); ``events_target``:
        also write every event as a JSON line to ``fd://N`` or a file path; ``hooks``: server
        hooks by name (pyfork.configfile.HOOKS, run by pyfork.primary.hooks)."""
        self.cfg = settings
        self.events = events if events is not None else EventStream()
        self.events_target = events_target
        self.post_fork = post_fork
        self.backend = None
        self.channels: Optional[WorkerChannels] = None
        self.disp = None
        self.board = None
        self.policy: Optional[P.Lifecycle] = None
        self.listeners: Optional[Listeners] = None
        self.procs: Dict[int, _Proc] = {}
        self.by_pid: Dict[int, int] = {}
        self.by_phys: Dict[int, int] = {}
        self.handles: Dict[int, WorkerHandle] = {}
        self.free_phys: List[int] = []
        self.capacity = 0
        self.control = None
        self.metrics = None                      # pyfork.primary.metrics.MetricsServer (--metrics)
        self.tally = Tally()                     # counters that outlive workers (status, metrics)
        self.events.subscribe(self.tally.on_event)
        self.wake: Optional[Wakeup] = None
        self._got_int = False
        self._stop_at = None        # --drain-delay: when the graceful stop TERM asked for begins
        self._requests: deque = deque()          # policy events queued from API calls / control
        self._exit: Optional[int] = None
        self._next_tick = 0.0
        self.baseline_fds: List[int] = []
        self.prepared = False
        self.closed = False
        self.started_at = time.monotonic()
        self.target = settings.app
        self.rng = random.Random()
        self.pid_file: Optional[hygiene.PidFile] = None
        self.notifier: Optional[Notifier] = None
        self.nofile: Optional[fdlimit.NoFile] = None     # RLIMIT_NOFILE as raised by prepare()
        hooks = dict(hooks or {})
        if post_fork is None:
            self.post_fork = hooks.get("post_fork")
        self.worker_abort = hooks.get("worker_abort")
        self.hooks = ServerHooks(hooks, Server(settings, self.status, self._urls))
        self.events.subscribe(self.hooks.on_event)
        self.recycler = Recycler(max_memory_mb=settings.max_worker_memory,
                                 max_lifetime=settings.max_worker_lifetime,
                                 lifetime_jitter=settings.max_worker_lifetime_jitter, rng=self.rng)

    # ---- setup (before any fork) ---------------------------------------------------
    def prepare(self) -> None:
        """Loads the backend, checks the app, binds. Raises StartupError (nothing forked)."""
        if self.prepared:
            return
        cfg = self.cfg
        try:
            if cfg.chdir is not None:
                os.chdir(cfg.chdir)
        except OSError as e:
            raise StartupError(f"cannot change to directory {cfg.chdir}: {e.strerror}") from None
        hygiene.set_umask(cfg.umask)
        try:
            self.hooks.starting()
        except Exception as e:
            import traceback
            log.error("on_starting hook failed:\n%s", traceback.format_exc().rstrip())
            raise StartupError(f"on_starting hook failed: {type(e).__name__}: {e}") from None
        self.baseline_fds = [int(x) for x in os.listdir("/proc/self/fd")]
        self.nofile = fdlimit.raise_nofile()     # before binding: workers inherit it
        import pyfork.backend
        try:
            self.backend = pyfork.backend.load(cfg.backend)
        except (ImportError, ValueError) as e:
            raise StartupError(str(e).splitlines()[0]) from None
        self._check_app()
        try:
            self._configure_access_log()
            self._configure_conn_limits()
            self._configure_edge()
            if self.events_target:
                try:
                    self.events.add_sink(open_sink(self.events_target))
                except (OSError, ValueError) as e:
                    raise StartupError(f"cannot open the events target {self.events_target}: {e}") from None
            self._bind()
            self._make_dispatcher()
            if cfg.control:
                from pyfork.primary.control import ControlServer
                try:
                    self.control = ControlServer(cfg.control, self)
                except OSError as e:
                    raise StartupError(f"cannot create control socket {cfg.control}: {e}") from None
            if cfg.pid_file:
                self.pid_file = hygiene.PidFile(cfg.pid_file)
                try:
                    self.pid_file.create()
                except hygiene.PidFileError as e:
                    self.pid_file = None
                    raise StartupError(str(e)) from None
            self.notifier = Notifier(self.status)
            self.events.subscribe(self.notifier.on_event)
            if getattr(cfg, "metrics", None):
                from pyfork.primary.metrics import MetricsServer
                try:
                    self.metrics = MetricsServer(cfg.metrics, self.disp, self.status)
                except ImportError as e:
                    raise StartupError(str(e)) from None
                except OSError as e:
                    raise StartupError(f"cannot listen for --metrics at {cfg.metrics}: "
                                       f"{e.strerror or e}") from None
        except BaseException:
            self._teardown()
            raise
        self.prepared = True

    def _urls(self) -> List[str]:
        return self.listeners.url_list() if self.listeners is not None and not self.closed else []

    def _app_name(self) -> str:
        app = self.cfg.app
        return app if isinstance(app, str) else getattr(app, "__qualname__", type(app).__name__)

    def _configure_access_log(self) -> None:
        """--access-log: checked here, opened by each worker (pyfork.serve.accesslog)."""
        from pyfork.serve import accesslog
        target = getattr(self.cfg, "access_log", None)
        try:
            if target:
                accesslog.check_target(target)
            accesslog.configure(target, getattr(self.cfg, "access_log_format", None))
        except OSError as e:
            raise StartupError(f"cannot open the access log {target}: {e.strerror or e}") from None
        except ValueError as e:
            raise StartupError(f"bad --access-log-format: {e}") from None

    def _configure_conn_limits(self) -> None:
        """--limit-concurrency and --keep-alive: inherited by every worker's interface."""
        from pyfork.serve import connlimits
        connlimits.configure(self.cfg.limit_concurrency, self.cfg.keep_alive)

    def limits(self) -> dict:
        """The limits in force (status, metrics, the start event)."""
        cfg = self.cfg
        return {"limit_concurrency": cfg.limit_concurrency, "backlog": cfg.backlog,
                "keep_alive": cfg.keep_alive,
                "nofile": self.nofile.as_dict() if self.nofile is not None else None}

    def _configure_edge(self) -> None:
        """PROXY protocol and forwarded-header trust, inherited by every worker (pyfork.serve.edge)."""
        from pyfork.serve import edge
        edge.configure(edge.EdgeConfig.from_settings(self.cfg))

    def _check_app(self) -> None:
        from pyfork import applib
        try:
            iface = applib.check_app(self.cfg.app, self.cfg.interface)
        except applib.AppImportError as e:
            raise StartupError(str(e)) from None
        if iface is not None:
            worker_boot.preload(iface)     # what its workers import, shared copy-on-write

    def _bind(self) -> None:
        self.listeners = Listeners(self.backend, self.cfg.policy, self.cfg.backlog,
                                   pull=os.environ.get(PULL_ENV, "1") != "0")
        try:
            self.listeners.bind(self.cfg.bind)
        except BindError as e:
            raise StartupError(str(e)) from None

    def _make_dispatcher(self) -> None:
        cfg = self.cfg
        # Room for every worker plus one replacement each and old workers still
        # draining after a reload or scale-down (and TTIN headroom). A slot costs
        # one 64-byte scoreboard line and the C loop only scans up to the highest
        # slot in use, so a floor of 256 (TTIN up to 124 workers) is free.
        self.capacity = min(4096, max(256, 4 * cfg.workers + 8))
        disp_policy = cfg.policy if cfg.policy in ("rr", "least") else "rr"
        self.disp = self.backend.Dispatcher(self.capacity, policy=disp_policy, max_watch=64)
        if cfg.keep_alive > 0:
            # Idle kept-alive connections a stuck worker hands back wait here (csrc/park.c)
            # for at most --keep-alive, as they would have in the worker.
            self.disp.set_parking(self._park_table_size(), cfg.keep_alive)
        from pyfork.scoreboard import Scoreboard
        self.board = Scoreboard(self.disp.scoreboard, self.capacity)
        self.free_phys = list(range(self.capacity - 1, -1, -1))
        if cfg.policy in ("rr", "least"):
            for fd in self.listeners.fds():
                self.disp.add_listener(fd)
            # When no worker can start a new connection, leave it in the kernel's queue for
            # the first worker that frees room (they inherit the listeners): no accept and
            # sendmsg here per connection under a saturating load (csrc/dispatch_send.c).
            # PYFORK_PULL=0 turns it off (A/B measurements), and the workers then get no
            # listeners (Listeners.for_slot).
            if self.listeners.pull:
                self.disp.set_pull(True)
        self.wake = Wakeup()
        self.disp.watch(self.wake.r, TAG_WAKEUP)
        self.channels = WorkerChannels(self.backend, self.events, self._feed)

    def _park_table_size(self) -> int:
        """Parked connections the primary may hold: half its fd limit (the other half is for
        its own fds: two per worker channel, listeners, the pending ring), at most
        PARK_TABLE_MAX (24 bytes an entry). Beyond it a handed-back connection goes to a
        worker at once (csrc/park.c)."""
        soft = self.nofile.soft if self.nofile is not None else 1024
        return min(PARK_TABLE_MAX, soft // 2)

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
            sched.primary_batch()
        except ValueError as e:
            log.error("%s", e)
            self._teardown()
            return EXIT_STARTUP
        try:
            self.wake.install(HANDLED_SIGNALS)
            hygiene.set_title(f"pyfork: primary {self._app_name()}")
            self.policy = P.Lifecycle(min_uptime=cfg.min_uptime, max_restarts=cfg.max_restarts,
                                      timeout=cfg.timeout, graceful_timeout=cfg.graceful_timeout,
                                      ready_timeout=cfg.ready_timeout, give_up_cooldown=cfg.give_up_cooldown,
                                      max_workers=max(1, (self.capacity - 8) // 2))
            urls = self.listeners.urls()
            if cfg.certfile:     # the workers speak TLS on every listener
                urls = urls.replace("http://", "https://")
            log.info("Listening at %s (policy %s, backend %s, %d workers)", urls,
                     cfg.policy, self.backend.BACKEND, cfg.workers)
            nofile = self.nofile
            if nofile is not None and nofile.soft > nofile.before:
                log.info("raised the open file limit (RLIMIT_NOFILE) from %d to %d", nofile.before, nofile.soft)
            elif nofile is not None:
                log.info("open file limit (RLIMIT_NOFILE) %d (hard limit %d)", nofile.soft, nofile.hard)
            if self.control is not None:
                log.info("control socket at %s", cfg.control)
            if self.metrics is not None:
                log.info("metrics at %s", self.metrics.url())
            self.events.emit("start", pid=os.getpid(), urls=self.listeners.url_list(), policy=cfg.policy,
                             backend=self.backend.BACKEND, workers=cfg.workers, control=cfg.control,
                             metrics=self.metrics.url() if self.metrics is not None else None,
                             **self.limits())
            self._feed(P.Start(cfg.workers))
            while self._exit is None:
                self._loop_once()
            code = self._exit
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                log.error("interrupted; killing workers")
            else:
                log.exception("internal error in the primary; killing workers")
            self._kill_all_now()
            code = EXIT_INTERNAL
        try:
            self.events.emit("shutdown", code=code, events_dropped=self.events.dropped)
        finally:
            self._teardown()
        return code

    def _loop_once(self) -> None:
        now = time.monotonic()
        timeout = max(0.0, self._next_tick - now)
        dl = self.policy.next_deadline(now)
        if dl is not None:
            timeout = min(timeout, max(0.0, dl - now))
        ping = self.notifier.next_due() if self.notifier is not None else None
        if ping is not None:
            timeout = min(timeout, max(0.0, ping - now))
        if self._stop_at is not None:
            timeout = min(timeout, max(0.0, self._stop_at - now))
        wake = self.wake
        if wake.signals or wake.chld or self._requests:
            timeout = 0.0
        events = self.disp.run(min(timeout, TICK))
        for ev in events:
            if ev.kind == "watch":
                if ev.tag == TAG_WAKEUP:
                    wake.drain()
                elif self.metrics is not None and self.metrics.owns(ev.tag):
                    self.metrics.on_readable(ev.tag)
                elif self.control is not None:
                    self.control.on_readable(ev.tag)
            elif ev.kind == "message":
                self._read_messages(ev.slot)
            elif ev.kind == "hangup":
                wake.chld = True        # a worker closed its channel: it is exiting
            elif ev.kind == "drained":
                self._feed(P.Drained())
        self._handle_signals()
        if self._stop_at is not None and time.monotonic() >= self._stop_at:
            self._stop_at = None
            self._feed(P.Stop(graceful=True))
        while self._requests:
            self._feed(self._requests.popleft())
        if wake.chld:
            wake.chld = False
            self.reap_workers()
        now = time.monotonic()
        if now >= self._next_tick or (dl is not None and now >= dl):
            self._next_tick = now + TICK
            self.reap_workers()      # belt and braces: a lost SIGCHLD never strands a slot
            self._feed(P.Tick(self._beats()))
            self._check_recycling(now)
            if self.control is not None:
                self.control.expire(now)
            if self.metrics is not None:
                self.metrics.expire(now)
        if self.notifier is not None:
            self.notifier.tick(now)  # WATCHDOG=1: only a loop that gets here pings
        self.events.flush()          # what a slow events reader could not take before

    def _check_recycling(self, now: float) -> None:
        """--max-worker-memory / --max-worker-lifetime: pyfork.primary.recycling picks the
        workers, the lifecycle replaces them (replacement READY first, then drain)."""
        if not self.recycler.enabled:
            return
        serving = []
        for wid, p in self.procs.items():
            slot = self.policy.slots.get(p.slot)
            if p.handle.state == P.READY and slot is not None and slot.worker == wid:
                serving.append((wid, p.pid, p.slot))
        for wid, cause, info in self.recycler.check(serving, now):
            self._feed(P.RecycleRequested(wid, cause, info))

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

    def _close_listeners(self) -> None:
        """At a stop, once the dispatcher has taken the backlog: close the listeners (see
        lifecycle.CloseListeners). Under shared/reuseport the workers' copies keep a socket
        open until each has taken its own backlog (worker runtime, _final_sweep). Adopted
        fd:// and systemd sockets stay open: their owner keeps them, and connections
        queued there wait for the next primary, as socket activation means them to."""
        if self.listeners is None or not self.listeners.fds():
            return                  # closed already (a stop that escalated)
        urls, kept = self.listeners.url_list(), self.listeners.adopted_urls()
        if self.disp is not None and self.cfg.policy in ("rr", "least"):
            # No more pulls: a worker woken by the shut-down listener sees the word off and
            # stops watching it (a unix listener stays readable, with accept() at EAGAIN).
            self.disp.set_pull(False)
            for fd in self.listeners.fds():
                self.disp.remove_listener(fd)
        self.listeners.close()
        self.events.emit("listeners_closed", urls=[u for u in urls if u not in kept], kept=kept)

    def _act(self, act):
        if isinstance(act, P.Log):
            getattr(log, act.level)("%s", act.message)
        elif isinstance(act, Note):
            self._announce(act)
        elif isinstance(act, P.Spawn):
            return self.spawn_worker(act.wid, act.slot, act.generation)
        elif isinstance(act, P.Activate):
            p = self.procs.get(act.wid)
            if p is not None:
                self.disp.set_ready(p.phys)
                p.handle.state = P.READY
                p.ready = True
                self.events.emit("ready", p.handle, after=round(time.monotonic() - p.handle.started, 6))
        elif isinstance(act, P.Drain):
            self._drain_worker(act.wid)
        elif isinstance(act, P.Kill):
            self.kill_worker(act.wid, act.sig)
        elif isinstance(act, P.StopAccepting):
            # Every policy: DRAINED comes once nothing waits in the dispatcher, parked
            # connections included (shared/reuseport workers take their own backlog on DRAIN).
            self.disp.stop_accepting()
        elif isinstance(act, P.CloseListeners):
            self._close_listeners()
        elif isinstance(act, P.ReleaseSlot):
            self.listeners.release_slot(act.slot)
        elif isinstance(act, P.Exit):
            self._exit = act.code
        return None

    def _announce(self, note: Note) -> None:
        """A lifecycle decision goes out on the event stream; a kill or an immediate stop
        is also remembered as the cause the worker's 'exit' event will carry."""
        p = self.procs.get(note.wid) if note.wid is not None else None
        if note.kind == "kill" and p is not None:
            p.asked = note.data.get("reason")
        elif note.kind == "recycle":
            cause = note.data.get("cause", "max_requests")
            self.recycler.recycled(cause)
            if p is not None:
                p.recycling = cause
        elif note.kind == "replace" and note.data.get("purpose") == "recycle":
            old = self.procs.get(note.data.get("old"))
            if old is not None:
                old.recycled = old.recycling
        elif note.kind == "stop" and not note.data.get("graceful", True):
            for q in self.procs.values():
                if q.asked is None or q.asked == "drained":
                    q.asked = "stop"
        self.events.emit(note.kind, p.handle if p is not None else None, **note.data)

    # ---- workers -----------------------------------------------------------------------
    def spawn_worker(self, wid: int, slot: int, generation: int):
        """Forks worker ``wid`` into logical ``slot``. Returns a policy event on failure."""
        if not self.free_phys:
            log.error("worker %d: no free dispatcher slot (capacity %d)", wid, self.capacity)
            return self._spawn_failed(wid, slot, f"no free dispatcher slot (capacity {self.capacity})")
        try:
            listeners = self.listeners.for_slot(slot)
        except OSError as e:
            log.error("worker %d: cannot create its SO_REUSEPORT listener: %s", wid, e)
            return self._spawn_failed(wid, slot, f"SO_REUSEPORT listener: {e}")
        try:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:   # EMFILE & co: a failed spawn, counted like a crash before READY
            log.error("worker %d: cannot create its channel: %s", wid, e)
            return self._spawn_failed(wid, slot, f"channel: {e}")
        chan, peer = a.detach(), b.detach()
        phys = self.free_phys.pop()
        try:
            self.disp.add_worker(phys, chan, peer)
        except OSError as e:   # on error the dispatcher owns nothing
            os.close(chan)
            os.close(peer)
            self.free_phys.append(phys)
            log.error("worker %d: add_worker failed: %s", wid, e)
            return self._spawn_failed(wid, slot, f"add_worker: {e}")
        handle = WorkerHandle(wid, slot, self.send_to)
        proc = _Proc(wid, slot, phys, chan, handle, self.board.slot(phys))
        self.hooks.pre_fork(handle)
        cfg = self.cfg
        max_req = cfg.max_requests + self.rng.randint(0, cfg.max_requests_jitter) if cfg.max_requests else 0
        spec = worker_boot.WorkerSpec(
            wid=wid, slot=slot, chan=peer, backend=self.backend, board_slot=proc.board, policy=cfg.policy,
            listeners=list(listeners), max_requests=max_req, primary_pid=os.getpid(),
            primary_signals=HANDLED_SIGNALS, baseline_fds=self.baseline_fds,
            primary_fds=self.listeners.primary_fds() + self.events.primary_only_fds(),
            listener_fds=self.listeners.primary_fds(),     # what connections come from (their family)
            target=self.target, interface=cfg.interface, post_fork=self.post_fork,
            worker_abort=self.worker_abort, title=f"pyfork: worker {wid} {self._app_name()}",
            run_as=(cfg.uid, cfg.gid) if cfg.uid is not None or cfg.gid is not None else None)
        flush_output()     # or the child would write the primary's buffered output again
        worker_boot.freeze_before_fork()   # the child's GC leaves the inherited objects alone
        try:
            pid = os.fork()
        except OSError as e:
            log.error("worker %d: fork failed: %s", wid, e)
            self.disp.remove_worker(phys)
            self.free_phys.append(phys)
            return self._spawn_failed(wid, slot, f"fork: {e}")
        if pid == 0:  # pragma: no cover - child
            worker_boot.main(spec)
        proc.pid = handle.pid = pid
        self.procs[wid] = proc
        self.by_pid[pid] = wid
        self.by_phys[phys] = wid
        self.handles[wid] = handle
        self.policy.handle(P.Forked(wid, pid), time.monotonic())
        self.recycler.worker_started(wid, time.monotonic())
        self.events.emit("fork", handle)
        return None

    def _spawn_failed(self, wid: int, slot: int, error: str):
        self.events.emit("spawn_failed", worker=wid, slot=slot, error=error)
        return P.Exited(wid)

    def reap_workers(self) -> None:
        """waitpid(WNOHANG) every worker until none is left to reap. Only our own
        children are waited for, so the app's subprocesses keep their statuses."""
        for pid in list(self.by_pid):
            try:
                # wait4: the rusage gives the CPU time the worker used (folded into its slot)
                got, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                got, status, usage = pid, 0, None
            except InterruptedError:
                continue
            if got == 0:
                continue
            code = os.waitstatus_to_exitcode(status)
            sig = -code if code < 0 else None
            cpu = usage.ru_utime + usage.ru_stime if usage is not None else 0.0
            self._worker_exited(pid, None if sig else code, sig, cpu=cpu)

    def _worker_exited(self, pid: int, code, sig, cpu: float = 0.0) -> None:
        wid = self.by_pid.pop(pid)
        p = self.procs.pop(wid)
        self.by_phys.pop(p.phys, None)
        try:
            n = self.disp.remove_worker(p.phys)
        except OSError as e:
            log.error("worker %d: remove_worker failed: %s", wid, e)
            n = 0
        self.free_phys.append(p.phys)
        self.recycler.worker_gone(wid)
        h = self.handles.pop(wid, None)
        if n:
            log.warning("worker %d (pid %d): recovered %d queued connection(s) and re-dispatched them", wid, pid, n)
            self.events.emit("recovered", h, count=n)
        if h is not None:
            # Node's order: disconnect, then exit; then what the lifecycle decides about
            # the slot (a fork, 'backoff', 'gave_up', ...).
            h.state = P.EXITED
            self._emit_disconnect(h)
            self.events.emit("exit", h, code=code, signal=sig, cause=self._exit_cause(p, code, sig),
                             uptime=round(time.monotonic() - h.started, 6), ready=p.ready,
                             handled=p.board.handled if p.board is not None else 0, cpu=round(cpu, 6),
                             accepted=p.board.accepted if p.board is not None else 0,
                             durations=p.board.durations() if p.board is not None else None)
        self._feed(P.Exited(wid, code, sig))

    @staticmethod
    def _exit_cause(p: _Proc, code, sig) -> str:
        """Why a worker ended: what the primary asked (a kill reason, "stop", "drained",
        or the recycle cause of a drained worker that was replaced: "max_requests",
        "memory", "lifetime"), else "exit" (code 0) or "crash" (any other code or a
        signal nobody here sent)."""
        if p.asked is not None and p.asked != "drained":
            return p.asked
        if code == 0 and sig is None:
            if p.asked == "drained":
                return p.recycled or "drained"
            return "exit"
        return "crash"

    def kill_worker(self, wid: int, sig: int) -> None:
        p = self.procs.get(wid)
        if p is None or p.pid is None:
            return
        if sig == signal.SIGABRT and p.board is not None:
            busy = p.board.busy_since_ns       # hung: how long its current request has run
            if busy:
                log.error("worker %d (pid %d): busy on a request for %.1f s (scoreboard); "
                          "asking it for its tracebacks", wid, p.pid, (time.monotonic_ns() - busy) / 1e9)
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
        if p.asked is None:
            p.asked = "drained"
        try:
            self.backend.send_msg(p.chan, self.backend.MSG_DRAIN)
        except BlockingIOError:
            # channel full: SIGTERM makes the worker drain by itself
            self.kill_worker(wid, signal.SIGTERM)
        except OSError:
            pass
        self._emit_disconnect(p.handle)

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

    # ---- signals ---------------------------------------------------------------------------
    def _handle_signals(self) -> None:
        signals = self.wake.signals
        while signals:
            sig = signals.popleft()
            name = SIG_NAMES.get(sig, str(sig))
            handler = getattr(self, "handle_" + name[3:].lower(), None)
            if handler is not None:
                self.events.emit("signal", name=name)
                handler()

    def handle_term(self) -> None:
        from pyfork.serve import edge
        edge.for_worker().stopping.set()       # --health-path answers 503 from now on
        delay = getattr(self.cfg, "drain_delay", 0.0)
        if delay > 0 and self._stop_at is None and not self.policy.stopping:
            # Serve on while the balancer's health check sees 503 (pyfork.serve.health); a
            # second TERM starts the graceful stop at once.
            self._stop_at = time.monotonic() + delay
            log.info("SIGTERM: serving %.3g s more (health path answers 503), then a graceful stop", delay)
            return
        self._stop_at = None
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

    def handle_usr1(self) -> None:
        """Reopen log files (logrotate's postrotate): here, and in every worker that has its
        handler installed (READY or draining; a booting one opens its files afterwards)."""
        from pyfork import logfiles
        logfiles.reopen_all()
        n = 0
        for p in list(self.procs.values()):
            if p.handle.state in (P.READY, P.DRAINING):
                self.kill_worker(p.wid, signal.SIGUSR1)
                n += 1
        log.info("SIGUSR1: reopening log files (and in %d worker(s))", n)

    # ---- messages and the user's handles ----------------------------------------------------
    def _read_messages(self, phys: int) -> None:
        wid = self.by_phys.get(phys)
        p = self.procs.get(wid) if wid is not None else None
        if p is not None and self.channels.read(wid, p.chan, p.handle):
            self.wake.chld = True       # its channel hung up: it is exiting

    def send_to(self, wid: int, obj) -> bool:
        p = self.procs.get(wid)
        return self.channels.send(wid, p.chan if p is not None else None, obj)

    def broadcast(self, obj) -> int:
        n = 0
        for wid, p in list(self.procs.items()):
            if p.handle.state == P.READY and self.send_to(wid, obj):
                n += 1
        return n

    def _emit_disconnect(self, handle: WorkerHandle) -> None:
        """``disconnect`` once per worker: when it is told to drain or, at the latest, on exit."""
        if not handle.disconnected:
            handle.disconnected = True
            self.events.emit("disconnect", handle)

    # ---- requests from the API / control socket (loop thread or another thread) -------------
    def request(self, event) -> None:
        self._requests.append(event)
        if self.wake is not None:
            self.wake.poke()

    def status(self) -> dict:
        now = time.monotonic()
        rows = []
        pol = self.policy
        for wid in sorted(self.procs):
            p = self.procs[wid]
            rec = pol.workers.get(wid) if pol else None
            slot = pol.slots.get(p.slot) if pol else None
            try:
                ws = self.disp.worker_stats(p.phys)
            except (OSError, ValueError):
                ws = {"sent": 0, "inflight": 0}
            proc = cpu_and_rss(p.pid) if p.pid else None
            rows.append({
                "id": wid, "pid": p.pid, "slot": p.slot,
                "state": rec.state if rec else p.handle.state,
                "uptime": round(now - p.handle.started, 3),
                "handled": p.board.handled, "active": p.board.active,
                # connections the primary sent it, it accepted itself (shared, reuseport), open now
                "sent": ws["sent"], "accepted": p.board.accepted, "inflight": ws["inflight"],
                "restarts": slot.restarts if slot else 0,
                "generation": rec.generation if rec else 0,
                "cpu": round(proc[0], 3) if proc else 0.0, "rss": proc[1] if proc else 0,
                "busy_since_ns": p.board.busy_since_ns, "durations": p.board.durations(),
            })
        slots = []
        if pol:
            for s in sorted(pol.slots.values(), key=lambda s: s.index):
                slots.append({"slot": s.index, "state": s.state, "crashes": s.crashes, "restarts": s.restarts,
                              "boot_failures": s.boot_failures})
        return {"pid": os.getpid(), "policy": self.cfg.policy, "backend": self.backend.BACKEND,
                "workers_wanted": len(pol.slots) if pol else 0, "stopping": bool(pol and pol.stopping),
                "reloading": bool(pol and pol.reloading), "uptime": round(now - self.started_at, 3),
                "events_dropped": self.events.dropped, "workers": rows, "slots": slots,
                "recycles": dict(self.recycler.counts), "limits": self.limits(),
                "totals": self.tally.totals(rows), "dispatch": self._dispatch_stats()}

    def _dispatch_stats(self) -> dict:
        try:
            return dict(self.disp.stats()) if self.disp is not None else {}
        except (OSError, ValueError):
            return {}

    # ---- teardown ----------------------------------------------------------------------
    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        sched.primary_normal()
        if self.wake is not None:
            self.wake.restore()
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.pid_file is not None:
            self.pid_file.remove()
            self.pid_file = None
        if self.notifier is not None:
            self.notifier.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.board is not None:
            self.board.release()
            self.board = None
        for p in self.procs.values():
            p.board = None
        if self.disp is not None:
            self.disp.close()
            self.disp = None
        if self.listeners is not None:
            self.listeners.close()
        if self.wake is not None:
            self.wake.close()
        self.events.close()
