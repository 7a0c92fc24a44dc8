"""pyfork's own log: ``--log-level`` and ``--log-format text|json``.

Theory of operation: the primary sets up the root logger once, before any fork, so every
worker inherits the same handler and format. ``text`` is gunicorn-like, one line per
record: ``[time] [pid] [LEVEL] logger: message``. ``json`` writes one JSON object per line
with structured fields a log pipeline can filter on without parsing prose: ``time``,
``level``, ``logger``, ``pid``, ``message``, ``worker`` (the worker id, in a worker
process or when the record names one), ``cause`` (when the record has one: a hang, an
exit), and ``exc`` (a traceback, if any). Records carry ``worker``/``cause`` through
logging's ``extra=``. Both go to stderr, the error log (USR1 reopens file handlers:
pyfork.logfiles).
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(name)s: %(message)s"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
                    + f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        worker = getattr(record, "worker", None)
        if worker is None:
            from pyfork.worker.runtime import current
            w = current()
            worker = w.id if w is not None else None
        if worker is not None:
            out["worker"] = worker
        cause = getattr(record, "cause", None)
        if cause is not None:
            out["cause"] = cause
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, separators=(",", ":"), default=str)


def setup_logging(level: str = "info", fmt: str = "text", stream=None) -> None:
    """Root logger -> ``stream`` (stderr) at ``level`` in ``fmt`` (text|json). A handler a
    user already installed is kept, only its level is set."""
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(stream if stream is not None else sys.stderr)
        h.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
        root.addHandler(h)
    root.setLevel(LEVELS.get(str(level).lower(), logging.INFO))
