"""The ASGI interface: uvicorn's own HTTP/1.1 protocol on the sockets pyfork hands over.

Theory of operation: pyfork does not parse HTTP here. Each worker builds one uvicorn
`Config` (loaded once) and one `ServerState`, runs the ASGI lifespan protocol once
(uvicorn's LifespanOn: startup before the first connection is taken, shutdown after
the last one is closed), and gives every socket from `rt.take()` to uvicorn's
protocol class (HttpToolsProtocol, or H11Protocol when httptools is missing) with
`loop.connect_accepted_socket` - what `loop.create_server` does after accept(), minus
the accept, which pyfork's primary already did. The loop plumbing (take, tick,
wakeup fd, drain notice) is `aio.LoopDriver`.

What pyfork adds to uvicorn's protocol, in a subclass made once per worker:
  * `connection_lost` (also on the WebSocket protocol after an upgrade) calls
    `rt.closed()` exactly once per socket;
  * the app a connection calls is wrapped to call `rt.request_started()` /
    `rt.request_finished()` around each HTTP request (one extra coroutine frame); the
    lifespan still sees the bare app. A WebSocket is an open connection, not a running
    request: its app call, which lasts as long as the socket, is not counted (else one
    open WebSocket would make the worker look busy to the dispatcher for hours);
  * `connection_made` does what uvicorn's does with the addresses the transport
    saved instead of a socket object and two syscalls per connection
    (asgi_protocol.connection_made); a response's head leaves in one write with its
    first body part (asgi_protocol.head_with_body); responses that end with a close go out corked
    (asgi_protocol.corked): head, body and FIN in one TCP segment, on uvloop and on
    asyncio's own loop alike.
On uvloop, connections are taken as bare fds (`rt.take_fds()`, `aio.AcceptedFd`):
no socket object is built and detached per connection.
Every second the Date header is refreshed, as uvicorn's `Server.on_tick` does.

Drain (`rt.draining`, pyfork/serve/runtime.py): no request a client sent is failed, and no
connection is cut while a request may be on its way. Decided in the very loop callback that
sees `rt.draining`, then re-checked every 50 ms:
  * stop taking;
  * every request received is answered, by the app; a request that arrives on a
    kept-alive connection during the drain too (never a 503). Every connection's app
    is swapped for one (`_last_response_closes`) whose response says `Connection:
    close` (uvicorn then closes the socket after it) unless more requests are already
    behind it (queued in uvicorn's pipeline, partly parsed, or unread in the socket):
    those are answered first, and the last of them closes. Requests already running
    get the same decision when their response starts (`_LastResponseHeaders`); a
    response that started before the drain stays keep-alive, and the connection lives on;
  * a kept-alive connection is not closed at the drain: its client may be sending its
    next request at that very moment. uvicorn's keep-alive timer closes it between
    requests, exactly as in normal operation, so the drain adds no race a client does
    not already face (an idle one with no timer armed is closed after the grace below);
  * a fresh connection (taken, no request yet: the primary accepted it before the
    stop) is served like any other; one still silent after `timeout_keep_alive` (5 s)
    is closed;
  * a WebSocket gets uvicorn's shutdown() (close code 1012);
  * when no connection and no request task is left: lifespan shutdown, return.

Limits (pyfork.serve.connlimits, README "Limits"): --limit-concurrency is uvicorn's own
`limit_concurrency` (its protocol answers 503 with `Connection: close` while the worker has
N open connections or N running tasks, WebSockets included); its per-request warning is
turned into a count the worker reports once a second (`_RejectionCounter`). --keep-alive is
uvicorn's `timeout_keep_alive`; 0 adds `Connection: close` to every HTTP response.

Behind a load balancer (pyfork.serve.edge): with --proxy-protocol every connection is adopted
through aio_proxy.ProxyHeaderProtocol, which reads the PROXY header before uvicorn's protocol
starts (and sets its `client`); such connections are taken as sockets, uncorked. Forwarded
headers from --forwarded-allow-ips are applied to the scope by a layer around the app
(pyfork.serve.forwarded), outside the access log's, so the log shows the client too.

TLS (--certfile, pyfork.serve.tls): each connection is adopted with
`loop.connect_accepted_socket(..., ssl=context)` (aio.adopt_socket), so the loop (uvloop or asyncio) runs the
handshake in the worker, within tls.HANDSHAKE_TIMEOUT; one that fails ends that connection
only (`aio.Connect` reports it closed). Such connections are taken as sockets, uncorked, and
keep uvicorn's own `connection_made`, which sets the scope's `scheme` to https.

Knobs (environment, read once per worker): PYFORK_UVLOOP=0 (asyncio's loop),
PYFORK_ASGI_HTTP=httptools|h11 (protocol class; default httptools when importable).
Proxy headers are off (pyfork is not a proxy-aware server by default) and uvicorn's
access log is off: it costs a log record per request; pyfork's own (--access-log,
pyfork.serve.accesslog) watches `send` for the status and size and buffers its lines. TCP_NODELAY: the primary sets
it on accepted sockets (pyfork's runtime says so with `rt.tcp_nodelay`); for a runtime
that does not, `aio.adopt_socket` sets it (asyncio's transport skips accepted sockets,
see there), so uvicorn's two writes per response (head, then body) never wait for the
client's delayed ACK (~40 ms per keep-alive request).
"""
from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import time
from email.utils import formatdate

from . import accesslog, aio, aio_proxy, asgi_protocol, connlimits, edge, forwarded, health, inflight, tls
from .detect import is_asgi
from .runtime import Runtime

NAME = "asgi"
# Requests a worker is sent at once (running plus not yet taken): the event loop starts
# each at once; 100 keeps a burst spread over the workers (pyfork.serve.aio.CAPACITY).
CAPACITY = 100

DRAIN_POLL = aio.DRAIN_POLL

# --------------------------------------------------------------------------- detection

detect = is_asgi     # pyfork.serve.detect: guessing imports only the interface that wins


# --------------------------------------------------------------------------- uvicorn setup

def _http_protocol_name() -> str:
    wanted = os.environ.get("PYFORK_ASGI_HTTP", "auto")
    if wanted not in ("auto", "httptools", "h11"):
        raise ValueError(f"PYFORK_ASGI_HTTP must be httptools or h11, not {wanted!r}")
    if wanted != "auto":
        return wanted
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "httptools"


DEFAULT_KEEP_ALIVE = 5.0      # uvicorn's timeout_keep_alive default


def make_config(app, rt: Runtime, limits=None):
    """One uvicorn Config for this worker, loaded. `limits`: a connlimits.ConnLimits or None."""
    from uvicorn.config import Config

    keep_alive = DEFAULT_KEEP_ALIVE
    limit_concurrency = None
    if limits is not None:
        # keep-alive 0: every response closes (_closing_app), so the timer never runs;
        # uvicorn's default stays for the drain's grace for silent fresh connections.
        keep_alive = limits.keep_alive or DEFAULT_KEEP_ALIVE
        limit_concurrency = limits.limit_concurrency or None

    # factory=True with a lambda hands uvicorn the app object as is. Given the app
    # itself, Config.load() would call it with no arguments to probe for a factory,
    # which creates (and drops) a coroutine for apps whose parameters have defaults.
    config = Config(
        app=lambda: app,
        factory=True,
        interface="asgi3",
        http=_http_protocol_name(),
        lifespan="auto",
        log_config=None,  # the worker's logging is pyfork's; do not dictConfig it
        log_level=logging.DEBUG if rt.log.isEnabledFor(logging.DEBUG) else logging.WARNING,
        access_log=False,
        proxy_headers=False,
        timeout_keep_alive=keep_alive,
        limit_concurrency=limit_concurrency,
    )
    config.load()
    return config


def preload() -> None:
    """Primary side, before the first fork (pyfork.worker.boot.preload): imports what every
    ASGI worker imports while it sets up: uvicorn's Config, loaded as make_config loads it
    (its protocol, lifespan and WebSocket modules), and the event loop's module. Workers
    then share those pages copy-on-write instead of each importing its own: measured with
    the demo after 2,000 requests, worker USS 13.5 -> 4.9 MB, primary RSS 25.2 -> 32.6 MB
    (the pages it now holds are the workers' too: with 2 workers 52 -> 42 MB in all, and
    each further worker saves ~8.6 MB). Nothing here calls the app or opens an fd."""
    from uvicorn.config import Config

    async def probe(scope, receive, send):   # never called: Config.load() only wraps it
        pass

    Config(app=lambda: probe, factory=True, interface="asgi3", http=_http_protocol_name(),
           lifespan="auto", log_config=None, access_log=False, proxy_headers=False).load()
    import uvicorn.server  # noqa: F401 - ServerState, in every worker
    aio.loop_factory()     # imports uvloop when it will be used


def _refresh_default_headers(config, state) -> None:
    # uvicorn's Server.on_tick does this once a second: Date plus Server.
    date = [(b"date", formatdate(time.time(), usegmt=True).encode())] if config.date_header else []
    state.default_headers = date + config.encoded_headers


def _counted(app, rt, access=None):
    started, finished = rt.request_started, rt.request_finished
    current = inflight.current
    if access is not None:
        return _logged(app, started, finished, access)

    async def pyfork_request(scope, receive, send):
        if scope["type"] != "http":     # a WebSocket: an open connection, not a request
            return await app(scope, receive, send)
        started()
        current[0] = scope              # for the hung-worker report (SIGABRT)
        try:
            await app(scope, receive, send)
        finally:
            finished()

    return pyfork_request


def _logged(app, started, finished, access):
    """_counted's app with the access log on: `send` is watched for the status, the
    response headers and the body size; the line is logged once the app returns (its
    response is with the transport by then)."""
    current = inflight.current

    async def pyfork_logged_request(scope, receive, send):
        if scope["type"] != "http":     # a WebSocket: an open connection, not a request
            return await app(scope, receive, send)
        started()
        current[0] = scope
        t0 = time.time()
        seen = [500, None, 0]           # status, headers, body bytes (500: nothing was sent)

        async def watched_send(message):
            kind = message["type"]
            if kind == "http.response.body":
                seen[2] += len(message.get("body", b""))
            elif kind == "http.response.start":
                seen[0] = message["status"]
                seen[1] = message.get("headers")
            await send(message)

        try:
            await app(scope, receive, watched_send)
        finally:
            finished()
            _log_access(access, scope, seen, t0)

    return pyfork_logged_request


def _log_access(access, scope, seen, t0) -> None:
    try:
        r = accesslog.Record()
        client = scope.get("client")
        r.remote = client[0] if client else "-"
        r.method = scope["method"]
        raw = scope.get("raw_path")
        r.path = raw.decode("latin-1") if raw else scope.get("path", "")
        r.query = (scope.get("query_string") or b"").decode("latin-1")
        r.protocol = "HTTP/" + scope.get("http_version", "1.1")
        r.status, r.resp_headers, r.length = seen
        r.req_headers = scope.get("headers")
        r.start = t0
        r.duration = time.time() - t0
        r.environ = None
        access.log(r)
    except Exception:
        logging.getLogger("pyfork.access").exception("access log line failed")


def _closing_app(app):
    """`app` with `Connection: close` on every HTTP response (--keep-alive 0); uvicorn's
    protocols close the socket after a response that says so."""
    close = (b"connection", b"close")

    async def pyfork_no_keep_alive(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_closing(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), close]
            await send(message)

        await app(scope, receive, send_closing)

    return pyfork_no_keep_alive


class _RejectionCounter(logging.Filter):
    """On uvicorn's error logger: counts its "Exceeded concurrency limit." warnings (one per
    503 its protocol sends for limit_concurrency) for the worker's once-a-second report
    instead of logging each (a flood of them would be a log line per rejected request)."""

    MESSAGE = "Exceeded concurrency limit."

    def filter(self, record):
        if record.msg == self.MESSAGE:
            connlimits.rejected()
            return False
        return True


def _last_response_closes(app, protocol):
    """`app`, for one connection of a draining worker: its response says `Connection:
    close` unless more requests are already behind it on `protocol` (see the module
    docstring). uvicorn's protocols close the socket after a response that says so."""
    close = (b"connection", b"close")

    async def pyfork_draining_request(scope, receive, send):
        async def send_closing(message):
            if message["type"] == "http.response.start" and not _more_requests(protocol, scope):
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), close]
            await send(message)

        await app(scope, receive, send_closing)

    return pyfork_draining_request


class _LastResponseHeaders(list):
    """A cycle's `default_headers` for a request that was under way when the drain began
    (its app is already running, so `_last_response_closes` cannot wrap it). uvicorn's
    protocols read `default_headers + headers` exactly once, when the response starts:
    that sum adds `Connection: close` unless more requests are behind this one then."""

    __slots__ = ("protocol", "scope")

    def __add__(self, other):
        out = list(self) + list(other)
        if not _more_requests(self.protocol, self.scope):
            out.append((b"connection", b"close"))
        return out


def _close_after_running(protocol) -> None:
    """Gives the requests already admitted on `protocol` whose responses have not started
    (the one in flight, and those queued in httptools' pipeline) _LastResponseHeaders."""
    cycles = [protocol.cycle] + [cycle for cycle, _app in getattr(protocol, "pipeline", ())]
    for cycle in cycles:
        if cycle is None or cycle.response_started or type(cycle.default_headers) is _LastResponseHeaders:
            continue
        headers = _LastResponseHeaders(cycle.default_headers)
        headers.protocol, headers.scope = protocol, cycle.scope
        cycle.default_headers = headers


def _more_requests(protocol, scope) -> bool:
    """True when `protocol` holds request bytes beyond the request of `scope`."""
    if hasattr(protocol, "parser"):  # HttpToolsProtocol parses ahead and queues cycles
        if protocol.pipeline or protocol.scope is not scope:
            return True
    else:
        conn = getattr(protocol, "conn", None)  # H11Protocol keeps what follows unparsed
        if conn is not None and conn.trailing_data[0]:
            return True
    return _socket_readable(protocol)


def _request_pending(protocol) -> bool:
    """True when part of a request has been parsed on an otherwise idle connection."""
    if hasattr(protocol, "parser"):  # HttpToolsProtocol
        scope, cycle = protocol.scope, protocol.cycle
        # on_message_begin makes a new scope; on_headers_complete gives it to a new cycle.
        return scope is not None and (cycle is None or cycle.scope is not scope)
    conn = getattr(protocol, "conn", None)  # H11Protocol
    if conn is not None:
        import h11
        return conn.their_state is h11.SEND_BODY or bool(conn.trailing_data[0])
    return False


def _idle_untimed(protocol) -> bool:
    """True when `protocol` is between requests with nothing received and no keep-alive
    timer of uvicorn's armed to close it (a fresh connection, typically)."""
    cycle = protocol.cycle
    if cycle is not None and not cycle.response_complete:
        return False
    if getattr(protocol, "timeout_keep_alive_task", None) is not None or getattr(protocol, "pipeline", None):
        return False
    return not _request_pending(protocol) and not _socket_readable(protocol)


def _socket_readable(protocol) -> bool:
    """True when the kernel holds unread bytes (or EOF) for the connection."""
    transport = getattr(protocol, "transport", None)
    if transport is None or transport.is_closing():
        return False
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


class _Worker:
    """The per-worker state: config, ServerState, lifespan, live connections."""

    def __init__(self, app, rt: Runtime, loop):
        from uvicorn.server import ServerState

        self.rt = rt
        self.loop = loop
        limits = connlimits.current()
        self.config = make_config(app, rt, limits)
        self.rejection_counter = None
        if limits is not None and limits.limit_concurrency:
            self.rejection_counter = _RejectionCounter()
            logging.getLogger("uvicorn.error").addFilter(self.rejection_counter)
        self.state = ServerState()
        _refresh_default_headers(self.config, self.state)
        self.lifespan = self.config.lifespan_class(self.config)
        self.draining = False
        self.access = accesslog.for_worker()      # None when --access-log is off
        self.edge = edge.for_worker()
        app = health.wrap_asgi(self.config.loaded_app, self.edge.health_path, self.edge.stopping)
        self.request_app = forwarded.wrap_asgi(_counted(app, rt, self.access), self.edge.forwarded_allow_ips)
        if limits is not None and limits.keep_alive == 0:
            self.request_app = _closing_app(self.request_app)
        self.live: set = set()            # HTTP protocols whose socket is not yet reported closed
        self.connect_tasks: set = set()
        self.nodelay = aio.needs_nodelay(rt)
        self.tls_context = tls.server_context(self.edge.tls)     # None: plain TCP
        # Connections as bare fds (no socket object each) where that is safe: uvloop,
        # a runtime that offers them with a known family and has set TCP_NODELAY.
        self.conn_family = rt.conn_family
        self.takes_fds = (aio.is_uvloop(loop) and self.conn_family is not None and not self.nodelay
                          and not self.edge.proxy_protocol and self.tls_context is None)
        # TCP_CORK for responses that end with a close (asgi_protocol.corked): TCP
        # connections from pyfork's runtime (bare fds on uvloop, sockets on asyncio's loop),
        # not behind a PROXY header nor TLS (the record layer writes for itself), and
        # httptools' protocol.
        self.tcp_cork = None
        if (not self.nodelay and not self.edge.proxy_protocol and self.tls_context is None
                and self.conn_family in (socket.AF_INET, socket.AF_INET6)
                and hasattr(self.config.http_protocol_class, "on_headers_complete")):
            self.tcp_cork = rt.tcp_cork
        self.protocol_class = self._make_protocol_class(self.config.http_protocol_class)
        if hasattr(self.protocol_class, "on_headers_complete"):    # httptools' protocol
            self.protocol_class = asgi_protocol.head_with_body(self.protocol_class)
        if self.tcp_cork is not None:
            self.protocol_class = asgi_protocol.corked(self.protocol_class, self.tcp_cork)

    def _make_protocol_class(self, base):
        worker = self
        base_lost = base.connection_lost
        live, closed = self.live, self.rt.closed
        # With TLS uvicorn's own connection_made runs: it finds the sslcontext (scheme https).
        made = asgi_protocol.connection_made(base) if self.tls_context is None else None

        class PyforkHTTPProtocol(base):
            _pf_reported = False
            _pf_shut = False
            if made is not None:
                connection_made = made

            # Runs per connection: the base is called directly, report_closed is inlined.
            def connection_lost(self, exc):
                try:
                    base_lost(self, exc)
                finally:
                    if not self._pf_reported:
                        self._pf_reported = True
                        live.discard(self)
                        closed()

            def handle_websocket_upgrade(self, *args):
                super().handle_websocket_upgrade(*args)
                # The transport now talks to uvicorn's WebSocket protocol, so our
                # connection_lost will not run: have the new protocol report instead.
                new = self.transport.get_protocol()
                if new is not self:
                    inner = new.connection_lost

                    def connection_lost(exc, _inner=inner, _http=self):
                        try:
                            _inner(exc)
                        finally:
                            worker.report_closed(_http)

                    new.connection_lost = connection_lost

        PyforkHTTPProtocol.__name__ = PyforkHTTPProtocol.__qualname__ = "Pyfork" + base.__name__
        return PyforkHTTPProtocol

    def adopt(self, sock) -> None:
        protocol = self.protocol_class(self.config, self.state, self.lifespan.state, self.loop)
        if self.draining:
            protocol.app = _last_response_closes(self.request_app, protocol)
        self.live.add(protocol)
        if self.tls_context is not None:
            aio.adopt_socket(self.loop, self.connect_tasks, sock, protocol, self.report_closed, self.nodelay,
                             self.tls_context)
            return
        if self.edge.proxy_protocol:
            wrapper = aio_proxy.ProxyHeaderProtocol(protocol, self.edge, self.loop, self.report_closed)
            aio.adopt_socket(self.loop, self.connect_tasks, sock, wrapper,
                             lambda _wrapper: self.report_closed(protocol), self.nodelay)
            return
        if self.tcp_cork is not None:     # asyncio's loop: as adopt_fd does on uvloop
            fd = sock.fileno()
            try:
                self.tcp_cork(fd, True)
                protocol._pf_cork_fd = fd
            except OSError:
                pass    # not corked: served as usual
        aio.adopt_socket(self.loop, self.connect_tasks, sock, protocol, self.report_closed, self.nodelay)

    def adopt_fd(self, fd: int) -> None:
        """adopt() for a bare fd from rt.take_fds() (uvloop only, see aio.AcceptedFd);
        what adopt() and aio.adopt_socket() do, in one frame: it runs per connection."""
        protocol = self.protocol_class(self.config, self.state, self.lifespan.state, self.loop)
        if self.draining:
            protocol.app = _last_response_closes(self.request_app, protocol)
        self.live.add(protocol)
        if self.tcp_cork is not None:
            try:
                self.tcp_cork(fd, True)
                protocol._pf_cork_fd = fd
            except OSError:
                pass    # not corked: served as usual
        conn = aio.AcceptedFd(fd, self.conn_family)
        aio.Connect(self.loop, self.loop.connect_accepted_socket(lambda: protocol, conn), conn, protocol,
                    self.report_closed, self.connect_tasks)

    def start_serving(self) -> None:
        """After the lifespan startup: the app uvicorn's protocol gives each connection
        (`config.loaded_app`, which its __init__ reads) becomes the counted one. The
        lifespan task read the bare app when it started, so it keeps that one."""
        self.config.loaded_app = self.request_app

    def report_closed(self, protocol) -> None:
        if protocol._pf_reported:
            return
        protocol._pf_reported = True
        self.live.discard(protocol)
        self.rt.closed()

    def on_tick(self) -> None:
        _refresh_default_headers(self.config, self.state)
        if self.access is not None:
            self.access.tick(time.monotonic())

    def begin_drain(self) -> None:
        self.draining = True
        for protocol in self.live:
            protocol.app = _last_response_closes(self.request_app, protocol)
            _close_after_running(protocol)
        self.drain_deadline = self.loop.time() + self.config.timeout_keep_alive
        self.sweep()

    def sweep(self) -> None:
        """One drain pass over the open connections (see the module docstring)."""
        late = self.loop.time() >= self.drain_deadline
        for protocol in list(self.state.connections):
            if getattr(protocol, "_pf_shut", False):
                continue
            if not isinstance(protocol, self.protocol_class):
                # A WebSocket after an upgrade: uvicorn's shutdown() sends close 1012.
                protocol._pf_shut = True
                protocol.shutdown()
            elif late and _idle_untimed(protocol):
                protocol._pf_shut = True
                protocol.shutdown()  # between requests (shutdown() closes only then)
            # else: a request is in progress or may come; uvicorn's keep-alive timer
            # closes a kept-alive connection between requests.

    def idle(self) -> bool:
        return not self.live and not self.state.tasks and not self.connect_tasks


def serve(app, rt: Runtime) -> None:
    """Serves an ASGI 3 app with uvicorn's protocol until the worker has drained."""
    async def main(wakeup_write_fd: int) -> None:
        loop = asyncio.get_running_loop()
        worker = _Worker(app, rt, loop)
        await worker.lifespan.startup()
        if worker.lifespan.should_exit:
            raise RuntimeError("ASGI lifespan startup failed (see the uvicorn.error log above)")
        worker.start_serving()
        if worker.takes_fds:
            on_conn, take = worker.adopt_fd, rt.take_fds
        else:
            on_conn, take = worker.adopt, rt.take
        driver = aio.LoopDriver(rt, on_conn, on_tick=worker.on_tick, on_drain=worker.begin_drain,
                                wakeup_write_fd=wakeup_write_fd, take=take)
        driver.start()
        try:
            await driver.drain_started.wait()
            while not worker.idle():
                await asyncio.sleep(DRAIN_POLL)
                worker.sweep()
        finally:
            driver.stop()
            if worker.access is not None:
                worker.access.close()      # a graceful stop loses no line
            if worker.rejection_counter is not None:
                logging.getLogger("uvicorn.error").removeFilter(worker.rejection_counter)
        await worker.lifespan.shutdown()

    aio.run(main, rt)
