"""The worker layer: everything that runs in a forked child.

  boot.py        from the fork to ``interface.serve(app, worker)``: fork hygiene, signals,
                 app import, exit codes
  runtime.py     ``Worker``: the runtime an interface serves with (connections from the
                 channel, READY, heartbeat, drain, messages) and ``current()``
  standalone.py  the same runtime contract without a primary (one listening socket)

``pyfork.worker.current()`` is the worker this process runs as (None in the primary).
"""

from pyfork.worker.runtime import Worker, current

__all__ = ["Worker", "current"]
