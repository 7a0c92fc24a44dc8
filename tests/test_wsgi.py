"""The WSGI interface (pyfork.serve.wsgi) in a forked worker, spoken to over real sockets.

Each test forks one worker (tests/wsgi_harness.py) running serve(app, rt) on a loopback
listener, talks HTTP to it, then stops it with SIGTERM; stopping asserts that every socket
the worker took was reported closed and every request started also finished. Every test
also checks that the test process's open-fd count is unchanged (fd_guard). No timing
assertions: timeouts are configured short and only "it happens within LIVENESS" is checked.
"""
import io
import json
import os
import signal
import sys
import time

import pytest

from pyfork.serve import http1, wsgi
from pyfork.serve.http1 import Limits


import wsgi_harness as H
pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(120)]

SENDFILE_CALLS = [0]


def app(environ, start_response):
    """One app, routed by path, for every test here."""
    path = environ["PATH_INFO"]
    query = dict(p.split("=", 1) for p in environ["QUERY_STRING"].split("&") if "=" in p)
    if path.startswith("/env"):
        body = environ["wsgi.input"].read()
        out = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int, tuple))}
        out["body"] = body.decode("latin-1")
        out["has_errors_write"] = hasattr(environ["wsgi.errors"], "write")
        out["file_wrapper"] = environ["wsgi.file_wrapper"] is wsgi.FileWrapper
        data = json.dumps(out).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [data]
    if path == "/echo":
        body = environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("X-Path", environ["RAW_URI"])])
        return [body]
    if path == "/hello":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"Hello, ", b"world!"]
    if path == "/pid":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [str(os.getpid()).encode()]
    if path == "/stream":
        n, size = int(query.get("n", "3")), int(query.get("size", "5"))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (bytes([65 + i % 26]) * size for i in range(n))
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        write(b"early; ")
        return [b"then returned"]
    if path == "/file":
        f = open(query["path"], "rb")
        f.seek(int(query.get("offset", "0")))
        headers = [("Content-Type", "application/octet-stream")]
        if "length" in query:
            headers.append(("Content-Length", query["length"]))
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](f, 8192)
    if path == "/bytesio":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"x" * 20000), 4096)
    if path == "/sendfile-calls":
        start_response("200 OK", [])
        return [str(SENDFILE_CALLS[0]).encode()]
    if path == "/error":
        raise RuntimeError("boom (expected by the test)")
    if path == "/error-late":
        def gen():
            yield b"first part"
            raise RuntimeError("late boom (expected by the test)")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path == "/exc-info":
        start_response("200 OK", [("Content-Type", "text/plain")])
        try:
            raise ValueError("replaced (expected by the test)")
        except ValueError:
            start_response("500 Internal Server Error", [("X-Handled", "yes")], sys.exc_info())
        return [b"handled"]
    if path == "/inject":
        start_response("200 OK", [("X-Bad", "a\r\nInjected: yes")])
        return [b"never"]
    if path == "/short":
        start_response("200 OK", [("Content-Length", "10")])
        return [b"12345"]
    if path == "/long":
        start_response("200 OK", [("Content-Length", "3")])
        return [b"12345"]
    if path == "/no-content":
        start_response("204 No Content", [])
        return []
    if path == "/empty-gen":
        start_response("200 OK", [])
        return (b"" for _ in range(3))
    if path == "/hold":
        H.notify(b"H")
        H.wait_release()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"held"]
    start_response("404 Not Found", [("Content-Type", "text/plain")])
    return [b"not found"]


@pytest.fixture
def worker():
    w = H.Worker(app)
    try:
        yield w
    except BaseException:
        w.kill()
        raise
    w.stop()


def serve_with(limits):
    return H.Worker(app, limits=limits)


def get(path, extra=b"", version=b"1.1"):
    return b"GET " + path.encode() + b" HTTP/" + version + b"\r\nHost: test\r\n" + extra + b"\r\n"


def env_of(resp):
    assert resp.status == 200, resp
    return json.loads(resp.body)


# -- sans-IO helpers ----------------------------------------------------------------------
@pytest.mark.parametrize("status, headers, error", [
    ("200", [], ValueError),                                # no reason phrase separator
    (b"200 OK", [], ValueError),
    ("200 OK\r\nX: y", [], ValueError),
    ("200 OK", [("X-A", "b\nc")], ValueError),
    ("200 OK", [("X A", "b")], ValueError),
    ("200 OK", [("X-A", 5)], ValueError),
    ("200 OK", [(5, "x")], ValueError),
    ("200 OK", [("X-A", "\u20ac")], UnicodeEncodeError),     # not latin-1
    ("200 OK", [("Content-Length", "1x")], ValueError),
    ("101 Switching Protocols", [], ValueError),
])
def test_render_head_rejects(status, headers, error):
    with pytest.raises(error):
        http1.render_head(status, headers, True, True, None, False)


def test_render_head_framing():
    head, mode, length, keep, send = http1.render_head(
        "200 OK", [("Connection", "close"), ("Transfer-Encoding", "chunked"), ("X-A", "1")],
        True, True, 5, False)
    assert (mode, length, keep, send) == (http1.MODE_LENGTH, 5, False, True)
    assert b"Transfer-Encoding" not in head and b"Content-Length: 5\r\n" in head
    assert head.endswith(b"Connection: close\r\n\r\n") and b"\r\nX-A: 1\r\n" in head
    _, mode, _, keep, _ = http1.render_head("200 OK", [], False, True, None, False)
    assert (mode, keep) == (http1.MODE_CLOSE, False)        # HTTP/1.0, unknown length
    head, mode, _, _, send = http1.render_head("304 Not Modified", [("Content-Length", "9")],
                                               True, True, None, False)
    assert mode == http1.MODE_NONE and not send and b"Content-Length: 9" in head


def test_http_date_is_imf_fixdate():
    """The Date header's formatter gives what email.utils.formatdate(usegmt=True) gives
    for whole seconds (date_line passes those): across a leap day, year ends, every
    weekday and month, and now."""
    from email.utils import formatdate
    from pyfork.serve.http1.response import http_date
    stamps = [0, 784111777, 951782400, 951868799, 1704067199, 1704067200, 4102444800, int(time.time())]
    stamps += [1700000000 + k * 86400 * 31 + k * 3607 for k in range(40)]
    for t in stamps:
        assert http_date(t) == formatdate(t, usegmt=True), t
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"   # RFC 9110's example


def test_split_target():
    assert http1.split_target(b"/a/b?x=1#frag") == (b"/a/b", b"x=1", None)
    assert http1.split_target(b"http://u:p@h:1/p?q") == (b"/p", b"q", b"h:1")
    assert http1.split_target(b"http://h") == (b"/", b"", b"h")
    assert http1.split_target(b"*") == (b"*", b"", None)
    assert http1.split_target(b"h:443") == (b"", b"", b"h:443")


# -- detection and configuration ----------------------------------------------------------
def test_detect():
    def plain(environ, start_response):
        return []

    async def coro(environ, start_response):
        return []

    class Callable:
        def __call__(self, environ, start_response):
            return []

    def three(scope, receive, send):
        return None

    assert wsgi.detect(plain) and wsgi.detect(Callable()) and wsgi.detect(app)
    assert not wsgi.detect(coro) and not wsgi.detect(three) and not wsgi.detect("x")
    assert wsgi.NAME == "wsgi"


def test_limits_from_env():
    limits = Limits.from_env({"PYFORK_MAX_BODY": "2048", "PYFORK_KEEPALIVE_TIMEOUT": "0.5",
                              "PYFORK_REQUEST_TIMEOUT": "7"})
    assert (limits.max_body, limits.keepalive_timeout, limits.request_timeout) == (2048, 0.5, 7.0)
    assert Limits.from_env({}).max_body == 1 << 20
    with pytest.raises(ValueError, match="PYFORK_MAX_BODY"):
        Limits.from_env({"PYFORK_MAX_BODY": "lots"})
    with pytest.raises(ValueError, match="PYFORK_REQUEST_TIMEOUT"):
        Limits.from_env({"PYFORK_REQUEST_TIMEOUT": "0"})


def test_max_body_from_environment():
    with H.Worker(app, env={"PYFORK_MAX_BODY": "100"}) as w:
        resp, closed = H.request(w.addr, b"POST /echo HTTP/1.1\r\nContent-Length: 101\r\n\r\n")
        assert resp.status == 413 and closed
        resp, _ = H.request(w.addr, b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n" + b"z" * 100)
        assert resp.status == 200 and resp.body == b"z" * 100


# -- environ -------------------------------------------------------------------------------
def test_environ(worker):
    with H.connect(worker.addr) as sock:
        sock.sendall(b"POST /env/a%2Fb%20c%C3%A9?x=1&y=%20 HTTP/1.1\r\nHost: example.org:81\r\n"
                     b"X-Dup: one\r\nX-Dup: two\r\nCookie: a=1\r\nCookie: b=2\r\n"
                     b"X_Under: spoofed\r\nContent-Type: text/plain\r\nContent-Length: 4\r\n"
                     b"User-Agent: t\t \r\n\r\nbody")
        env = env_of(H.Reader(sock).next())
        local_port = sock.getsockname()[1]
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/env/a/b c\u00c3\u00a9"       # percent-decoded, latin-1 (PEP 3333)
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["RAW_URI"] == "/env/a%2Fb%20c%C3%A9?x=1&y=%20"
    assert env["CONTENT_TYPE"] == "text/plain" and env["CONTENT_LENGTH"] == "4"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_CONTENT_LENGTH" not in env
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(worker.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"] == str(local_port)
    assert env["HTTP_HOST"] == "example.org:81"
    assert env["HTTP_X_DUP"] == "one,two"
    assert env["HTTP_COOKIE"] == "a=1; b=2"
    assert env["HTTP_USER_AGENT"] == "t"                   # trailing OWS trimmed
    assert not any("UNDER" in k for k in env)              # underscores dropped, as gunicorn
    assert env["wsgi.version"] == [1, 0] and env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multithread"] is False and env["wsgi.multiprocess"] is True
    assert env["wsgi.run_once"] is False and env["wsgi.input_terminated"] is True
    assert env["body"] == "body" and env["has_errors_write"] and env["file_wrapper"]


def test_environ_absolute_form_and_http10(worker):
    resp, closed = H.request(worker.addr, b"GET http://user@other.example:8080/env/x?q=1 HTTP/1.0\r\n"
                             b"Host: ignored.example\r\n\r\n")
    env = env_of(resp)
    assert closed
    assert env["PATH_INFO"] == "/env/x" and env["QUERY_STRING"] == "q=1"
    assert env["HTTP_HOST"] == "other.example:8080"        # RFC 9112 3.2.2: the target wins
    assert env["SERVER_PROTOCOL"] == "HTTP/1.0"
    assert "CONTENT_LENGTH" not in env


# -- connection management -----------------------------------------------------------------
def test_keep_alive(worker):
    with H.connect(worker.addr) as sock:
        reader = H.Reader(sock)
        ports = set()
        for i in range(3):
            sock.sendall(get(f"/env/{i}"))
            resp = reader.next()
            assert resp.header("connection") is None
            env = env_of(resp)
            assert env["PATH_INFO"] == f"/env/{i}"
            ports.add(env["REMOTE_PORT"])
        assert len(ports) == 1


def test_pipelining_in_order(worker):
    reqs = [get("/echo?1"), b"POST /echo?2 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            b"POST /echo?3 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            get("/stream?n=2&size=3"), get("/hello"), get("/echo?6", b"Connection: close\r\n"),
            get("/never")]
    with H.connect(worker.addr) as sock:
        sock.sendall(b"".join(reqs))
        reader = H.Reader(sock)
        got = [reader.next() for _ in range(6)]
        assert reader.next() is None                        # closed after the 6th
    assert [r.header("x-path") for r in got[:3]] == ["/echo?1", "/echo?2", "/echo?3"]
    assert [r.body for r in got] == [b"", b"hello", b"abc", b"AAABBB", b"Hello, world!", b""]
    assert got[3].header("transfer-encoding") == "chunked"
    assert got[5].header("connection") == "close"


def test_http10_close_and_keep_alive(worker):
    resp, closed = H.request(worker.addr, get("/hello", version=b"1.0"))
    assert resp.body == b"Hello, world!" and closed
    with H.connect(worker.addr) as sock:
        reader = H.Reader(sock)
        for _ in range(2):
            sock.sendall(get("/hello", b"Connection: keep-alive\r\n", version=b"1.0"))
            resp = reader.next()
            assert resp.header("connection") == "keep-alive" and resp.body == b"Hello, world!"
        sock.sendall(get("/stream?n=3&size=2", b"Connection: keep-alive\r\n", version=b"1.0"))
        resp = reader.next()                                # no length known: close-delimited
        assert resp.header("connection") == "close" and resp.body == b"AABBCC"
        assert resp.header("transfer-encoding") is None


def test_chunked_request_body(worker):
    raw = (b"POST /env HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"5;name=value\r\nhello\r\n1\r\n \r\nA; q=\"x y\"\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n")
    env = env_of(H.request(worker.addr, raw)[0])
    assert env["body"] == "hello 0123456789"
    assert env["CONTENT_LENGTH"] == "16" and "HTTP_TRANSFER_ENCODING" not in env


def test_expect_100_continue(worker):
    with H.connect(worker.addr) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        reader = H.Reader(sock)
        interim = reader.next()
        assert interim.status == 100                        # before we sent any body byte
        sock.sendall(b"hello")
        final = reader.next()
        assert final.status == 200 and final.body == b"hello"


def test_expect_100_continue_too_large_gets_413():
    with serve_with(Limits(max_body=1000)) as w:
        with H.connect(w.addr) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n")
            resp = H.Reader(sock).next()
            assert resp.status == 413 and resp.header("connection") == "close"


def test_head(worker):
    with H.connect(worker.addr) as sock:
        reader = H.Reader(sock)
        sock.sendall(b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n")
        head = reader.next(head_request=True)
        assert head.status == 200 and head.header("content-length") == "13"
        sock.sendall(b"HEAD /stream?n=5&size=1000 HTTP/1.1\r\nHost: t\r\n\r\n")
        head = reader.next(head_request=True)
        assert head.status == 200 and head.header("content-length") is None
        sock.sendall(get("/hello"))                         # no stray body bytes in between
        resp = reader.next()
        assert resp.body == b"Hello, world!"


def test_response_framing_edge_cases(worker):
    with H.connect(worker.addr) as sock:
        reader = H.Reader(sock)
        sock.sendall(get("/no-content"))
        resp = reader.next()
        assert resp.status == 204 and resp.header("content-length") is None
        assert resp.header("transfer-encoding") is None
        sock.sendall(get("/empty-gen"))
        resp = reader.next()
        assert resp.header("content-length") == "0" and resp.body == b""
        sock.sendall(get("/long"))                          # more than announced: truncated
        resp = reader.next()
        assert resp.body == b"123"
        sock.sendall(get("/write"))
        resp = reader.next()
        assert resp.body == b"written early; then returned"
        sock.sendall(get("/hello"))
        resp = reader.next()
        assert resp.header("server") == "pyfork"
        assert resp.header("date", "").endswith(" GMT")
    data = H.exchange(worker.addr, get("/short"))           # fewer than announced: closed
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\n12345")


def test_file_wrapper_uses_sendfile(monkeypatch, tmp_path):
    real = os.sendfile

    def counting(*args):
        SENDFILE_CALLS[0] += 1
        return real(*args)
    monkeypatch.setattr(os, "sendfile", counting)           # inherited by the forked worker
    payload = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(payload)
    with H.Worker(app) as w:
        with H.connect(w.addr) as sock:
            reader = H.Reader(sock)
            sock.sendall(get(f"/file?path={path}"))
            resp = reader.next()
            assert resp.header("content-length") == str(len(payload)) and resp.body == payload
            sock.sendall(get(f"/file?path={path}&offset=1000&length=5000"))
            resp = reader.next()
            assert resp.body == payload[1000:6000]
            sock.sendall(b"HEAD /file?path=" + str(path).encode() + b" HTTP/1.1\r\n\r\n")
            resp = reader.next(head_request=True)
            assert resp.status == 200
            sock.sendall(get("/sendfile-calls"))
            assert int(reader.next().body) >= 2
            sock.sendall(get("/bytesio"))                   # not a real file: iterated
            resp = reader.next()
            assert resp.body == b"x" * 20000 and resp.header("transfer-encoding") == "chunked"


def test_big_response_does_not_block_other_connections(worker):
    # 16 MiB: more than both loopback socket buffers hold (tcp_rmem/tcp_wmem max 6 + 4 MiB), so
    # the worker must park this response. (Shrinking SO_RCVBUF after connect() instead makes
    # the sender's silly-window avoidance crawl on the persist timer.)
    n, size = 256, 65536
    with H.connect(worker.addr) as slow:
        slow.sendall(get(f"/stream?n={n}&size={size}"))
        # the slow connection is not read yet; another one is still served meanwhile
        for _ in range(3):
            assert H.simple_get(worker.addr, "/hello").body == b"Hello, world!"
        resp = H.Reader(slow).next()
        assert len(resp.body) == n * size
        assert resp.body[:size] == b"A" * size and resp.body[-size:] == bytes([65 + (n - 1) % 26]) * size


# -- errors and limits ---------------------------------------------------------------------
def test_app_errors(worker):
    resp, closed = H.request(worker.addr, get("/error"))
    assert resp.status == 500 and closed
    resp, _ = H.request(worker.addr, get("/exc-info"))
    assert resp.status == 500 and resp.header("x-handled") == "yes" and resp.body == b"handled"
    resp, closed = H.request(worker.addr, get("/inject"))
    assert resp.status == 500 and closed and resp.header("injected") is None
    # an error after the head was sent: only closing tells the client (no final chunk)
    data = H.exchange(worker.addr, get("/error-late"))
    assert data.startswith(b"HTTP/1.1 200 OK") and b"first part" in data
    assert not data.endswith(b"0\r\n\r\n")
    assert H.simple_get(worker.addr, "/hello").status == 200


@pytest.mark.parametrize("raw, status", [
    (b"POST /echo HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", 413),
    (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"x" * 1001 + b"\r\n0\r\n\r\n", 413),
    (b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET /hello HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    (b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(9)), 431),
    (b"GET /" + b"u" * 5000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /" + b"u" * 5000, 414),                           # no CRLF yet: refused early
    (b"GET /hello HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /hello HTTP/2.0\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\nHost: a\n\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),   # a TLS hello
    (b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
])
def test_limits_and_malformed(raw, status):
    with serve_with(Limits(max_body=1000)) as w:
        data = H.exchange(w.addr, raw)
        assert data.startswith(b"HTTP/1.1 %d " % status), data[:200]
        assert b"\r\nConnection: close\r\n" in data
        assert H.simple_get(w.addr, "/hello").status == 200


def test_slow_clients_are_dropped():
    limits = Limits(request_timeout=0.3, keepalive_timeout=0.3, linger_timeout=0.3)
    with serve_with(limits) as w:
        for partial in (b"", b"GET /hello HTTP/1.1\r\nHost: x\r\n",
                        b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\n0123456789",
                        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"):
            with H.connect(w.addr) as sock:
                sock.sendall(partial)
                assert H.recv_all(sock) == b""              # closed by the server, no response
        with H.connect(w.addr) as sock:                     # idle keep-alive connection
            sock.sendall(get("/hello"))
            data = H.recv_all(sock)
            assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"Hello, world!")
        assert H.simple_get(w.addr, "/hello").status == 200


def test_request_sent_while_app_holds_the_loop_is_not_dropped():
    """A kept-alive connection whose idle deadline passes while the (single-threaded) worker is
    inside another request's app still gets its request served: the sweep reads before it
    closes. The sleep only makes the deadline pass during the hold; nothing is timed."""
    with serve_with(Limits(keepalive_timeout=0.2)) as w:
        with H.connect(w.addr) as kept, H.connect(w.addr) as busy:
            reader = H.Reader(kept)
            kept.sendall(get("/hello"))
            assert reader.next().status == 200
            busy.sendall(get("/hold"))
            w.wait_event(b"H")
            kept.sendall(get("/hello"))                     # arrives during the hold
            time.sleep(0.6)                                 # > keepalive_timeout
            w.release()
            assert H.Reader(busy).next().body == b"held"
            resp = reader.next()
            assert resp is not None and resp.body == b"Hello, world!"


# -- draining ------------------------------------------------------------------------------
def test_drain_closes_an_idle_keep_alive_connection_between_requests(worker):
    with H.connect(worker.addr) as sock:
        reader = H.Reader(sock)
        sock.sendall(get("/hello"))
        assert reader.next().status == 200
        stats = worker.stop()                               # closed by its keep-alive timeout
        assert reader.next() is None                        # closed without a response
    assert stats["taken"] == stats["closed"] == 1


def test_drain_answers_every_request_and_closes_after_the_last(worker):
    """In flight, new on a kept-alive connection, pipelined: all answered by the app (never
    503); the last response of each connection says `Connection: close`."""
    with H.connect(worker.addr) as kept, H.connect(worker.addr) as busy, H.connect(worker.addr) as piped:
        kept_reader, piped_reader = H.Reader(kept), H.Reader(piped)
        for sock, reader in ((kept, kept_reader), (piped, piped_reader)):
            sock.sendall(get("/hello"))
            assert reader.next().status == 200              # now a kept-alive connection
        busy.sendall(get("/hold"))
        worker.wait_event(b"H")                             # the worker is inside the app
        os.kill(worker.pid, signal.SIGTERM)                  # drain starts while in flight
        kept.sendall(get("/hello"))                         # a new request on a kept-alive conn
        piped.sendall(get("/hello") * 3)                    # pipelined
        worker.release()
        resp = H.Reader(busy).next()
        assert resp.status == 200 and resp.body == b"held"
        assert resp.header("connection") == "close"
        resp = kept_reader.next()
        assert resp.status == 200 and resp.header("connection") == "close"
        assert kept_reader.next() is None
        got = [piped_reader.next() for _ in range(3)]
        assert [r.status for r in got] == [200, 200, 200]
        assert [r.header("connection") for r in got] == [None, None, "close"]
        assert piped_reader.next() is None
        stats = worker.join()
    assert stats["started"] == 7                            # every request reached the app


# -- a real framework ----------------------------------------------------------------------
def flask_app():
    flask = pytest.importorskip("flask")
    fapp = flask.Flask("pyfork_wsgi_test")

    @fapp.route("/")
    def index():
        return "index page"

    @fapp.route("/user/<name>")
    def user(name):
        return flask.jsonify(name=name, args=flask.request.args.to_dict())

    @fapp.route("/json", methods=["POST"])
    def echo_json():
        return flask.jsonify(got=flask.request.get_json(), length=flask.request.content_length)

    @fapp.route("/form", methods=["POST"])
    def form():
        upload = flask.request.files.get("file")
        return {"a": flask.request.form["a"], "file": len(upload.read()) if upload else None}

    @fapp.route("/stream")
    def stream():
        def generate():
            for i in range(5):
                yield f"line {i}\n"
        return flask.Response(flask.stream_with_context(generate()), mimetype="text/plain")

    @fapp.route("/cookies")
    def cookies():
        resp = flask.make_response("cookies set")
        resp.set_cookie("one", "1")
        resp.set_cookie("two", "2")
        resp.headers["X-Custom"] = "custom value"
        return resp

    @fapp.route("/redirect")
    def redirect():
        return flask.redirect("/user/redirected")

    @fapp.route("/raw-body", methods=["PUT"])
    def raw_body():
        return flask.request.get_data()

    return fapp


def test_flask_app():
    requests = pytest.importorskip("requests")
    with H.Worker(flask_app()) as w, requests.Session() as s:
        base = f"http://127.0.0.1:{w.port}"
        r = s.get(base + "/")
        assert (r.status_code, r.text, r.headers["Content-Length"]) == (200, "index page", "10")
        r = s.get(base + "/user/ann?x=1&y=2")
        assert r.json() == {"name": "ann", "args": {"x": "1", "y": "2"}}
        assert s.get(base + "/missing").status_code == 404
        assert s.post(base + "/").status_code == 405
        r = s.post(base + "/json", json={"k": [1, 2, 3]})
        assert r.json() == {"got": {"k": [1, 2, 3]}, "length": 16}
        r = s.post(base + "/form", data={"a": "b"}, files={"file": ("f.bin", b"\0" * 50000)})
        assert r.json() == {"a": "b", "file": 50000}
        r = s.get(base + "/stream", stream=True)
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert list(r.iter_lines()) == [f"line {i}".encode() for i in range(5)]
        r = s.get(base + "/cookies")
        assert r.cookies.get("one") == "1" and r.cookies.get("two") == "2"
        assert r.headers["X-Custom"] == "custom value"
        assert len(r.raw.headers.getlist("Set-Cookie")) == 2
        r = s.get(base + "/redirect")
        assert r.json()["name"] == "redirected" and r.history[0].status_code == 302
        r = s.head(base + "/")
        assert r.status_code == 200 and r.headers["Content-Length"] == "10" and r.content == b""
        r = s.put(base + "/raw-body", data=iter([b"chunk", b"ed ", b"upload"]))   # chunked
        assert r.content == b"chunked upload"
        stats_conns = w.stop()["taken"]
    assert stats_conns == 1                                 # one kept-alive connection for all
