"""A hung worker explains itself: SIGABRT -> the stuck request and every thread's traceback.

Theory of operation. When a worker's heartbeat is older than --timeout the primary sends
SIGABRT, waits a short grace (pyfork.primary.lifecycle ABORT_GRACE) and then SIGKILLs it.
The handler installed here runs as soon as the main thread executes bytecode again (a
blocking sleep, read or lock wait is interrupted by the signal; a pure-Python loop runs
it at the next bytecode) and writes to the error log:

1. one line naming the request the worker was running -- method and path from
   pyfork.serve.inflight (the interface stores the request it hands to the app: one store
   per request, nothing else) and its age from this worker's scoreboard line
   (busy_since_ns);
2. every thread's Python traceback, by faulthandler (it formats them without allocating);
3. the access log lines still buffered (pyfork.logfiles), which the SIGKILL would lose;
4. the config file's ``worker_abort`` hook, if there is one.

faulthandler cannot *register* SIGABRT (it reserves it for its fatal-signal handler,
which would end the process before step 1), hence a Python handler. A worker stuck in C
code that never releases the GIL cannot run it: the primary's own line (the request's
age from the scoreboard) is then all there is, and the SIGKILL follows anyway.

SIGUSR1 (log reopen, forwarded by the primary) is installed here too: its handler only
records (pyfork.logfiles); the interface's tick reopens.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import time

from pyfork import logfiles
from pyfork.serve import inflight

log = logging.getLogger("pyfork.worker")


def install(wid: int, pid: int, board, abort_hook=None) -> None:
    """``abort_hook()`` (the config file's worker_abort, pyfork.worker.hooks) runs last."""

    def on_abort(signum, frame):
        busy = board.busy_since_ns
        what = inflight.describe()
        if what and board.active and busy:
            age = (time.monotonic_ns() - busy) / 1e9
            log.error("worker %d (pid %d) hung: stuck on %s for %.1f s; tracebacks follow", wid, pid, what, age,
                      extra={"worker": wid, "cause": "hung"})
        else:
            log.error("worker %d (pid %d) hung: no request in progress; tracebacks follow", wid, pid,
                      extra={"worker": wid, "cause": "hung"})
        for h in logging.getLogger().handlers:     # our line before faulthandler's raw writes
            try:
                h.flush()
            except Exception:
                pass
        try:
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        except (ValueError, OSError, AttributeError, RuntimeError):
            pass       # no usable stderr
        logfiles.flush_all()
        if abort_hook is not None:
            abort_hook()

    def on_usr1(signum, frame):
        logfiles.request_reopen()

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGABRT, on_abort)
