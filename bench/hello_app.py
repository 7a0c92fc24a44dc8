"""The hello-world app every server in bench/compare.py serves, in each interface.

Theory of operation: the same tiny plain-text response everywhere, carrying the
serving process's pid ("Hello, World! pid=1234") so load generators can count
per-worker shares without a second request. /fibonacci?n=N is the heavy route
of the mixed-work tail-latency scenario (naive recursion: pure CPU, holds the
worker the way a slow handler does). /sleep?ms=N is the slow route that uses no
CPU (a handler waiting on a database or another service): time.sleep in WSGI
and raw, asyncio.sleep in ASGI, since that is how each model waits. Names:
  app    WSGI   (pyfork --interface wsgi, gunicorn)
  asgi   ASGI   (pyfork --interface asgi, uvicorn)
  raw    raw    (pyfork --interface raw: handler(sock, addr), Connection: close only)
"""
import asyncio
import os
import time
from urllib.parse import parse_qs

SLEEP_MAX_MS = 10_000


def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def sleep_ms(path, query):
    """Milliseconds /sleep asks for (0 for any other path), or None when ms is bad."""
    if path != "/sleep":
        return 0
    try:
        ms = int(parse_qs(query).get("ms", ["25"])[0])
    except ValueError:
        return None
    return ms if 0 <= ms <= SLEEP_MAX_MS else None


def _respond(path, query, slept_ms=0):
    """Returns (status line, body) for a path and its raw query string; /sleep
    has already waited slept_ms (None: a bad ms)."""
    if path == "/sleep":
        if slept_ms is None:
            return "400 Bad Request", b"ms must be 0..%d\n" % SLEEP_MAX_MS
        return "200 OK", b"slept %dms pid=%d\n" % (slept_ms, os.getpid())
    if path == "/fibonacci":
        try:
            n = int(parse_qs(query).get("n", ["20"])[0])
        except ValueError:
            return "400 Bad Request", b"bad n\n"
        if n > 35:
            return "400 Bad Request", b"n above 35\n"
        return "200 OK", b"fib(%d)=%d pid=%d\n" % (n, fib(n), os.getpid())
    return "200 OK", b"Hello, World! pid=%d\n" % os.getpid()


def app(environ, start_response):
    path, query = environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", "")
    ms = sleep_ms(path, query)
    if ms:
        time.sleep(ms / 1e3)
    status, body = _respond(path, query, ms)
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path, query = scope["path"], scope.get("query_string", b"").decode("latin-1")
    ms = sleep_ms(path, query)
    if ms:
        await asyncio.sleep(ms / 1e3)
    status, body = _respond(path, query, ms)
    await send({"type": "http.response.start", "status": int(status.split()[0]),
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def raw(sock, addr):
    """One request per connection: read the head, answer, close."""
    sock.setblocking(True)
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(8192)
        if not chunk:
            sock.close()
            return
        data += chunk
    target = data.split(b" ", 2)[1].decode("latin-1")
    path, _, query = target.partition("?")
    ms = sleep_ms(path, query)
    if ms:
        time.sleep(ms / 1e3)
    status, body = _respond(path, query, ms)
    sock.sendall(b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (status.encode(), len(body), body))
    sock.close()
