"""Log files pyfork reopens on SIGUSR1 (logrotate's ``postrotate``), in any process.

Theory of operation: logrotate renames the file and sends USR1 to the primary; every
process that writes a log file must then open the path again, or it keeps writing to the
renamed file. The primary forwards USR1 to its workers (pyfork.primary.arbiter,
``handle_usr1``). A writer (the access log, pyfork.serve.accesslog) registers itself here;
a signal handler only calls ``request_reopen()`` (it bumps a counter: no I/O in a handler),
and each writer compares ``generation()`` with the one it opened at, on its next flush or
tick, so the reopen happens in the writer's own loop. ``reopen_all()`` does it at once (the
primary calls it from its loop), for registered writers and for logging.FileHandlers on
the root logger (a user's ``--log-config`` style setup: pyfork's own log goes to stderr,
which is the supervisor's to rotate).
"""

from __future__ import annotations

import logging
from typing import List

_generation = 0
_writers: List[object] = []


def request_reopen() -> None:
    """Async-signal-safe enough for a Python signal handler: one integer store."""
    global _generation
    _generation += 1


def generation() -> int:
    return _generation


def register(writer) -> None:
    """``writer.reopen()`` is called by reopen_all(); ``writer.flush()`` by flush_all()."""
    if writer not in _writers:
        _writers.append(writer)


def unregister(writer) -> None:
    if writer in _writers:
        _writers.remove(writer)


def flush_all() -> None:
    for w in list(_writers):
        try:
            w.flush()
        except Exception:
            pass


def reopen_all() -> None:
    request_reopen()
    for w in list(_writers):
        try:
            w.reopen()
        except Exception:
            logging.getLogger("pyfork").exception("reopening %r failed", w)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            try:
                h.acquire()
                try:
                    old = h.setStream(open(h.baseFilename, h.mode, encoding=h.encoding))
                finally:
                    h.release()
                if old is not None:
                    old.close()
            except OSError as e:
                logging.getLogger("pyfork").error("cannot reopen %s: %s", h.baseFilename, e)
