"""Many open, active keep-alive connections do not lock out a new client (issue 18).

Issue 18: 2,100 keep-alive connections that each send a request every 0.5 s, so no idle
timeout frees them (as WebSocket or SSE clients hold theirs), locked a new client out of
the ASGI demo on 2 workers, because back-pressure counted open connections (1,000 per
worker), not work. Here 3,000 such connections, each sending its next request 2 s after
its last response (under the default 5 s keep-alive timeout), are held open by a
selectors loop in a thread, and a new client must be served beside them: WSGI and ASGI
with the primary dispatching (both backends), and with self-accepting workers
(shared/reuseport), whose own cap of open connections (MAX_OPEN in pyfork/worker/runtime.py)
was the same lock-out. The held connections must all stay open and answered throughout.
WebSockets held open beside plain HTTP are tests/test_limits.py's.

Real primaries and workers (tests/supervisor_harness.py), real sockets; liveness timeouts
only. The fd_guard fixture checks this process's open-fd count is back where it started.
"""

import heapq
import json
import os
import random
import resource
import selectors
import signal
import socket
import threading
import time

import pytest

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(240)]

N_ACTIVE = 3000            # above the old lock-out: 2 workers x 1,000 open connections
INTERVAL = 2.0             # s from a response to the connection's next request (keep-alive is 5 s)
REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
APPS = {"wsgi": "pyfork.demo:app", "asgi": "pyfork.demo:asgi_app"}


@pytest.fixture
def nofile():
    """This process's soft RLIMIT_NOFILE raised for N_ACTIVE client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = N_ACTIVE + 500
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class ActiveClients:
    """n kept-alive connections, each sending REQUEST again `interval` s after its last
    response, from one thread. Counts responses per connection, and anything wrong:
    a non-200 answer, a close by the server, a socket error."""

    def __init__(self, port, n, interval):
        self.port, self.n, self.interval = port, n, interval
        self.sel = selectors.DefaultSelector()
        self.socks = []
        self.bufs = {}
        self.counts = {}
        self.problems = []
        self.responses = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def open(self):
        """Connects all n (one by one: a connect storm is not the point) and starts the loop."""
        for _ in range(self.n):
            s = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            self.socks.append(s)
            s.setblocking(False)
            self.bufs[s] = b""
            self.counts[s] = 0
            s.send(REQUEST)       # a fresh socket's buffer takes these 34 bytes at once
            self.sel.register(s, selectors.EVENT_READ)
        self.thread.start()
        return self

    def _run(self):
        due = []       # (time, seq, sock): the next request of each answered connection
        seq = 0
        while not self.stop.is_set():
            timeout = 0.05
            if due:
                timeout = min(timeout, max(0.0, due[0][0] - time.monotonic()))
            for key, _ in self.sel.select(timeout):
                s = key.fileobj
                for when in self._read(s):
                    seq += 1
                    heapq.heappush(due, (when, seq, s))
            now = time.monotonic()
            while due and due[0][0] <= now:
                _, _, s = heapq.heappop(due)
                if s.fileno() < 0:
                    continue
                try:
                    s.send(REQUEST)
                except OSError as e:
                    self._problem(f"send: {e!r}")

    def _read(self, s):
        """Reads what arrived on s; yields when to send its next request, per response."""
        try:
            data = s.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            data = b""
            self._problem(f"recv: {e!r}")
        if not data:
            self._problem("closed by the server")
            self.sel.unregister(s)
            s.close()
            return
        buf = self.bufs[s] + data
        while True:
            head, sep, body = buf.partition(b"\r\n\r\n")
            if not sep:
                break
            low = head.lower()
            length = int(low.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            if len(body) < length:
                break
            buf = body[length:]
            if not head.startswith(b"HTTP/1.1 200") or b"connection: close" in low:
                self._problem(f"answer {head[:40]!r}")
            first = self.counts[s] == 0
            self.counts[s] += 1
            with self.lock:
                self.responses += 1
            # The first request of each is spread over the interval, so they do not
            # arrive in waves.
            yield time.monotonic() + (random.uniform(0, self.interval) if first else self.interval)
        self.bufs[s] = buf

    def _problem(self, what):
        with self.lock:
            self.problems.append(what)

    def answered_at_least(self, k):
        """How many connections have had k responses or more."""
        return sum(1 for c in list(self.counts.values()) if c >= k)

    def close(self):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(30)
        for s in self.socks:
            s.close()
        self.sel.close()


def _serve_beside_active_clients(tmp_path, backend_name, interface, *args):
    clients = None
    with H.Server(tmp_path, backend_name, "--interface", interface, *args,
                  app=APPS[interface]) as srv:
        srv.start(ready=2)
        try:
            clients = ActiveClients(srv.port, N_ACTIVE, INTERVAL).open()
            H.wait_until(lambda: clients.answered_at_least(1) == N_ACTIVE, timeout=120,
                         what=f"all {N_ACTIVE} connections answered once")
            # Active, not idle: every one has sent again since (so each is open and in use).
            H.wait_until(lambda: clients.answered_at_least(2) == N_ACTIVE, timeout=120,
                         what=f"all {N_ACTIVE} connections answered twice")
            for _ in range(5):           # new clients, each on a new connection
                status, body = H.http_get(srv.port, "/health", timeout=30)
                assert status == 200, body
                assert json.loads(body)["status"] == "healthy"
            # ... and the held ones kept going meanwhile, none closed or failed.
            done = clients.responses
            H.wait_until(lambda: clients.responses >= done + N_ACTIVE, timeout=120,
                         what="another round of requests on the held connections")
            assert clients.problems == [], clients.problems[:5]
            assert sum(1 for s in clients.socks if s.fileno() >= 0) == N_ACTIVE
        finally:
            if clients is not None:
                clients.close()
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_new_client_is_served_beside_3000_active_keepalive_connections(tmp_path, backend, interface,
                                                                       nofile):
    if interface == "asgi":
        pytest.importorskip("uvicorn")
    _serve_beside_active_clients(tmp_path, backend.BACKEND, interface)


@pytest.mark.parametrize("interface,policy", [("wsgi", "shared"), ("asgi", "reuseport")])
def test_self_accepting_workers_count_work_not_open_connections(tmp_path, interface, policy, nofile):
    # The worker accepts for itself here (no dispatcher between), so one backend suffices:
    # the one under test, or auto.
    if interface == "asgi":
        pytest.importorskip("uvicorn")
    _serve_beside_active_clients(tmp_path, os.environ.get("PYFORK_BACKEND", "auto"), interface,
                                 "--policy", policy)
