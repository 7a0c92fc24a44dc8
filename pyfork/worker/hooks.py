"""The worker-side server hook ``worker_abort`` (from a config file, pyfork.configfile).

Theory of operation: pyfork.worker.boot registers the hook after fork with
``set_worker_abort``; the code path that ends a worker the primary found hung (its
SIGABRT handler, issue 12) calls ``run_worker_abort()`` once, in the worker, before the
worker exits. The hook gets the worker runtime (``id``, ``pid``); it should be quick
(log a stack dump, flush something): the primary kills the worker soon after anyway. An
exception in it is logged and ignored. Without a hook ``run_worker_abort`` does nothing.
"""

from __future__ import annotations

import logging
import traceback
from typing import Callable, Optional

log = logging.getLogger("pyfork.worker")

_worker_abort: Optional[Callable] = None


def set_worker_abort(fn: Optional[Callable]) -> None:
    global _worker_abort
    _worker_abort = fn


def run_worker_abort(worker) -> bool:
    """Calls the worker_abort hook with ``worker`` if one is set (at most once); True if it ran."""
    global _worker_abort
    fn, _worker_abort = _worker_abort, None
    if fn is None:
        return False
    try:
        fn(worker)
    except Exception:
        log.error("worker_abort hook failed:\n%s", traceback.format_exc().rstrip())
    return True
