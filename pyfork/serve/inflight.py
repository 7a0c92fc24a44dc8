"""The request a worker's interface is running now, for the hung-worker report.

Theory of operation: when the primary finds a worker silent for --timeout it sends
SIGABRT (pyfork.worker.boot installs the handler): faulthandler writes every thread's
traceback and the handler logs which request the worker was stuck on. The interface
records that request here as it calls the application: one list store per request, no
allocation, no syscall (WSGI stores its parsed request, ASGI the scope). ``describe()``
turns what was stored into "GET /path?query".
"""

from __future__ import annotations

current = [None]       # the last request handed to the application (req object or ASGI scope)


def describe(obj=None) -> str:
    r = current[0] if obj is None else obj
    if r is None:
        return ""
    try:
        if isinstance(r, dict):        # an ASGI scope
            q = r.get("query_string") or b""
            path = r.get("path", "")
            return f"{r.get('method', r.get('type', '?'))} {path}{'?' + q.decode('latin-1') if q else ''}"
        return f"{r.method} {r.target.decode('latin-1')}"
    except Exception:    # never fail while explaining a hang
        return repr(r)[:200]
