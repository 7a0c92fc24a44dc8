"""--health-path: pyfork answers a load balancer's health check itself, no app code involved.

Theory of operation. A thin layer in front of the app (WSGI or ASGI) answers GET/HEAD on the
health path with 200 `{"status": "ok"}` while the host serves, and with 503
`{"status": "draining"}` once the primary has been told to stop (edge.StopFlag, a byte of
memory shared by the primary and every worker). With --drain-delay S the primary keeps
serving for S seconds after TERM before its graceful stop begins: every request is still
answered, but the balancer's health check sees 503 and takes the host out first, so no new
connection arrives at a listener that is about to close. Any other path goes to the app.
"""
from __future__ import annotations

import json
import os

__all__ = ["wrap_wsgi", "wrap_asgi"]


def _answer(stopping):
    if stopping:
        return "503 Service Unavailable", 503, json.dumps({"status": "draining", "pid": os.getpid()}).encode()
    return "200 OK", 200, json.dumps({"status": "ok", "pid": os.getpid()}).encode()


def wrap_wsgi(app, path, flag):
    """`app`, with `path` answered by pyfork (`app` itself when `path` is None)."""
    if not path:
        return app

    def pyfork_health(environ, start_response):
        if environ.get("PATH_INFO") != path:
            return app(environ, start_response)
        status, _, body = _answer(flag.is_set())
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
    return pyfork_health


def wrap_asgi(app, path, flag):
    """`app`, with `path` answered by pyfork (`app` itself when `path` is None)."""
    if not path:
        return app

    async def pyfork_health(scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != path:
            return await app(scope, receive, send)
        _, status, body = _answer(flag.is_set())
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"cache-control", b"no-store"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope.get("method") == "HEAD" else body})
    return pyfork_health
