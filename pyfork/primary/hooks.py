"""Server hooks from a config file (pyfork.configfile), run at their points in the primary.

Theory of operation: the primary-side hooks follow the event stream, so this module is
one more subscriber (``on_event``) plus two calls the stream cannot give: ``starting``
(before binding) and ``pre_fork`` (just before ``os.fork``). Every hook runs on the
primary's loop, one at a time; one that raises is logged with its traceback and the
primary carries on, except ``on_starting``, whose exception stops the start (exit 2).

Hooks and their arguments (``server`` is a ``Server``: ``pid``, ``settings``, ``urls``,
``status()``; ``worker`` a pyfork.cluster.WorkerHandle: ``id``, ``pid``, ``slot``):

  on_starting(server)                  before binding; raising exits with code 2
  when_ready(server)                   once, when every worker slot first has a READY worker
  pre_fork(server, worker)             before each fork (worker.pid is still None)
  post_fork(worker)                    in the worker, before the app import (pyfork.worker
                                       runtime: id, pid, send, on_message)
  child_exit(server, worker, code, signal)   after a worker was reaped (e.g. prometheus
                                       multiprocess.mark_process_dead(worker.pid))
  worker_abort(worker)                 in the worker, when the primary aborts it as hung
                                       (pyfork.worker.hooks)
  on_reload(server)                    a rolling restart begins (HUP, reload())
  on_exit(server, code)                the primary is about to exit with ``code``
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Callable, Dict, List, Optional

log = logging.getLogger("pyfork.hooks")


class Server:
    """What a hook sees of the primary (read-only)."""

    def __init__(self, settings, status: Callable[[], dict], urls: Callable[[], List[str]]):
        self.settings = settings
        self._status, self._urls = status, urls

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def urls(self) -> List[str]:
        return self._urls()

    def status(self) -> dict:
        return self._status()


class ServerHooks:
    def __init__(self, hooks: Dict[str, Callable], server: Server):
        self.hooks = hooks
        self.server = server
        self.announced_ready = False

    def call(self, name: str, *args) -> bool:
        """Runs hook ``name`` if defined; an exception is logged with its traceback. True if it ran cleanly."""
        fn = self.hooks.get(name)
        if fn is None:
            return True
        try:
            fn(*args)
            return True
        except Exception:
            log.error("%s hook failed (the primary carries on):\n%s", name, traceback.format_exc().rstrip())
            return False

    def starting(self) -> None:
        """on_starting: its exception propagates (the caller exits with code 2)."""
        fn = self.hooks.get("on_starting")
        if fn is not None:
            fn(self.server)

    def pre_fork(self, worker) -> None:
        self.call("pre_fork", self.server, worker)

    def on_event(self, ev) -> None:
        kind = ev.kind
        if kind == "ready" and not self.announced_ready and all_slots_ready(self.server.status()):
            self.announced_ready = True
            self.call("when_ready", self.server)
        elif kind == "exit" and ev.handle is not None:
            self.call("child_exit", self.server, ev.handle, ev.fields.get("code"), ev.fields.get("signal"))
        elif kind == "reload":
            self.call("on_reload", self.server)
        elif kind == "shutdown":
            self.call("on_exit", self.server, ev.fields.get("code"))


def all_slots_ready(status: Optional[dict]) -> bool:
    """True when every wanted worker slot has a READY worker (from Arbiter.status())."""
    if not status:
        return False
    ready = sum(1 for w in status.get("workers", ()) if w.get("state") == "ready")
    return ready >= status.get("workers_wanted", 1) > 0
