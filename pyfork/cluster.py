"""pyfork.Cluster: Node's cluster API, the Python way.

Theory of operation: a Cluster is a validated Settings plus event callbacks;
``run()`` builds an ``Arbiter`` (pyfork/primary/arbiter.py), which binds, forks and
loops until stopped, and returns the exit code (0 stopped, 2 startup error,
3 every worker slot gave up). Callbacks run in the primary, inside the
arbiter's loop, one at a time; an exception in one is logged and ignored.
``reload()``, ``scale()`` and ``stop()`` only queue a request for the loop (and
wake it), so they are safe from callbacks, from another thread, and as the
programmatic twins of HUP, TTIN/TTOU and TERM.

Node-style callbacks (``on``; arguments):
  fork(worker)                 the process exists
  online(worker)               it runs pyfork code (before the app import)
  ready(worker)                app imported, it gets connections (Node: listening)
  message(worker, obj)         it called pyfork.worker.current().send(obj)
  disconnect(worker)           it was told to drain, or it is gone
  exit(worker, code, signal)   it was reaped

Every event as a record (``subscribe``): the same six plus the primary's own (start,
reload, scale, backoff, gave_up, shutdown, ...), each a pyfork.Event with kind, worker,
pid, slot and per-kind fields (README.md, "Events"). ``events="fd://N"`` or a path, or
the environment variable PYFORK_EVENTS, also writes them as JSON lines for another
process (pyfork.primary.eventstream).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional

from pyfork import config
from pyfork.primary import lifecycle as P
from pyfork.primary.arbiter import Arbiter, StartupError  # noqa: F401 - re-exported
from pyfork.primary.eventstream import Event, EventStream  # noqa: F401 - re-exported
from pyfork.primary.messages import WorkerHandle  # noqa: F401 - re-exported

EVENTS = ("fork", "online", "ready", "message", "disconnect", "exit")
EVENTS_ENV = "PYFORK_EVENTS"     # default for ``events``: fd://N or a path

log = logging.getLogger("pyfork.cluster")


class Cluster:
    def __init__(self, target, bind=("127.0.0.1:8000",), workers: Optional[int] = None, policy: str = "rr",
                 backend: str = "auto", interface: str = "auto", graceful_timeout: float = 30.0,
                 timeout: float = 30.0, min_uptime: float = 1.0, max_restarts: int = 5, max_requests: int = 0,
                 max_requests_jitter: int = 0, control: Optional[str] = None, post_fork: Optional[Callable] = None,
                 ready_timeout: float = 30.0, give_up_cooldown: float = 60.0,
                 events: Optional[str] = None, metrics: Optional[str] = None,
                 access_log: Optional[str] = None, access_log_format: Optional[str] = None,
                 max_worker_memory: int = 0, max_worker_lifetime: float = 0.0,
                 max_worker_lifetime_jitter: Optional[float] = None, pid_file: Optional[str] = None,
                 user=None, group=None, umask: Optional[int] = None, chdir: Optional[str] = None,
                 hooks: Optional[Dict[str, Callable]] = None, limit_concurrency: int = 0,
                 backlog: Optional[int] = None, keep_alive: float = 5.0,
                 proxy_protocol: bool = False,
                 proxy_allow_from: str = config.LOOPBACK, proxy_timeout: float = 5.0,
                 forwarded_allow_ips: str = config.LOOPBACK, health_path: Optional[str] = None,
                 drain_delay: float = 0.0, certfile: Optional[str] = None, keyfile: Optional[str] = None,
                 ca_certs: Optional[str] = None, ssl_ciphers: Optional[str] = None, cert_reqs: str = "none"):
        """``target`` is a "module:attr" string (re-imported by every new worker,
        so HUP runs new code) or the app object itself (inherited through fork).
        ``events`` ("fd://N" or a file path; default: $PYFORK_EVENTS) gets every event as
        a JSON line. ``metrics`` ("HOST:PORT" or "unix:PATH") serves Prometheus text at GET
        /metrics from the primary; ``access_log`` (a path or "-") and ``access_log_format``
        (gunicorn's atoms) turn on the access log. ``hooks``: server hooks by name (README
        "Config file and hooks"; what ``-c FILE.py`` defines). ``limit_concurrency`` (per
        worker, 0 = off), ``backlog`` (default: net.core.somaxconn) and ``keep_alive``
        (seconds, 0 = none) are README "Limits". ``proxy_protocol``, ``proxy_allow_from``,
        ``proxy_timeout``, ``forwarded_allow_ips``, ``health_path`` and ``drain_delay`` are the
        load-balancer options (README "More than one machine"); ``certfile``, ``keyfile``,
        ``ca_certs``, ``ssl_ciphers`` and ``cert_reqs`` (none | optional | required) turn on TLS
        in the workers (README "TLS"). Bad values raise ValueError
        (pyfork.config.ConfigError) here, before anything runs."""
        if bind is None or isinstance(bind, str):
            bind = [bind] if bind else None
        self.settings = config.validate(
            app=target, bind=list(bind) if bind else None, workers=workers, policy=policy, backend=backend,
            interface=interface, graceful_timeout=graceful_timeout, timeout=timeout, min_uptime=min_uptime,
            max_restarts=max_restarts, max_requests=max_requests, max_requests_jitter=max_requests_jitter,
            control=control, ready_timeout=ready_timeout, give_up_cooldown=give_up_cooldown,
            max_worker_memory=max_worker_memory, max_worker_lifetime=max_worker_lifetime,
            max_worker_lifetime_jitter=max_worker_lifetime_jitter, pid_file=pid_file, user=user, group=group,
            umask=umask, chdir=chdir,
            metrics=metrics, access_log=access_log, access_log_format=access_log_format,
            limit_concurrency=limit_concurrency, backlog=backlog, keep_alive=keep_alive,
            proxy_protocol=proxy_protocol, proxy_allow_from=proxy_allow_from, proxy_timeout=proxy_timeout,
            forwarded_allow_ips=forwarded_allow_ips, health_path=health_path, drain_delay=drain_delay,
            certfile=certfile, keyfile=keyfile, ca_certs=ca_certs, ssl_ciphers=ssl_ciphers, cert_reqs=cert_reqs)
        from pyfork.configfile import HOOKS
        hooks = dict(hooks or {})
        for name, fn in hooks.items():
            if name not in HOOKS or not callable(fn):
                raise config.ConfigError(f"bad hook {name!r}: expected a callable named one of {', '.join(HOOKS)}")
        self.hooks = hooks
        if post_fork is not None and not callable(post_fork):
            raise config.ConfigError("post_fork must be callable")
        self.post_fork = post_fork
        if events is None:
            events = os.environ.get(EVENTS_ENV) or None
        if events is not None and (not isinstance(events, str) or not events):
            raise config.ConfigError(f"bad events target {events!r}: expected fd://N or a path")
        self.events_target = events
        self._callbacks: Dict[str, List[Callable]] = {e: [] for e in EVENTS}
        self._stream = EventStream()
        self._stream.subscribe(self._to_callbacks)
        self._arbiter: Optional[Arbiter] = None

    # ---- events ------------------------------------------------------------
    def on(self, event: str, callback: Callable) -> "Cluster":
        """Node-style: ``callback(worker, ...)`` for one of EVENTS (arguments above)."""
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r}; expected one of {', '.join(EVENTS)}")
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._callbacks[event].append(callback)
        return self

    def subscribe(self, callback: Callable[[Event], None]) -> "Cluster":
        """``callback(event)`` for every event, as a pyfork.Event record, in order, on the
        primary's loop (keep it short; an exception is logged and ignored)."""
        if not callable(callback):
            raise TypeError("callback must be callable")
        self._stream.subscribe(callback)
        return self

    def _to_callbacks(self, ev: Event) -> None:
        cbs = self._callbacks.get(ev.kind)
        if not cbs or ev.handle is None:
            return
        if ev.kind == "message":
            args = (ev.handle, ev.fields["message"])
        elif ev.kind == "exit":
            args = (ev.handle, ev.fields["code"], ev.fields["signal"])
        else:
            args = (ev.handle,)
        for cb in list(cbs):
            try:
                cb(*args)
            except Exception:
                log.exception("%r callback %r failed", ev.kind, cb)

    # ---- running --------------------------------------------------------------
    def _arb(self) -> Arbiter:
        if self._arbiter is None:
            self._arbiter = Arbiter(self.settings, events=self._stream, events_target=self.events_target,
                                    post_fork=self.post_fork, hooks=self.hooks)
        return self._arbiter

    def prepare(self) -> None:
        """Loads the backend, imports the app once to check it, binds every address.
        Raises StartupError (one-line message) before anything is forked. run() calls it."""
        self._arb().prepare()

    def run(self) -> int:
        """Blocks in the primary until stopped; returns the exit code."""
        arb = self._arb()
        if arb.closed:
            raise RuntimeError("this Cluster has already run")
        return arb.run()

    # ---- primary-side handles ----------------------------------------------------
    @property
    def workers(self) -> Dict[int, WorkerHandle]:
        """Live workers by id (1-based, growing on every fork)."""
        return dict(self._arbiter.handles) if self._arbiter is not None else {}

    def broadcast(self, obj) -> int:
        """Sends obj to every READY worker; returns how many it was delivered to."""
        if self._arbiter is None:
            return 0
        return self._arbiter.broadcast(obj)

    def reload(self) -> None:
        """Rolling restart (as SIGHUP)."""
        self._arb().request(P.Reload())

    def scale(self, n: int) -> None:
        """Set the number of workers (as TTIN/TTOU, but to a number)."""
        self._arb().request(P.Scale(int(n)))

    def stop(self, graceful: bool = True) -> None:
        """Stop (as SIGTERM, or SIGQUIT when graceful is False)."""
        self._arb().request(P.Stop(graceful=graceful))

    def status(self) -> dict:
        return self._arbiter.status() if self._arbiter is not None and self._arbiter.policy else {}
