"""Test support for the wsgi/raw/conformance/fuzz tests: a forked worker and a raw client.

Theory of operation: `Worker` forks a child that runs `pyfork.serve.<wsgi|raw>.serve(app, rt)`
on a listening socket the parent made, with rt = pyfork.worker.standalone.StandaloneRuntime (the
worker-runtime contract without a primary). SIGTERM in the child only records (rt.stop():
draining = True plus a byte on the runtime's wakeup pipe); serve() then drains and returns, and the child writes the
runtime's counters as JSON on a pipe and `_exit`s. The parent checks that every socket taken
was reported closed and every request started also finished.

Synchronisation without sleeps: the child writes b"S" on the events pipe once its handler is
installed; test apps can write their own bytes (`notify`) and block until the parent releases
them (`wait_release`), e.g. to hold a request in flight while the parent starts a drain.

The client side speaks HTTP with plain sockets: `exchange()` sends bytes as they are, half-
closes, and reads to EOF; `read_response()` parses one response (Content-Length, chunked, or
to EOF) so pipelined responses can be checked one by one.

This file holds no tests; the pipes and fd counting are shared with asgi_harness (net_harness.py).
"""
import json
import os
import pathlib
import random
import select
import signal
import socket
import time

from net_harness import CHILD, LIVENESS, ForkedChild, StopOnExit, fd_count as fd_count
from net_harness import listener as net_listener


def listener(family=socket.AF_INET):
    return net_listener(family, backlog=256)


def notify(byte):
    """From an app in the child: tell the parent something happened."""
    os.write(CHILD["events_w"], byte)


def wait_release():
    """From an app in the child: block until the parent calls Worker.release()."""
    os.read(CHILD["release_r"], 1)


class Worker(ForkedChild, StopOnExit):
    """A forked child serving `app` with one interface module on a fresh listener."""

    def __init__(self, app, interface="wsgi", limits=None, env=None):
        listen = listener()
        self.port = listen.getsockname()[1]
        self.addr = ("127.0.0.1", self.port)

        def run_child(events_w):
            os.environ.update(env or {})
            import importlib
            module = importlib.import_module("pyfork.serve." + interface)
            from pyfork.worker.standalone import StandaloneRuntime
            rt = StandaloneRuntime(listen)

            # stop() only records (draining = True) and writes its wakeup pipe, which is
            # what signal.set_wakeup_fd would do; the loop acts on it
            signal.signal(signal.SIGTERM, lambda signum, frame: rt.stop())
            os.write(events_w, b"S")
            if limits is not None:
                module.serve(app, rt, limits)
            else:
                module.serve(app, rt)
            return {"taken": rt.taken, "closed": rt.closed_count, "started": rt.started,
                    "finished": rt.finished, "ticks": rt.ticks, "pid": os.getpid()}

        self._fork(run_child)
        listen.close()
        self.wait_event(b"S")

    def events_now(self):
        """Every byte apps have notify()-ed so far and not yet read (non-blocking)."""
        out = b""
        while select.select([self.events_r], [], [], 0)[0]:
            data = os.read(self.events_r, 65536)
            if not data:
                break
            out += data
        return out

    def alive(self):
        return os.waitpid(self.pid, os.WNOHANG) == (0, 0)

    def stop(self, timeout=LIVENESS):
        """SIGTERM, wait for the child to drain and exit; returns its counters."""
        if self.stats is not None:
            return self.stats
        os.kill(self.pid, signal.SIGTERM)
        return self.join(timeout)

    def join(self, timeout=LIVENESS):
        deadline = time.monotonic() + timeout
        data = b""
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.stats_r], [], [], left)[0]:
                    raise TimeoutError("worker did not exit after SIGTERM")
                chunk = os.read(self.stats_r, 65536)
                if not chunk:
                    break
                data += chunk
            _, status = os.waitpid(self.pid, 0)
        except BaseException:
            self.kill()
            raise
        finally:
            self._close_pipes()
        self.stats = json.loads(data) if data else {"error": "no stats"}
        self.stats["status"] = status
        assert "error" not in self.stats, self.stats.get("error")
        assert os.waitstatus_to_exitcode(status) == 0, self.stats
        assert self.stats["taken"] == self.stats["closed"], self.stats
        assert self.stats["started"] == self.stats["finished"], self.stats
        return self.stats


# -- client side ---------------------------------------------------------------------------
def connect(addr, timeout=LIVENESS):
    sock = socket.create_connection(addr, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_all(sock, limit=1 << 24):
    """Read until EOF (or a reset, which also ends the conversation)."""
    chunks = []
    size = 0
    while size < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        size += len(data)
    return b"".join(chunks)


def exchange(addr, data, half_close=True, timeout=LIVENESS):
    """Send `data` as is on a new connection, half-close, return everything received."""
    with connect(addr, timeout) as sock:
        try:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return recv_all(sock)


class Response:
    def __init__(self, status, reason, headers, body, raw_head):
        self.status = status
        self.reason = reason
        self.headers = headers          # list of (lower-case name, value) str
        self.body = body
        self.raw_head = raw_head

    def header(self, name, default=None):
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def header_list(self, name):
        return [v for k, v in self.headers if k == name.lower()]

    def __repr__(self):
        return f"<Response {self.status} {self.headers} {self.body[:80]!r}>"


class Reader:
    """Parses responses off a byte stream: `next(head_request=False)`."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _fill(self):
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _line(self):
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed mid-line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _take(self, n):
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed mid-body")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def next(self, head_request=False):
        """The next final response (1xx ones are returned too, as they come)."""
        while not self.buf and not self.eof:
            self._fill()
        if not self.buf and self.eof:
            return None
        status_line = self._line()
        version, status, reason = status_line.decode("latin-1").split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = []
        raw = [status_line]
        while True:
            line = self._line()
            if not line:
                break
            raw.append(line)
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower(), value.strip()))
        resp = Response(int(status), reason, headers, b"", b"\r\n".join(raw))
        code = int(status)
        if head_request or code < 200 or code in (204, 304):
            return resp
        if resp.header("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    while self._line():
                        pass
                    break
                parts.append(self._take(size))
                assert self._take(2) == b"\r\n"
            resp.body = b"".join(parts)
        elif resp.header("content-length") is not None:
            resp.body = self._take(int(resp.header("content-length")))
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp


def request(addr, raw, head_request=False, timeout=LIVENESS):
    """One request on a fresh connection; returns (response, whether the server closed)."""
    with connect(addr, timeout) as sock:
        sock.sendall(raw)
        reader = Reader(sock)
        resp = reader.next(head_request)
        while resp is not None and resp.status < 200:
            resp = reader.next(head_request)
        closed = resp is not None and resp.header("connection", "").lower() == "close"
        return resp, closed


def simple_get(addr, path="/", timeout=LIVENESS):
    raw = f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode()
    return request(addr, raw, timeout=timeout)[0]


# -- a deterministic mutation corpus for fuzzing -------------------------------------------
FUZZ_SEED = 20261127


def find_corpus():
    """The HTTP request corpus (gunicorn's parser vectors): $PYFORK_CONFORMANCE_DIR, else a
    copy in the repo (tests/conformance/http-requests), else the project's shared/ folder beside
    the checkout (../shared/conformance/http-requests, as laid out for developers and CI)."""
    explicit = os.environ.get("PYFORK_CONFORMANCE_DIR")
    if explicit:
        return pathlib.Path(explicit)            # only there, even if it is missing
    for candidate in (pathlib.Path(__file__).with_name("conformance") / "http-requests",
                      pathlib.Path(__file__).resolve().parents[2] / "shared" / "conformance" / "http-requests"):
        if (candidate / "valid").is_dir():
            return candidate
    return pathlib.Path("conformance-corpus-not-found")


CORPUS = find_corpus()

HAND_WRITTEN = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\nUser-Agent: fuzz\r\nAccept: */*\r\n\r\n",
    b"POST /submit?x=1 HTTP/1.1\r\nHost: h\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world",
    b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n4;a=b\r\nwiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://h:8080/p?q HTTP/1.1\r\nHost: h:8080\r\nConnection: close\r\n\r\n",
]
SPECIAL_BYTES = b"\r\n\t \x00:;,\x7f\x80\xff-0123456789abcdefABCDEF%/?#\"=_"
FIELD_LINES = [
    b"Transfer-Encoding: chunked", b"Content-Length: 5", b"Content-Length: -1",
    b"Content-Length: 99999999999999999999", b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: identity", b"Connection: close", b"Connection: keep-alive",
    b"Host: a", b" folded", b"X: \x01", b"Content-Length: 0", b"Expect: 100-continue",
    b"Upgrade: websocket\r\nConnection: upgrade", b"Content-Length: 3, 3",
]


def fuzz_seeds():
    out = list(HAND_WRITTEN)
    for path in sorted(CORPUS.glob("*/*.raw")):
        out.append(path.read_bytes())
    return out


def fuzz_mutate(rng, data):
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        n = len(data)
        pos = rng.randrange(n + 1)
        if op == 0 and n:
            pos = min(pos, n - 1)
            data = data[:pos] + bytes([rng.randrange(256)]) + data[pos + 1:]
        elif op == 1:
            data = data[:pos] + bytes([rng.choice(SPECIAL_BYTES)]) * rng.randint(1, 3) + data[pos:]
        elif op == 2:
            data = data[:pos] + data[pos + rng.randint(1, 8):]
        elif op in (3, 5):
            lines = data.split(b"\r\n")
            if len(lines) > 2:
                i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
                if op == 3:
                    lines.insert(i, lines[j])
                else:
                    lines[i], lines[j] = lines[j], lines[i]
                data = b"\r\n".join(lines)
        elif op == 4:
            data = data[:pos]
        elif op == 6:
            first = data.find(b"\r\n")
            if first >= 0:
                data = data[:first + 2] + rng.choice(FIELD_LINES) + b"\r\n" + data[first + 2:]
        elif op == 7:
            i = data.find(b"\r\n", pos)
            if i >= 0:
                data = data[:i] + rng.choice((b"\n", b"\r", b"\r\r\n", b"\n\r")) + data[i + 2:]
        elif op == 8:
            end = min(n, pos + rng.randint(1, 12))
            data = data[:pos] + data[pos:end].swapcase() + data[end:]
        else:
            i = pos
            while i < n and not (48 <= data[i] <= 57):
                i += 1
            j = i
            while j < n and 48 <= data[j] <= 57:
                j += 1
            if i < n:
                data = data[:i] + str(rng.choice((0, 1, 7, 255, 65536, 2**63, 2**70))).encode() + data[j:]
    return data


def fuzz_cases(count, seed=None):
    rng = random.Random(FUZZ_SEED if seed is None else seed)
    base = fuzz_seeds()
    return [fuzz_mutate(rng, rng.choice(base)) for _ in range(count)]
