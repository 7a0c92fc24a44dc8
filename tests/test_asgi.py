"""The ASGI interface: a Starlette app served by uvicorn's protocol in a forked pyfork worker.

Each test forks worker(s) (tests/asgi_harness.py) on a real listening socket and
talks HTTP with requests or raw sockets. "Behaves as under uvicorn" is checked by sending
the same requests to a real `uvicorn.Server` on another socket and comparing status,
headers (minus Date) and bodies. Drain is driven by SIGTERM and synchronised with
pipe bytes, never with sleeps. Every test checks this process's open-fd count.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
import types

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from pyfork.serve import asgi, resolve

pytestmark = pytest.mark.timeout(180)


import asgi_harness as H
import net_harness as N

# (PYFORK_UVLOOP, PYFORK_ASGI_HTTP): the default pair and the fallback pair.
STACKS = [
    pytest.param({"PYFORK_UVLOOP": "1", "PYFORK_ASGI_HTTP": "httptools"}, id="uvloop-httptools"),
    pytest.param({"PYFORK_UVLOOP": "0", "PYFORK_ASGI_HTTP": "h11"}, id="asyncio-h11"),
]
ALL_STACKS = STACKS + [
    pytest.param({"PYFORK_UVLOOP": "0", "PYFORK_ASGI_HTTP": "httptools"}, id="asyncio-httptools"),
    pytest.param({"PYFORK_UVLOOP": "1", "PYFORK_ASGI_HTTP": "h11"}, id="uvloop-h11"),
]


# --------------------------------------------------------------------------- the app

LIFESPAN = {"startup": 0, "shutdown": 0}  # per process: each worker reports its own


@contextlib.asynccontextmanager
async def lifespan(app):
    LIFESPAN["startup"] += 1
    yield {"started_in_pid": os.getpid()}
    LIFESPAN["shutdown"] += 1


def report():
    return dict(LIFESPAN)


async def home(request):
    return JSONResponse({"hello": "world"})


async def item(request):
    return JSONResponse({"id": request.path_params["item_id"], "q": request.query_params.get("q")})


async def echo(request):
    data = await request.json()
    return JSONResponse({"got": data, "len": len(await request.body())}, status_code=201,
                        headers={"x-echo": "yes"})


async def stream(request):
    async def chunks():
        for i in range(5):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/plain")


async def headers(request):
    response = JSONResponse({"ua": request.headers.get("user-agent"),
                             "custom": request.headers.getlist("x-multi")})
    response.set_cookie("session", "abc", httponly=True)
    response.headers["x-reply"] = "1"
    return response


async def state(request):
    return JSONResponse({"started_in_pid": request.state.started_in_pid, "pid": os.getpid()})


async def head_only(request):
    return PlainTextResponse("body not sent for HEAD", headers={"x-head": "ok"})


async def empty(request):
    return Response(status_code=204)


async def boom(request):
    raise RuntimeError("app bug (expected by the test)")


async def nodelay(request):
    client = request.scope["client"]
    return JSONResponse({"nodelay": N.own_socket_option(client, socket.TCP_NODELAY), "client_port": client[1],
                         "pid": os.getpid()})


async def addr(request):
    scope = request.scope
    return JSONResponse({"server": scope["server"], "client": scope["client"], "scheme": scope["scheme"]})


async def big(request):
    # 8 MiB in 128 KiB parts: more than the socket buffers of a client that does not read
    # yet hold, so uvicorn's flow control pauses writing and waits (FlowControl.drain).
    part = bytes(range(256)) * 512

    async def parts():
        for _ in range(64):
            yield part

    return StreamingResponse(parts(), media_type="application/octet-stream")


async def hold(request):
    H.child_notify(b"H")
    await H.child_wait_release()
    return PlainTextResponse("held and done")


app = Starlette(routes=[
    Route("/", home),
    Route("/items/{item_id:int}", item),
    Route("/echo", echo, methods=["POST"]),
    Route("/stream", stream),
    Route("/headers", headers),
    Route("/state", state),
    Route("/head", head_only, methods=["GET", "HEAD"]),
    Route("/empty", empty),
    Route("/boom", boom),
    Route("/nodelay", nodelay),
    Route("/hold", hold),
    Route("/big", big),
    Route("/addr", addr),
], lifespan=lifespan)


# --------------------------------------------------------------------------- helpers

@pytest.fixture
def fds():
    before = H.fd_count()
    yield
    assert H.fd_count() == before


def start(env=None, nodelay=True, worker_id=1, lsock=None):
    own = lsock is None
    lsock = lsock or H.listener()
    worker = H.ForkedWorker(lsock, app, "asgi", env=env, nodelay=nodelay, report=report, worker_id=worker_id)
    if own:
        lsock.close()
    return worker


class UvicornChild:
    """The same app under a real uvicorn.Server (single process), for comparison."""

    def __init__(self):
        lsock = H.listener()
        self.port = lsock.getsockname()[1]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                import uvicorn
                lsock.setblocking(True)
                server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
                server.run(sockets=[lsock])
                code = 0
            finally:
                os._exit(code)
        self.pid = pid
        lsock.close()

    def stop(self):
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + H.LIVENESS
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                return
            time.sleep(0.02)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError("uvicorn child did not stop")


def http_exchange(client, base: str):
    """The request set used to compare pyfork with uvicorn: [(label, status, headers, body)]."""
    requests = [
        ("GET", "/", {}, None),
        ("GET", "/items/42?q=x%20y", {}, None),
        ("GET", "/items/notanint", {}, None),
        ("POST", "/echo", {"content-type": "application/json"}, json.dumps({"a": [1, 2, 3]}).encode()),
        ("GET", "/echo", {}, None),  # 405 from Starlette
        ("GET", "/stream", {}, None),
        ("GET", "/headers", {"user-agent": "pyfork-test", "x-multi": "1"}, None),
        ("HEAD", "/head", {}, None),
        ("GET", "/empty", {}, None),
        ("GET", "/missing", {}, None),
        # Last: after a 500 from a raising app uvicorn closes the connection without
        # `Connection: close`, so a request sent right after could meet a reset (as under uvicorn).
        ("GET", "/boom", {}, None),
    ]
    out = []
    for method, path, hdrs, body in requests:
        r = client.request(method, base + path, headers=hdrs, data=body)
        kept = sorted((k.lower(), v) for k, v in r.headers.items() if k.lower() != "date")
        out.append((f"{method} {path}", r.status_code, kept, r.content))
    return out


def raw_request(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def at_eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("env", STACKS)
def test_starlette_behaves_as_under_uvicorn(fds, env):
    worker = start(env)
    reference = UvicornChild()
    try:
        with H.Client() as client:
            ours = http_exchange(client, f"http://127.0.0.1:{worker.port}")
            theirs = http_exchange(client, f"http://127.0.0.1:{reference.port}")
        stats = worker.stop()
    finally:
        worker.kill()
        reference.stop()
    if env["PYFORK_ASGI_HTTP"] == "h11":
        # the reference runs uvicorn's default (httptools); h11 differs only in header order/case
        ours = [(label, status, sorted((k, v) for k, v in hdrs if k != "connection"), body)
                for label, status, hdrs, body in ours]
        theirs = [(label, status, sorted((k, v) for k, v in hdrs if k != "connection"), body)
                  for label, status, hdrs, body in theirs]
    assert ours == theirs
    by_label = {label: (status, dict(hdrs), body) for label, status, hdrs, body in ours}
    assert by_label["POST /echo"][0] == 201 and json.loads(by_label["POST /echo"][2])["got"] == {"a": [1, 2, 3]}
    assert by_label["GET /stream"][1]["transfer-encoding"] == "chunked"
    assert by_label["GET /stream"][2] == b"".join(f"chunk {i}\n".encode() for i in range(5))
    assert by_label["HEAD /head"][2] == b"" and by_label["HEAD /head"][1]["x-head"] == "ok"
    assert by_label["GET /boom"][0] == 500
    assert stats["extra"] == {"startup": 1, "shutdown": 1}
    H.assert_balanced(stats)
    assert stats["started"] == len(ours)


@pytest.mark.parametrize("env", ALL_STACKS)
def test_keepalive_and_tcp_nodelay(fds, env):
    # The runtime here does NOT set TCP_NODELAY, to prove the interface's sockets get it anyway.
    worker = start(env, nodelay=False)
    try:
        with H.Client() as client:
            replies = [client.get(f"http://127.0.0.1:{worker.port}/nodelay").json() for _ in range(5)]
        stats = worker.stop()
    finally:
        worker.kill()
    assert all(r["nodelay"] for r in replies), replies
    assert len({r["client_port"] for r in replies}) == 1  # one kept-alive connection
    assert stats["taken"] == 1 and stats["started"] == 5
    H.assert_balanced(stats)


def _addr_reply(port: int) -> tuple[dict, list]:
    """GET /addr on a fresh connection: the reply, and the client's own (host, port)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /addr HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        mine = list(sock.getsockname())
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body), mine


@pytest.mark.parametrize("env", ALL_STACKS)
def test_scope_addresses_as_under_uvicorn(fds, env):
    # pyfork reads the addresses the transport saved instead of uvicorn's per-connection
    # getsockname()/getpeername(): scope["server"]/["client"] must not change.
    worker = start(env)
    reference = UvicornChild()
    try:
        ours, our_client = _addr_reply(worker.port)
        theirs, their_client = _addr_reply(reference.port)
        stats = worker.stop()
    finally:
        worker.kill()
        reference.stop()
    assert ours == {"server": ["127.0.0.1", worker.port], "client": our_client, "scheme": "http"}
    assert theirs == {"server": ["127.0.0.1", reference.port], "client": their_client, "scheme": "http"}
    H.assert_balanced(stats)


@pytest.mark.parametrize("module, name", [("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
                                          ("uvicorn.protocols.http.h11_impl", "H11Protocol")])
def test_cheaper_connection_made_applies_to_this_uvicorn(module, name):
    """Our connection_made stands in for uvicorn's only while uvicorn's does what it was
    written against: with every uvicorn pyproject.toml allows (.ci/uvicorn-versions tests
    both ends) it must apply, and a class whose connection_made does more keeps its own."""
    import importlib

    from pyfork.serve import asgi_protocol

    base = getattr(importlib.import_module(module), name)
    assert asgi_protocol.connection_made(base) is not None

    class DoesMore(base):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.extra = True

    assert asgi_protocol.connection_made(DoesMore) is None


def test_lean_queues_apply_to_this_uvicorn():
    """pyfork's connection_made swaps the two empty deques of uvicorn's protocol for lists
    (asgi_protocol.lean_queues, ~1.4 kB per open connection): with this uvicorn and this
    Python it must apply (.ci/uvicorn-versions runs both ends of the pin), and what it
    swaps in must still behave as the deques did for uvicorn and asyncio."""
    from collections import deque

    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    from uvicorn.server import ServerState

    from pyfork.serve import asgi_protocol

    class Protocol(HttpToolsProtocol):
        connection_made = asgi_protocol.connection_made(HttpToolsProtocol)

    async def main():
        config = uvicorn.Config(app, log_level="warning")
        config.load()
        protocol = Protocol(config, ServerState(), {}, asyncio.get_running_loop())
        assert type(protocol.pipeline) is deque            # what uvicorn made
        ours, theirs = socket.socketpair()
        with theirs:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
                lambda: protocol, ours)
            try:
                pipeline, event = protocol.pipeline, protocol.flow._is_writable_event
                assert type(pipeline) is not deque and type(event._waiters) is list
                assert not pipeline and len(pipeline) == 0
                pipeline.appendleft("a")                    # first in, first out
                pipeline.appendleft("b")
                assert pipeline and len(pipeline) == 2 and list(pipeline) == ["b", "a"]
                assert pipeline.pop() == "a"
                pipeline.appendleft("c")
                assert [pipeline.pop(), pipeline.pop()] == ["b", "c"] and not pipeline
                with pytest.raises(IndexError):
                    pipeline.pop()
                event.clear()                               # a paused writer waits, then goes on
                waiter = asyncio.ensure_future(event.wait())
                await asyncio.sleep(0)
                assert len(event._waiters) == 1 and not waiter.done()
                event.set()
                assert await waiter is True and not event._waiters
            finally:
                transport.close()
                await asyncio.sleep(0)

    asyncio.run(main())

    # uvicorn and asyncio use these queues only in the ways the replacements support.
    import inspect
    import re

    from uvicorn.protocols.http import httptools_impl
    assert set(re.findall(r"\bself\.pipeline\.(\w+)", inspect.getsource(httptools_impl))) \
        <= {"appendleft", "pop"}
    assert set(re.findall(r"\bself\._waiters\.(\w+)", inspect.getsource(asyncio.Event))) \
        <= {"append", "remove"}

    # Anything but an empty deque is left alone.
    busy = types.SimpleNamespace(pipeline=deque(["x"]), flow=types.SimpleNamespace())
    asgi_protocol.lean_queues(busy)
    assert busy.pipeline == deque(["x"])


@pytest.mark.parametrize("env", STACKS)
def test_pipelined_requests_and_a_slow_reader_with_lean_queues(fds, env):
    """Pipelined requests (uvicorn's pipeline queue) are answered in order, and a response
    far larger than the socket buffers reaches a client that reads late (uvicorn's flow
    control pauses and resumes the writer) intact."""
    worker = start(env)
    piped = socket.create_connection(("127.0.0.1", worker.port), timeout=H.LIVENESS)
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.settimeout(H.LIVENESS)
    try:
        raw_request(piped, b"".join(b"GET /items/%d?q=p HTTP/1.1\r\nHost: t\r\n\r\n" % i
                                    for i in range(1, 6)))
        got = read_responses(piped, 5)
        assert [json.loads(body) for _, _, body in got] == [{"id": i, "q": "p"} for i in range(1, 6)]
        slow.connect(("127.0.0.1", worker.port))
        raw_request(slow, b"GET /big HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := slow.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert _unchunk(body) == bytes(range(256)) * 512 * 64
        piped.close()
        stats = worker.stop()
    finally:
        piped.close()
        slow.close()
        worker.kill()
    assert stats["taken"] == 2
    H.assert_balanced(stats)


def _unchunk(body: bytes) -> bytes:
    out, rest = [], body
    while True:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return b"".join(out)
        out.append(rest[:n])
        rest = rest[n + 2:]


def test_lifespan_once_per_worker(fds):
    lsock = H.listener()
    workers = []
    try:
        workers = [start(worker_id=i, lsock=lsock) for i in (1, 2)]
        lsock.close()
        seen = {}
        with H.Client(headers={"connection": "close"}) as client:
            for _ in range(20):
                reply = client.get(f"http://127.0.0.1:{workers[0].port}/state").json()
                seen[reply["pid"]] = reply["started_in_pid"]
        all_stats = [w.stop() for w in workers]
    finally:
        if lsock.fileno() != -1:
            lsock.close()
        for w in workers:
            w.kill()
    assert all(pid == started for pid, started in seen.items())  # lifespan state is the worker's own
    for stats in all_stats:
        assert stats["extra"] == {"startup": 1, "shutdown": 1}
        H.assert_balanced(stats)
    assert sum(s["taken"] for s in all_stats) == 20


@pytest.mark.parametrize("env", ALL_STACKS)
def test_drain(fds, env):
    """Draining fails no request: a request in flight finishes; a new request on a kept-alive
    connection, a request whose head was arriving and a fresh connection's first request are
    all answered by the app (never 503) with `Connection: close`, then the socket closes. No
    kept-alive connection is closed at the drain itself."""
    worker = start(env)
    conns = [socket.create_connection(("127.0.0.1", worker.port), timeout=H.LIVENESS) for _ in range(4)]
    busy, pending, idle, fresh = conns
    try:
        for sock in (pending, idle):  # make them kept-alive connections
            raw_request(sock, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, hdrs, _ = H.read_response(sock)
            assert status == 200 and hdrs.get("connection") != "close"
        raw_request(busy, b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        worker.wait_event(b"H")  # /hold is in flight
        raw_request(pending, b"GET /state HTTP/1.1\r\nHost: t\r\n")  # head not complete yet
        raw_request(fresh, b"GET /state HTTP/1.1\r\nHost: t\r\n")  # first request, head not complete
        worker.drain()
        worker.wait_event(b"D")  # the worker is draining now
        for sock in (idle, pending, fresh):
            raw_request(sock, b"GET /state HTTP/1.1\r\nHost: t\r\n\r\n" if sock is idle else b"\r\n")
            status, hdrs, body = H.read_response(sock)
            assert status == 200 and hdrs["connection"] == "close" and b"started_in_pid" in body, (status, hdrs)
            assert at_eof(sock)
        worker.release()
        status, hdrs, body = H.read_response(busy)
        assert (status, body) == (200, b"held and done")
        if hdrs.get("connection") != "close":  # its response was under way before the drain
            raw_request(busy, b"GET /state HTTP/1.1\r\nHost: t\r\n\r\n")
            status, hdrs, body = H.read_response(busy)
            assert status == 200 and hdrs["connection"] == "close", (status, hdrs)
        assert at_eof(busy)
        stats = worker.join()
    finally:
        for sock in conns:
            sock.close()
        worker.kill()
    assert stats["extra"] == {"startup": 1, "shutdown": 1}
    assert stats["taken"] == 4
    H.assert_balanced(stats)


def read_responses(sock, n):
    """n Content-Length responses read in order from one socket: [(status, headers, body)]."""
    buf, out = b"", []
    while len(out) < n:
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(out)} of {n} responses: {buf!r}"
            buf += chunk
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(hdrs.get("content-length", "0"))
        while len(buf) < length:
            chunk = sock.recv(65536)
            assert chunk, "connection closed mid-body"
            buf += chunk
        out.append((int(lines[0].split()[1]), hdrs, buf[:length]))
        buf = buf[length:]
    return out


@pytest.mark.parametrize("env", ALL_STACKS)
def test_drain_answers_pipelined_requests_and_closes_idle_between_requests(fds, env):
    """Pipelined requests that reach a draining worker are all answered, in order; only the
    last response says `Connection: close`. A kept-alive connection that stays silent is
    closed between requests (by the keep-alive timeout), and the worker then exits."""
    worker = start(env)
    piped = socket.create_connection(("127.0.0.1", worker.port), timeout=H.LIVENESS)
    silent = socket.create_connection(("127.0.0.1", worker.port), timeout=H.LIVENESS)
    try:
        for sock in (piped, silent):
            raw_request(sock, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert H.read_response(sock)[0] == 200
        worker.drain()
        worker.wait_event(b"D")
        raw_request(piped, b"GET /items/1 HTTP/1.1\r\nHost: t\r\n\r\n" * 3)
        got = read_responses(piped, 3)
        assert [status for status, _, _ in got] == [200, 200, 200]
        assert [h.get("connection") for _, h, _ in got] == [None, None, "close"], got
        assert at_eof(piped)
        assert at_eof(silent)  # closed by the keep-alive timer: between requests
        stats = worker.join()
    finally:
        piped.close()
        silent.close()
        worker.kill()
    assert stats["taken"] == 2
    H.assert_balanced(stats)


def test_drain_with_nothing_open_is_prompt(fds):
    worker = start()
    try:
        with H.Client() as client:
            assert client.get(f"http://127.0.0.1:{worker.port}/").status_code == 200
        stats = worker.stop()
    finally:
        worker.kill()
    H.assert_balanced(stats)


class _FakeWebSocket:
    """Stands in for uvicorn's WebSocket protocol (no websockets library in the venv)."""

    def __init__(self, config, server_state, app_state):
        self.server_state = server_state

    def connection_made(self, transport):
        self.transport = transport
        self.server_state.connections.add(self)

    def data_received(self, data):
        if data.startswith(b"GET /ws"):
            self.transport.write(b"UPGRADED\n")
        elif data == b"bye":
            self.transport.close()

    def eof_received(self):
        return None

    def connection_lost(self, exc):
        self.server_state.connections.discard(self)

    def shutdown(self):
        self.transport.close()


@pytest.mark.parametrize("env", STACKS)
def test_websocket_upgrade_reports_close_once(fds, env, monkeypatch):
    """In-process: after an upgrade, rt.closed() still runs exactly once, from the new protocol."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    async def plain(scope, receive, send):
        if scope["type"] == "lifespan":
            raise RuntimeError("no lifespan")  # lifespan=auto: treated as unsupported

    async def main():
        loop = asyncio.get_running_loop()
        lsock = H.listener()
        rt = H.FakeRuntime(lsock)
        try:
            worker = asgi._Worker(plain, rt, loop)
            worker.config.ws_protocol_class = _FakeWebSocket
            client = socket.create_connection(lsock.getsockname())
            client.setblocking(False)
            try:
                socks = []
                while not socks:
                    socks = rt.take()
                    await asyncio.sleep(0.01)
                worker.adopt(socks[0])
                await loop.sock_sendall(client, b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n"
                                                b"Connection: Upgrade\r\nSec-WebSocket-Key: x\r\n"
                                                b"Sec-WebSocket-Version: 13\r\n\r\n")
                assert await asyncio.wait_for(loop.sock_recv(client, 100), H.LIVENESS) == b"UPGRADED\n"
                await loop.sock_sendall(client, b"bye")
                assert await asyncio.wait_for(loop.sock_recv(client, 100), H.LIVENESS) == b""
                while worker.live:
                    await asyncio.sleep(0.01)
            finally:
                client.close()
        finally:
            lsock.close()
            os.close(rt._wake_r)
            os.close(rt._wake_w)
        return rt.stats()

    stats = asyncio.run(main())
    assert stats["taken"] == 1 and stats["closed"] == 1


def test_lifespan_startup_failure_fails_the_worker(fds):
    async def failing(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.failed", "message": "no database (expected by the test)"})

    lsock = H.listener()
    worker = H.ForkedWorker(lsock, failing, "asgi")
    lsock.close()
    try:
        with pytest.raises(AssertionError, match="lifespan startup failed"):
            worker.join()
    finally:
        worker.kill()


def test_detect_and_resolve():
    async def asgi3(scope, receive, send):
        pass

    class App:
        async def __call__(self, scope, receive, send):
            pass

    class Asgi2:
        def __init__(self, scope):
            pass

        async def __call__(self, receive, send):
            pass

    async def two(reader, writer):
        pass

    def wsgi(environ, start_response):
        pass

    assert asgi.detect(asgi3) and asgi.detect(App()) and asgi.detect(app)
    assert not asgi.detect(Asgi2) and not asgi.detect(two) and not asgi.detect(wsgi)
    assert resolve(app) is asgi and resolve(App()) is asgi
    assert resolve(asgi3, "asgi") is asgi


def test_resolve_errors_and_explicit_names():
    async def two(reader, writer):
        pass

    with pytest.raises(ValueError, match="unknown interface 'http2'.*asgi, asyncio, wsgi, raw"):
        resolve(two, "http2")
    with pytest.raises(ValueError, match="Accepted signatures"):
        resolve(42)
    with pytest.raises(ValueError, match="Accepted signatures"):
        resolve(lambda a, b, c, d: None)

    def declared(a, b):
        pass

    declared.pyfork_interface = "asyncio"
    assert resolve(declared).NAME == "asyncio"
    assert resolve(two).NAME == "asyncio"
    assert resolve(two, None).NAME == "asyncio"


def test_with_the_shipped_standalone_runtime(fds):
    pytest.importorskip("pyfork.worker.standalone").StandaloneRuntime  # noqa: B018 (supervisor's helper)
    lsock = H.listener()
    worker = H.ForkedWorker(lsock, app, "asgi", runtime="standalone", report=report)
    lsock.close()
    try:
        with H.Client() as client:
            for _ in range(3):
                assert client.get(f"http://127.0.0.1:{worker.port}/").json() == {"hello": "world"}
        stats = worker.stop()
    finally:
        worker.kill()
    assert stats["extra"] == {"startup": 1, "shutdown": 1}
    assert stats["taken"] == 1 and stats["started"] == 3
    H.assert_balanced(stats)
