"""Tornado's HTTP server in pyfork's workers: pyfork's primary accepts, Tornado serves.

    python examples/embed_tornado.py [HOST:PORT] [WORKERS]

Theory of operation: `main(rt)` is a pyfork worker body (pyfork.embed). In each worker it
runs an asyncio loop with pyfork.embed.run_asyncio; every connection the primary hands over
becomes a Tornado IOStream given to `HTTPServer.handle_stream`, exactly what Tornado's own
accept loop would do. What pyfork needs from the worker:
  * closes: the IOStream closes its socket, which reports the close (pyfork.embed sockets);
  * requests: `CountingHTTPServer` reports each request from its headers to the end of its
    response (request_conn.finish()) or the connection's loss, for the scoreboard;
  * drain: once no request is in flight, idle kept-alive connections are closed (Tornado
    cuts any connection it closes, so a request arriving in that instant could fail; with
    `Connection: close` clients nothing is cut).
"""
import os
import sys

from tornado import httpserver, httputil, iostream, web

import pyfork
import pyfork.embed


class HelloHandler(web.RequestHandler):
    def get(self):
        self.write({"message": "hello from tornado", "workerPid": os.getpid()})


class _Request:
    """One request's scoreboard report: started once, finished once."""

    def __init__(self, server):
        self.server = server
        self.started = self.ended = False

    def start(self):
        if not self.started:
            self.started = True
            self.server.in_flight += 1
            self.server.rt.request_started()

    def end(self):
        if self.started and not self.ended:
            self.ended = True
            self.server.in_flight -= 1
            self.server.rt.request_finished()


class _CountingDelegate(httputil.HTTPMessageDelegate):
    """The application's delegate, with the request's start at its headers."""

    def __init__(self, inner, request):
        self.inner = inner
        self.request = request

    def headers_received(self, start_line, headers):
        self.request.start()
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk):
        return self.inner.data_received(chunk)

    def finish(self):
        return self.inner.finish()

    def on_connection_close(self):
        try:
            return self.inner.on_connection_close()
        finally:
            self.request.end()


class _FinishReporting:
    """The request's HTTPConnection as the application sees it: finish() ends the request."""

    def __init__(self, conn, request):
        self._conn = conn
        self._request = request

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def finish(self):
        try:
            return self._conn.finish()
        finally:
            self._request.end()


class CountingHTTPServer(httpserver.HTTPServer):
    """HTTPServer that reports requests to the pyfork runtime `self.rt`."""

    rt = None
    in_flight = 0

    def start_request(self, server_conn, request_conn):
        request = _Request(self)
        inner = super().start_request(server_conn, _FinishReporting(request_conn, request))
        return _CountingDelegate(inner, request)


@pyfork.embed.worker_body
def main(rt):
    server = CountingHTTPServer(web.Application([(r"/", HelloHandler)]))
    server.rt = rt

    def adopt(sock):
        server.handle_stream(iostream.IOStream(sock), sock.getpeername())

    async def on_drain():
        import asyncio
        while server.in_flight:
            await asyncio.sleep(0.05)
        await server.close_all_connections()

    pyfork.embed.run_asyncio(rt, adopt, on_drain=on_drain)


if __name__ == "__main__":
    bind = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    sys.exit(pyfork.Cluster(main, bind=[bind], workers=workers).run())
