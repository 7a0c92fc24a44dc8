"""The demo app (pyfork.demo): every route of DESIGN.md, as WSGI and as ASGI.

Unit tests call the WSGI callable directly; integration tests serve `app` through
pyfork's wsgi interface and `asgi_app` through the asgi interface in forked workers
(tests/asgi_harness.py) and use requests. /good-counter is checked
without Redis (503), with an unreachable Redis (503) and against a real private
redis-server (tests/redis_server.py: skipped when absent, a failure under
PYFORK_REQUIRE_REDIS=1), where two workers must count exactly. End to end, `python -m
pyfork serve` runs each demo on the interpreter running the tests (CI runs the suite on the
oldest and the newest Python the package claims).
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pyfork import demo
from pyfork.serve import resolve

pytestmark = pytest.mark.timeout(180)
HERE = os.path.dirname(os.path.abspath(__file__))


import asgi_harness as H
import net_harness as N
import redis_server as RS
redis_server = RS.redis_server  # the module-scoped fixture (private redis-server on a free port)

FLAVOURS = [pytest.param(("wsgi", demo.app), id="wsgi"), pytest.param(("asgi", demo.asgi_app), id="asgi")]


@pytest.fixture
def fds():
    before = H.fd_count()
    yield
    assert H.fd_count() == before


# --------------------------------------------------------------------------- unit: the WSGI callable

def call(method, path, query=""):
    seen = {}

    def start_response(status, headers):
        seen["status"], seen["headers"] = status, dict(headers)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query,
               "wsgi.input": io.BytesIO(b"")}
    body = b"".join(demo.app(environ, start_response))
    assert seen["headers"]["Content-Type"] == "application/json"
    assert int(seen["headers"]["Content-Length"]) == len(body)
    return int(seen["status"].split()[0]), json.loads(body), seen["headers"]


def test_wsgi_routes_unit(monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    status, body, _ = call("GET", "/")
    assert status == 200 and set(body) == {"workerPid", "workerId", "requestsHandled", "message"}
    assert body["workerPid"] == os.getpid()
    assert call("GET", "/health")[:2] == (200, {"status": "healthy", "workerId": body["workerId"]})
    status, fib, _ = call("GET", "/fibonacci", "n=20")
    assert status == 200 and fib["fibonacci"] == 6765 and fib["n"] == 20
    for bad in ("n=36", "n=-1", "n=abc", "n=", "", "n=1e3"):
        status, err, _ = call("GET", "/fibonacci", bad)
        assert status == 400 and "error" in err, bad
    assert call("GET", "/sleep", "ms=1")[1]["sleptMs"] == 1
    for bad in ("ms=60001", "ms=-5", "ms=soon", ""):
        assert call("GET", "/sleep", bad)[0] == 400, bad
    first = call("GET", "/bad-counter")[1]["workerVisitCount"]
    assert call("GET", "/bad-counter")[1]["workerVisitCount"] == first + 1
    status, err, _ = call("GET", "/good-counter")
    assert status == 503 and "REDIS_URL is not set" in err["error"]
    status, err, _ = call("GET", "/no/such/route")
    assert status == 404 and err["error"] == "not found"
    status, err, headers = call("POST", "/")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert call("DELETE", "/health")[0] == 405
    assert call("POST", "/no/such/route")[0] == 404
    assert call("HEAD", "/health")[0] == 200


def test_worker_id_comes_from_pyfork_worker_current(monkeypatch):
    worker = pytest.importorskip("pyfork.worker")

    class FakeWorker:
        id = 7

    monkeypatch.setattr(worker, "current", lambda: FakeWorker())
    assert call("GET", "/")[1]["workerId"] == 7
    monkeypatch.setattr(worker, "current", lambda: None)
    assert call("GET", "/health")[1]["workerId"] == 0


def test_demo_interfaces_are_detected():
    assert resolve(demo.asgi_app).NAME == "asgi"
    assert resolve(demo.app).NAME == "wsgi"


def test_redis_client_is_per_process(monkeypatch):
    pytest.importorskip("redis")
    monkeypatch.setattr(demo, "_redis", {12345: "a client inherited from the parent"})
    client = demo._sync_redis("redis://127.0.0.1:1/0")  # no I/O until a command runs
    try:
        assert demo._redis == {os.getpid(): client}
        assert demo._sync_redis("redis://127.0.0.1:1/0") is client
    finally:
        client.close()


# --------------------------------------------------------------------------- served, real HTTP

def serve(flavour, env=None, worker_id=3, lsock=None):
    interface, app = flavour
    own = lsock is None
    lsock = lsock or H.listener()
    worker = H.ForkedWorker(lsock, app, interface, env=env, worker_id=worker_id)
    if own:
        lsock.close()
    return worker


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_routes_served(fds, flavour):
    worker = serve(flavour, env={"REDIS_URL": ""})
    base = f"http://127.0.0.1:{worker.port}"
    try:
        with H.Client(base) as c:
            r = c.get("/")
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            root = r.json()
            assert root["workerPid"] == worker.pid and root["workerId"] == 3
            assert root["message"] == "Handled by worker" and root["requestsHandled"] >= 1
            assert c.get("/").json()["requestsHandled"] == root["requestsHandled"] + 1
            assert c.get("/health").json() == {"status": "healthy", "workerId": 3}
            fib = c.get("/fibonacci", params={"n": 15}).json()
            assert fib["fibonacci"] == 610 and fib["computedByWorker"] == 3
            for bad in ({"n": 36}, {"n": -3}, {"n": "x"}, {}):
                r = c.get("/fibonacci", params=bad)
                assert r.status_code == 400 and "error" in r.json(), bad
            assert c.get("/sleep", params={"ms": 5}).json()["sleptMs"] == 5
            for bad in ({"ms": 60001}, {"ms": -1}, {"ms": "1.5"}, {}):
                assert c.get("/sleep", params=bad).status_code == 400, bad
            counts = [c.get("/bad-counter").json() for _ in range(3)]
            first = counts[0]["workerVisitCount"]  # not 1: the fork inherits this process's count
            assert [x["workerVisitCount"] for x in counts] == [first, first + 1, first + 2]
            assert counts[0]["workerId"] == 3 and "per-worker" in counts[0]["warning"]
            r = c.get("/good-counter")
            assert r.status_code == 503 and "REDIS_URL is not set" in r.json()["error"]
            r = c.get("/missing")
            assert r.status_code == 404 and r.json()["error"] == "not found"
            r = c.post("/", data=b"x")
            assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
            r = c.head("/health")
            assert r.status_code == 200 and r.content == b""
        stats = worker.stop()
    finally:
        worker.kill()
    H.assert_balanced(stats)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_good_counter_with_unreachable_redis_is_503(fds, flavour):
    worker = serve(flavour, env={"REDIS_URL": "redis://127.0.0.1:1/0"})  # port 1: refused
    try:
        with H.Client() as c:
            r = c.get(f"http://127.0.0.1:{worker.port}/good-counter")
            assert r.status_code == 503 and "unreachable" in r.json()["error"]
            assert c.get(f"http://127.0.0.1:{worker.port}/health").status_code == 200  # still serving
        stats = worker.stop()
    finally:
        worker.kill()
    H.assert_balanced(stats)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_good_counter_is_exact_across_workers(fds, flavour, redis_server):
    import redis

    admin = redis.Redis.from_url(redis_server.url)
    try:
        admin.delete(demo.REDIS_KEY)
    finally:
        admin.close()
    lsock = H.listener()
    workers = []
    try:
        workers = [serve(flavour, env={"REDIS_URL": redis_server.url}, worker_id=i, lsock=lsock) for i in (1, 2)]
        lsock.close()
        n = 40
        with H.Client(headers={"connection": "close"}) as c:
            url = f"http://127.0.0.1:{workers[0].port}"
            good = [c.get(url + "/good-counter").json() for _ in range(n)]
            bad = [c.get(url + "/bad-counter").json() for _ in range(n)]
        all_stats = [w.stop() for w in workers]
    finally:
        if lsock.fileno() != -1:
            lsock.close()
        for w in workers:
            w.kill()
    assert sorted(g["globalVisitCount"] for g in good) == list(range(1, n + 1))  # exact, whoever served
    assert {g["servedByWorkerId"] for g in good} <= {1, 2}
    # Each worker counts alone: its own visits are consecutive, and only the per-worker
    # counts together add up to n (the workers start from what this process had at fork).
    seen = {}
    for b in bad:
        seen.setdefault(b["workerId"], []).append(b["workerVisitCount"])
    for counts in seen.values():
        assert counts == list(range(counts[0], counts[0] + len(counts)))
    assert sum(len(counts) for counts in seen.values()) == n
    for stats in all_stats:
        H.assert_balanced(stats)


# --------------------------------------------------------------------------- end to end: pyfork serve

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_pyfork_serve(app: str, workers: int, tmp_path) -> tuple[subprocess.Popen, int]:
    """`python -m pyfork serve APP` on this interpreter; returns once every worker is READY.

    Its log is tmp_path/serve.log. The caller stops it (and kills it on failure)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PYFORK_EVENTS"] = str(tmp_path / "events.jsonl")
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pyfork", "serve", app,
                                 "-w", str(workers), "-b", f"127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=str(tmp_path))  # `-m` puts the cwd first on sys.path: never the repo root
    try:
        deadline = time.monotonic() + H.LIVENESS
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
                time.sleep(0.05)
        # The port answers as soon as it is bound; requests need the workers READY.
        while N.count_events(tmp_path / "events.jsonl", "ready") < workers:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, port


def _extension_loaded(pid: int, name: str) -> bool:
    """Whether the process has the shared object `name` mapped: a C extension module
    (_asyncio -> _asyncio.cpython-311-x86_64-linux-gnu.so) or a library (libcrypto)."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            base = os.path.basename(line.split()[-1])
            if base.startswith(name + ".") and ".so" in base:
                return True
    return False


@pytest.mark.parametrize("app", ["pyfork.demo:app", "pyfork.demo:asgi_app"], ids=["wsgi", "asgi"])
def test_pyfork_serve_demo_on_this_python(fds, tmp_path, app):
    """Both demos served by `pyfork serve` from workers running this very interpreter (the
    suite runs on the oldest and the newest Python the package claims: .ci/run and
    .ci/python-versions)."""
    proc, port = start_pyfork_serve(app, 1, tmp_path)
    try:
        with H.Client(headers={"connection": "close"}) as c:
            root = c.get(f"http://127.0.0.1:{port}/").json()
            assert c.get(f"http://127.0.0.1:{port}/health").json() == {"status": "healthy", "workerId": 1}
            assert c.get(f"http://127.0.0.1:{port}/fibonacci", params={"n": 10}).json()["fibonacci"] == 55
        assert root["workerId"] == 1 and root["workerPid"] != proc.pid
        # The worker that answered is a process of this interpreter's binary.
        assert os.path.realpath(f"/proc/{root['workerPid']}/exe") == os.path.realpath(sys.executable)
        # Memory: serving the demo over WSGI loads neither asyncio nor ssl and libcrypto
        # (together ~6 MB of its primary's RSS) in any process; over ASGI the primary preloads asyncio
        # on purpose (pyfork.serve.asgi.preload), which also shows this check can see it.
        for pid in (proc.pid, root["workerPid"]):
            assert _extension_loaded(pid, "_asyncio") is app.endswith("asgi_app"), pid
            # asyncio imports ssl: the ASGI case is this check's positive control too.
            ssl_loaded = _extension_loaded(pid, "_ssl") and _extension_loaded(pid, "libcrypto")
            assert ssl_loaded is app.endswith("asgi_app"), pid
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(H.LIVENESS) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_pyfork_serve_asgi_demo_end_to_end(fds, tmp_path):
    """The real supervisor and worker runtime: round robin over 2 workers, then a graceful stop."""
    proc, port = start_pyfork_serve("pyfork.demo:asgi_app", 2, tmp_path)
    try:
        with H.Client(headers={"connection": "close"}) as c:
            ids = [c.get(f"http://127.0.0.1:{port}/").json()["workerId"] for _ in range(6)]
            assert c.get(f"http://127.0.0.1:{port}/good-counter").status_code == 503
        assert set(ids) == {1, 2}, ids  # round robin over both workers
        idle = socket.create_connection(("127.0.0.1", port), timeout=H.LIVENESS)
        busy = socket.create_connection(("127.0.0.1", port), timeout=H.LIVENESS)
        try:
            for sock in (idle, busy):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                assert H.read_response(sock)[0] == 200
            busy.sendall(b"GET /sleep?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n")
            proc.send_signal(signal.SIGTERM)
            status, headers, _ = H.read_response(busy)
            # In flight or still unread in the socket when the drain began: answered either
            # way (a drain never answers 503), and the worker says it is closing the connection.
            assert status == 200 and headers["connection"] == "close", (status, headers)
            assert idle.recv(1) == b""  # the idle kept-alive connection is closed (between requests)
        finally:
            idle.close()
            busy.close()
        assert proc.wait(H.LIVENESS) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
