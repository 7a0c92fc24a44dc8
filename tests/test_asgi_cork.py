"""How ASGI responses leave the worker under `pyfork serve` (pyfork/serve/asgi.py,
asgi_protocol.py): TCP_CORK, and one write per response.

A connection whose response ends with a close is served corked, so the head, body
and FIN leave together; everything a client waits for mid-exchange is not: keep-alive
responses, the interim `100 Continue`, and the parts of a streaming response. The app
below reads its own socket's TCP_CORK (found through /proc/self/fd by the client's
address) while it serves, so each case is asserted on the option itself, never on
timing. A kept-alive response's head and body leave in one write: the client counts
the data segments it received (TCP_INFO), and a head whose body comes only later still
leaves at once. Runs the real supervisor and worker runtime, with each backend, on
uvloop and on asyncio's own loop.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import textwrap
import time

import pytest

import net_harness as N

pytestmark = pytest.mark.timeout(120)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))   # the app imports net_harness from here

APP = textwrap.dedent('''
    import gc, json, socket

    from net_harness import own_socket_option  # tests/ is on PYTHONPATH

    def cork_of(client):
        return own_socket_option(client, socket.TCP_CORK)

    LEFT = [0]    # /left requests whose client left before any response

    async def read_body(receive):
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                return body

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] == "/gc":
            # Objects the cyclic GC has freed in this worker so far (this collect included).
            gc.collect()
            found = sum(s["collected"] for s in gc.get_stats())
            body = json.dumps({"collected": found, "left": LEFT[0]}).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        if scope["path"] == "/left":
            # Waits for the client to leave (http.disconnect), then returns without a response.
            while (await receive())["type"] != "http.disconnect":
                pass
            LEFT[0] += 1
            return
        if scope["path"] == "/closing":
            # A response that closes a connection the request wanted kept alive.
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"2"), (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        if scope["path"] == "/late":
            # The head first; the body once the client, which waits for the head before
            # it sends its request body, has sent it.
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"4")]})
            await send({"type": "http.response.body", "body": await read_body(receive) + b"!"})
            return
        body = await read_body(receive)
        head = {"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]}
        if scope["path"] == "/stream":
            await send(head)
            await send({"type": "http.response.body", "body": b"first\\n", "more_body": True})
            after = cork_of(scope["client"])
            await send({"type": "http.response.body", "body": json.dumps({"cork": after}).encode()})
            return
        reply = json.dumps({"cork": cork_of(scope["client"]), "len": len(body)}).encode()
        head["headers"].append((b"content-length", str(len(reply)).encode()))
        await send(head)
        await send({"type": "http.response.body", "body": reply})
''')


@pytest.fixture(params=["uvloop", "asyncio"])
def server(backend, tmp_path, request):
    """Served on uvloop (connections as bare fds) and on asyncio's own loop (sockets)."""
    (tmp_path / "cork_app.py").write_text(APP)
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pyfork", "serve", "cork_app:app", "--interface", "asgi",
                             "-w", "1", "-b", f"127.0.0.1:{port}", "--backend", backend.BACKEND],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                            env={**os.environ, "PYFORK_UVLOOP": "1" if request.param == "uvloop" else "0",
                                 "PYFORK_ASGI_HTTP": "httptools",
                                 "PYTHONPATH": TESTS_DIR, "PYFORK_EVENTS": str(N.events_file(tmp_path))})
    try:
        deadline = time.monotonic() + N.LIVENESS
        while N.count_events(N.events_file(tmp_path), "ready") < 1:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        yield port
        proc.terminate()
        assert proc.wait(N.LIVENESS) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exchange(port: int, request: bytes) -> bytes:
    """Sends `request` on a new connection and reads until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=N.LIVENESS) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _read_head(sock) -> bytes:
    """Reads until a response head is complete (and whatever came with it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1024)
        assert chunk, data
        data += chunk
    return data


def _json_body(data: bytes) -> dict:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), data[:200]
    assert b" 200 " in head.split(b"\r\n")[0], head
    return json.loads(body)


@pytest.mark.usefixtures("fd_guard")
def test_close_responses_are_corked_and_complete(server):
    got = _json_body(_exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    assert got == {"cork": 1, "len": 0}
    # HTTP/1.0 without keep-alive also ends with a close.
    got = _json_body(_exchange(server, b"GET / HTTP/1.0\r\nHost: t\r\n\r\n"))
    assert got == {"cork": 1, "len": 0}
    body = b"x" * 5000
    got = _json_body(_exchange(server, b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                                       b"Content-Length: 5000\r\n\r\n" + body))
    assert got == {"cork": 1, "len": 5000}


@pytest.mark.usefixtures("fd_guard")
def test_keepalive_is_not_corked(server):
    with socket.create_connection(("127.0.0.1", server), timeout=N.LIVENESS) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = N.read_response(sock)
            assert status == 200 and json.loads(body) == {"cork": 0, "len": 0}
        # The last request of a kept-alive connection may ask for the close.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, body = N.read_response(sock)
        assert status == 200 and json.loads(body) == {"cork": 0, "len": 0}
        assert sock.recv(1) == b""


@pytest.mark.usefixtures("fd_guard")
def test_expect_continue_is_not_corked(server):
    with socket.create_connection(("127.0.0.1", server), timeout=N.LIVENESS) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 3\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = _read_head(sock)
        assert interim.startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"abc")
        data = interim.partition(b"\r\n\r\n")[2]
        while chunk := sock.recv(65536):
            data += chunk
    assert _json_body(data) == {"cork": 0, "len": 3}


@pytest.mark.usefixtures("fd_guard")
def test_streaming_uncorks_at_its_first_part(server):
    data = _exchange(server, b"GET /stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    parts = []
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        parts.append(rest[:n])
        body = rest[n + 2:]
        if n == 0:
            break
    assert parts[0] == b"first\n"
    assert json.loads(parts[1]) == {"cork": 0}


@pytest.mark.usefixtures("fd_guard")
def test_no_cyclic_garbage_per_request(server, request):
    # A connection's objects (protocol, transport, request cycle) are freed by reference
    # counting, as under uvicorn: a reference cycle per request would cost a GC pass
    # every few hundred requests. asyncio's own socket transport keeps a bound method of
    # itself (_read_ready_cb), one cycle per connection under any server, so there only
    # the kept-alive requests are held to "no cycle per request".
    def collected():
        return _json_body(_exchange(server, b"GET /gc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))["collected"]

    before = collected()
    for _ in range(100):
        _json_body(_exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    mid = collected()                 # 101 connections, one request each
    with socket.create_connection(("127.0.0.1", server), timeout=N.LIVENESS) as sock:
        for _ in range(100):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert N.read_response(sock)[0] == 200
    after = collected()               # 2 connections, 101 requests
    if request.node.callspec.params["server"] == "uvloop":
        assert mid == before and after == mid
    else:
        per_connection = (mid - before) / 101
        assert after - mid <= 2 * per_connection


def _data_segments_in(sock) -> int:
    """tcpi_data_segs_in of `sock` (Linux struct tcp_info): segments with data it received."""
    return struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256), 152)[0]


@pytest.mark.usefixtures("fd_guard")
def test_a_kept_alive_response_is_one_segment(server):
    # uvicorn writes the head and the body apart: two segments a response. Here the
    # body part goes out with the head it follows (asgi_protocol.head_with_body).
    with socket.create_connection(("127.0.0.1", server), timeout=N.LIVENESS) as sock:
        for _ in range(3):
            before = _data_segments_in(sock)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = N.read_response(sock)
            assert status == 200 and json.loads(body) == {"cork": 0, "len": 0}
            assert _data_segments_in(sock) - before == 1


@pytest.mark.usefixtures("fd_guard")
def test_a_head_whose_body_comes_later_is_not_held(server):
    with socket.create_connection(("127.0.0.1", server), timeout=N.LIVENESS) as sock:
        for _ in range(2):          # kept alive: the next request gets the same treatment
            sock.sendall(b"POST /late HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n")
            head = _read_head(sock)     # the app sends its body only after ours
            assert head.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"abc")
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < 4:
                chunk = sock.recv(1024)
                assert chunk, body
                body += chunk
            assert body == b"abc!"


@pytest.mark.usefixtures("fd_guard")
def test_a_head_request_whose_response_closes_gets_its_head(server):
    # A HEAD response writes no body: its held head must go out before the close.
    data = _exchange(server, b"HEAD /closing HTTP/1.1\r\nHost: t\r\n\r\n")
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 200 ") and b"connection: close" in head, data
    data = _exchange(server, b"GET /closing HTTP/1.1\r\nHost: t\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok"), data


@pytest.mark.usefixtures("fd_guard")
def test_no_cyclic_garbage_when_clients_leave_before_the_response(server, request):
    # A request whose client leaves before its response starts writes nothing: what the
    # one-write holder keeps for it must still be freed by reference counting.
    def gc_stats():
        return _json_body(_exchange(server, b"GET /gc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))

    before = gc_stats()
    for _ in range(20):
        _json_body(_exchange(server, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    mid = gc_stats()                  # 21 connections served, for asyncio's per-connection cycle
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", server), timeout=N.LIVENESS) as sock:
            sock.sendall(b"GET /left HTTP/1.1\r\nHost: t\r\n\r\n")
    deadline = time.monotonic() + N.LIVENESS
    while (after := gc_stats())["left"] < 20:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    grew = after["collected"] - mid["collected"]
    if request.node.callspec.params["server"] == "uvloop":
        assert mid["collected"] == before["collected"] and grew == 0
    else:
        assert grew <= mid["collected"] - before["collected"] + 2
