"""Draining under load fails no request: `pyfork serve` with real forks and real clients.

Clients (threads in this process, plain sockets) count the outcome of every request they
send: a failure is a request that was sent and got no complete response (a reset, an EOF,
a timeout, a status other than 200). No retry is modelled: a keep-alive client reconnects
only after a response that said `Connection: close`, which is what a draining worker puts
on the last response of a connection. Two kinds of client run at once: "fresh" ones open
a connection per request (`Connection: close`), "kept" ones keep one connection open and
send the next request as soon as the previous response is in.

- HUP twice (rolling restart) under load, on WSGI and on ASGI: zero failures, and both
  generations of workers answered.
- A graceful stop (SIGTERM) under keep-alive load: every request sent on a connection a
  worker had already answered on is answered (the last one with `Connection: close`).
  Connections opened after the stop may be refused: they never reached a worker.
- A client that connects once the stop has taken the listeners' backlog is refused at once,
  while a request in flight is still running (policies rr and shared).

Both backends; the test process's fd count is unchanged. The figures are printed (-s).
"""
import concurrent.futures
import signal
import socket
import threading
import time

import pytest

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(240)]

WSGI_APP = r'''
import os
BODY = str(os.getpid()).encode()

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))])
    return [BODY]
'''

ASGI_APP = r'''
import os
BODY = str(os.getpid()).encode()

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})
'''

INTERFACES = {"wsgi": WSGI_APP, "asgi": ASGI_APP}
FRESH_CLIENTS, KEPT_CLIENTS = 16, 8
CLIENT_TIMEOUT = 30.0     # liveness only: a response never takes this long


class Closed(Exception):
    """The server closed the connection before a complete response."""


def read_response(sock, buf):
    """One Content-Length response from `sock` (bytes after it stay in the returned
    buffer): (status, headers, body, rest). Raises Closed on EOF before it is complete."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise Closed(f"EOF after {len(buf)} response bytes")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(hdrs.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise Closed("EOF mid-body")
        buf += chunk
    return int(lines[0].split()[1]), hdrs, buf[:length], buf[length:]


class Clients:
    """FRESH_CLIENTS + KEPT_CLIENTS client threads; see the module docstring."""

    def __init__(self, port, fresh=FRESH_CLIENTS, kept=KEPT_CLIENTS):
        self.port = port
        self.ok = 0
        self.failed = []          # (kind, repr) per sent request without a complete response
        self.refused = 0          # connections that never got a response (stop test only)
        self.closes = 0           # kept-alive connections ended by `Connection: close`
        self.endings = []         # kept-alive connections, how each ended (for a failure report)
        self.kept_served = set()  # kept-alive client threads that have had a response
        self.pids = set()
        self.stopping = threading.Event()   # stop test: the server is going away
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._threads = ([threading.Thread(target=self._fresh, daemon=True) for _ in range(fresh)]
                         + [threading.Thread(target=self._kept, daemon=True) for _ in range(kept)])

    def _record(self, status, body, kind):
        with self._lock:
            if status == 200:
                self.ok += 1
                self.pids.add(int(body))
            else:
                self.failed.append((kind, f"status {status}"))

    def _connect(self):
        return socket.create_connection(("127.0.0.1", self.port), timeout=CLIENT_TIMEOUT)

    def _fresh(self):
        req = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        while not self._halt.is_set():
            try:
                sock = self._connect()
            except OSError as e:
                self._refused("fresh", e)
                continue
            with sock:
                try:
                    sock.sendall(req)
                    status, _, body, _ = read_response(sock, b"")
                except (OSError, Closed) as e:
                    if self.stopping.is_set():
                        self._refused("fresh", e)    # may have been reset in the backlog
                    else:
                        with self._lock:
                            self.failed.append(("fresh", repr(e)))
                    continue
            self._record(status, body, "fresh")

    def _kept(self):
        req = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
        sock, served, buf = None, False, b""
        try:
            while not self._halt.is_set():
                if sock is None:
                    try:
                        sock, served, buf = self._connect(), False, b""
                        opened_stopping = self.stopping.is_set()
                    except OSError as e:
                        self._refused("kept", e)
                        continue
                try:
                    sock.sendall(req)
                    status, hdrs, body, buf = read_response(sock, buf)
                except (OSError, Closed) as e:
                    with self._lock:
                        self.endings.append((threading.get_ident() % 1000, f"opened stopping={opened_stopping}",
                                             f"served={served}", repr(e)))
                    sock.close()
                    sock = None
                    if served or not self.stopping.is_set():
                        with self._lock:
                            self.failed.append(("kept", repr(e)))
                    else:
                        self._refused("kept", e)     # a connection no worker had answered on
                    continue
                if not served:
                    with self._lock:
                        self.kept_served.add(threading.get_ident())
                served = True
                self._record(status, body, "kept")
                if hdrs.get("connection", "").lower() == "close":
                    with self._lock:
                        self.closes += 1
                        self.endings.append((threading.get_ident() % 1000, f"opened stopping={opened_stopping}",
                                             "Connection: close"))
                    sock.close()
                    sock = None
        finally:
            if sock is not None:
                sock.close()

    def _refused(self, kind, err):
        if not self.stopping.is_set():
            with self._lock:
                self.failed.append((kind, "connect: " + repr(err)))
            return
        with self._lock:
            self.refused += 1
        time.sleep(0.05)      # the server is gone or going: do not spin on refused connects

    def wait_for(self, n, timeout=60.0):
        H.wait_until(lambda: self.ok >= n, timeout=timeout, what=f"{n} responses")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._halt.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT * 2)
        assert not any(t.is_alive() for t in self._threads)


def serve(tmp_path, backend, interface, *args):
    (tmp_path / "drainapp.py").write_text(INTERFACES[interface])
    return H.Server(tmp_path, backend.BACKEND, "--interface", interface, "--graceful-timeout", "30", *args,
                    app="drainapp:app")


@pytest.mark.parametrize("interface", sorted(INTERFACES))
def test_hup_twice_under_load_fails_no_request(tmp_path, backend, interface):
    with serve(tmp_path, backend, interface) as srv:
        srv.start(ready=2)
        with Clients(srv.port) as load:
            load.wait_for(500)
            first = set(load.pids)
            for n in (1, 2):
                srv.signal(signal.SIGHUP)
                srv.wait_event("reload_complete", n=n, timeout=60)
                srv.wait_event("exit", n=2 * n, timeout=60, cause="drained")   # the old workers drained
                mark = load.ok
                load.wait_for(mark + 500)
        print(f"\nHUP x2 under load ({interface}, backend {backend.BACKEND}): "
              f"{load.ok + len(load.failed)} requests, {len(load.failed)} failed, "
              f"{load.closes} kept-alive connections ended by Connection: close")
        assert load.failed == [], load.failed[:10]
        assert load.pids - first and first        # answered by old and new workers
        assert srv.count_events("exit", cause=lambda c: c != "drained") == 0   # no worker crashed
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@pytest.mark.parametrize("interface", sorted(INTERFACES))
def test_graceful_stop_under_keep_alive_load_answers_every_request(tmp_path, backend, interface):
    with serve(tmp_path, backend, interface) as srv:
        srv.start(ready=2)
        with Clients(srv.port, fresh=0) as load:
            load.wait_for(500)
            # Every kept-alive client is on a served connection before the stop (one whose
            # thread only connects then meets closed listeners: not what this is about).
            H.wait_until(lambda: len(load.kept_served) == KEPT_CLIENTS, what="every kept client served")
            load.stopping.set()
            srv.signal(signal.SIGTERM)
            assert srv.wait() == 0
        print(f"\nSIGTERM under keep-alive load ({interface}, backend {backend.BACKEND}): "
              f"{load.ok + len(load.failed)} requests on served connections, {len(load.failed)} failed, "
              f"{load.closes} ended by Connection: close, {load.refused} connects after the stop refused")
        assert load.failed == [], load.failed[:10]
        # each kept-alive connection was told it was the last
        assert load.closes >= KEPT_CLIENTS, "\n".join(map(str, load.endings)) + "\n" + srv.log()[-3000:]


HOLD_APP = r'''
import asyncio, os

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/hold":               # answers once the test creates ./release
        open("holding", "w").close()
        while not os.path.exists("release"):
            await asyncio.sleep(0.01)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})
'''


def _refused(port):
    """True when a connect to `port` is refused; a connection that opens is closed unused."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("policy", ["rr", "shared"])
def test_a_client_that_connects_during_a_graceful_stop_is_refused_at_once(tmp_path, backend, policy):
    """Once a stop has taken what the listeners had queued, they close: a client that
    connects later is refused while the stop still waits for a request in flight (it can try
    another host at once), instead of waiting in the backlog until the primary exits and
    then being reset. rr: the primary holds the only copy, so the first connect after its
    `listeners_closed` is refused. shared: each worker closes its copy once it has taken
    its own backlog (a connection that opens meanwhile is one of those), so the test waits
    for the refusal. The request in flight is answered and the stop ends cleanly."""
    (tmp_path / "holdapp.py").write_text(HOLD_APP)
    with H.Server(tmp_path, backend.BACKEND, "--interface", "asgi", "--policy", policy,
                  "--graceful-timeout", "60", app="holdapp:app") as srv:
        srv.start(ready=2)
        port = srv.port
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            held = pool.submit(H.http_get, srv.port, "/hold", CLIENT_TIMEOUT * 2)
            H.wait_until(lambda: (tmp_path / "holding").exists(), what="the held request running")
            srv.signal(signal.SIGTERM)
            closed = srv.wait_event("listeners_closed", timeout=CLIENT_TIMEOUT)
            assert closed["urls"] == [f"http://127.0.0.1:{port}"] and closed["kept"] == [], closed
            if policy == "rr":
                assert _refused(port), "a connect after listeners_closed was accepted"
            else:
                H.wait_until(lambda: _refused(port), timeout=CLIENT_TIMEOUT, what="connects refused")
            assert not held.done() and srv.proc.poll() is None, "the stop did not wait for the request"
            (tmp_path / "release").touch()
            assert held.result() == (200, b"ok")
        assert srv.wait() == 0
        assert srv.count_events("exit", cause=lambda c: c != "drained") == 0
