"""End-to-end tests of examples/: each example runs as a real process tree on a loopback port.

Theory of operation: `Example` starts `python examples/<x>.py --bind 127.0.0.1:0
--workers N` in its own session (so leftovers can be found by process group), with
stdout+stderr going to a file (a pipe could fill up and block the cluster) and the
primary's event stream (README "Events") on a pipe (PYFORK_EVENTS=fd://N, which every
pyfork.Cluster honours). It reads the port the kernel chose from the `start` event (no
free-port race with the other suites), waits for a `ready` event per worker, and on
exit sends SIGTERM to the primary only (the graceful path under test), then SIGKILLs
whatever is left of its process group. The examples' own output is read only where
it is what the example demonstrates (the primary logging worker messages).
Clients are plain http.client connections, one per request, so round robin spreads
them over the workers and no keep-alive socket outlives a request.

Shared-state tests use a private, real redis-server (tests/redis_server.py): skipped
with a reason when the binary is missing, failed instead when PYFORK_REQUIRE_REDIS=1.
Every test checks that the test process's open-fd count is unchanged. The machine has 2
shared cores: worker counts and request counts are small and bounded, and no assertion
is about speed, only about order and liveness with generous timeouts.
"""
from __future__ import annotations

import concurrent.futures
import gc
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


import redis_server as _redis_helper
import supervisor_harness as H
redis_server = _redis_helper.redis_server   # module-scoped fixture: a private real redis-server


# ---- fd accounting ------------------------------------------------------------------

def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"), key=int)


@pytest.fixture(autouse=True)
def no_fd_leak():
    before = len(_fds())
    yield
    gc.collect()   # http.client responses dropped by a failed assertion are closed by GC
    after = _fds()
    assert len(after) == before, f"fd leak: {before} fds before the test, {len(after)} after: " + \
        ", ".join(f"{fd}->{_readlink(fd)}" for fd in after)


def _readlink(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


# ---- running an example -------------------------------------------------------------

class Example:
    """One example process tree; a context manager that always cleans up."""

    def __init__(self, script: str, tmp_path: Path, workers: int, *args: str, env: dict | None = None,
                 wait_ready: bool = True):
        self.script = EXAMPLES / script
        self.workers = workers
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log_path = tmp_path / (Path(script).stem + ".log")
        self.port: int | None = None   # known once the primary says where it listens
        self.proc: subprocess.Popen | None = None
        self.ev: H.EventReader | None = None
        self.wait_ready = wait_ready

    def __enter__(self) -> "Example":
        r, w = os.pipe()
        try:
            with open(self.log_path, "wb") as log:
                # The child gets its own copies of the log fd and the events pipe; ours close
                # right away (fd accounting; EOF on the pipe once the primary is gone).
                self.proc = subprocess.Popen(
                    [sys.executable, str(self.script), "--bind", "127.0.0.1:0",
                     "--workers", str(self.workers), *self.args],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=(w,),
                    cwd=ROOT, env={**self.env, "PYFORK_EVENTS": f"fd://{w}"}, start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.ev = H.EventReader(r, describe=lambda: f"output:\n{self.output()[-4000:]}")
        if self.wait_ready:
            try:
                self.port = H.port_of(self.ev.wait("start", timeout=60))
                self.wait_for_ready(self.workers)
            except BaseException:
                self.__exit__(None, None, None)
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        if exc and exc[0] is not None:
            print(f"---- {self.script.name} output ----\n{self.output()[-6000:]}")   # shown by pytest on failure

    # -- output ------------------------------------------------------------------------
    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            result = predicate(out)
            if result:
                return result
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.script.name} exited with {self.proc.returncode} "
                                     f"while waiting for {what}:\n{out[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{out[-4000:]}")
            time.sleep(0.05)

    def ready_workers(self) -> dict[int, int]:
        """worker id -> pid of every worker that became READY so far."""
        return {e["worker"]: e["pid"] for e in self.ev.events("ready")}

    def wait_for_ready(self, n: int, timeout: float = 60.0) -> dict[int, int]:
        self.ev.wait("ready", n=n, timeout=timeout)
        return self.ready_workers()

    # -- lifecycle -----------------------------------------------------------------------
    def terminate(self) -> None:
        """SIGTERM to the primary only: the graceful stop the examples promise."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 40.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:   # anything left in the group (a worker, a pool process) dies now
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.ev is not None:
            self.ev.close()
            self.ev = None

    def group_alive(self) -> bool:
        try:
            os.killpg(self.proc.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def wait_group_gone(self, timeout: float = 10.0) -> bool:
        """True once no process of the tree is left (workers, pool processes): bounded wait."""
        deadline = time.monotonic() + timeout
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.group_alive()


# ---- a tiny HTTP client ---------------------------------------------------------------

class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(port: int, path: str, method: str = "GET", headers: dict | None = None,
            body: bytes | None = None, timeout: float = 30.0, sent=None) -> Response:
    """One request on a fresh connection, closed before returning; `sent` (a
    threading.Semaphore) is released once the request is written."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        if sent is not None:
            sent.release()
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


# ---- 1. which_worker ------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_which_worker_reports_to_primary(tmp_path):
    with Example("which_worker.py", tmp_path, 2) as ex:
        seen = []
        for _ in range(6):
            r = request(ex.port, "/")
            assert r.status == 200
            data = r.json()
            assert set(data) >= {"workerPid", "workerId", "requestsHandled", "message"}
            seen.append((data["workerId"], data["workerPid"], data["requestsHandled"]))
        assert len({wid for wid, _, _ in seen}) == 2, f"round robin should use both workers: {seen}"
        # Every request was reported over pyfork's channel (a 'message' event each) and
        # logged by the primary (what this example demonstrates).
        ex.ev.wait("message", n=6)
        assert sorted((e["worker"], e["message"]["requestCount"]) for e in ex.ev.events("message")) == \
            sorted((wid, k) for wid, _, k in seen)
        expected = [f"worker {wid} (pid {pid}) handled request #{k}" for wid, pid, k in seen]
        ex.wait_for(lambda out: all(line in out for line in expected), 30, "the primary's message log lines")
        # The per-worker counters never exceed what each worker really served.
        for wid in {w for w, _, _ in seen}:
            counts = sorted(k for w, _, k in seen if w == wid)
            assert counts == list(range(1, len(counts) + 1)), seen
        ex.terminate()
        assert ex.wait() == 0


# ---- 2. production_cluster --------------------------------------------------------------

@pytest.mark.timeout(120)
def test_production_sigterm_drains_in_flight_requests(tmp_path):
    n_requests = 4
    with Example("production_cluster.py", tmp_path, 2, "--graceful-timeout", "30") as ex:
        sent = threading.Semaphore(0)
        with concurrent.futures.ThreadPoolExecutor(n_requests) as pool:
            futures = [pool.submit(request, ex.port, "/slow?ms=1500", timeout=60, sent=sent)
                       for _ in range(n_requests)]
            # Every request was written before the stop (one still connecting then would
            # meet a primary that no longer accepts: not what this test is about), and both
            # workers are inside a slow request (the other two are queued behind them).
            for _ in range(n_requests):
                assert sent.acquire(timeout=30), "a request was not sent"
            ex.wait_for(lambda out: out.count("slow request started") >= 2, 30, "two slow requests in flight")
            ex.terminate()
            results = [f.result() for f in futures]
        assert [r.status for r in results] == [200] * n_requests, [(r.status, r.body) for r in results]
        assert {r.json()["workerId"] for r in results} == set(ex.ready_workers()), "both workers served"
        assert ex.wait() == 0
        assert ex.wait_group_gone(), "a worker outlived its primary"


@pytest.mark.timeout(120)
def test_production_crash_route_respawns(tmp_path):
    with Example("production_cluster.py", tmp_path, 2) as ex:
        first = ex.ready_workers()
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            request(ex.port, "/crash")
        # A new worker id (ids grow on every fork, as in Node) reaches READY again.
        crashed = ex.ev.wait("exit", code=1, cause="crash", timeout=30)
        assert crashed["worker"] in first
        ex.wait_for_ready(3, 30)
        replacement = set(ex.ready_workers()) - set(first)
        assert replacement and min(replacement) > max(first)
        for _ in range(4):
            r = request(ex.port, "/health")
            assert r.status == 200 and r.json()["status"] == "healthy"
        ex.terminate()
        assert ex.wait() == 0


@pytest.mark.timeout(120)
def test_production_crash_loop_gives_up(tmp_path):
    max_restarts = 2
    with Example("production_cluster.py", tmp_path, 1, "--crash-on-boot", "--max-restarts", str(max_restarts),
                 "--min-uptime", "1", wait_ready=False) as ex:
        code = ex.wait(60)
        out = ex.output()
        assert code == 3, f"every slot gave up -> exit code 3, got {code}:\n{out[-3000:]}"
        ex.ev.wait_eof(10)
        boots = ex.ev.events("exit")
        assert 2 <= len(boots) <= max_restarts + 1, f"{boots}: backoff must stop the loop\n{out[-3000:]}"
        assert all(not e["ready"] and e["cause"] == "crash" for e in boots), boots
        assert len(ex.ev.events("gave_up")) == 1
        assert not ex.ready_workers(), "a worker that dies in post_fork never becomes READY"


# ---- 3. shared_state (Flask + a real Redis) --------------------------------------------

SHARED_WORKERS = 4
RATE_LIMIT = 25


@pytest.fixture(scope="class")
def shared_app(redis_server, tmp_path_factory):
    env = {"REDIS_URL": redis_server.url}
    with Example("shared_state/app.py", tmp_path_factory.mktemp("shared"), SHARED_WORKERS,
                 "--rate-limit", str(RATE_LIMIT), "--rate-window", "3600", env=env) as ex:
        yield ex


@pytest.fixture
def rclient(redis_server):
    import redis
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def _many(port: int, path: str, n: int, threads: int = 32, headers: dict | None = None) -> list[Response]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda _: request(port, path, headers=headers, timeout=60), range(n)))


@pytest.mark.timeout(300)
class TestSharedState:
    def test_one_redis_connection_per_worker(self, shared_app, rclient):
        names = [c["name"] for c in rclient.client_list()]
        workers = sorted(n for n in names if n.startswith("pyfork-worker-"))
        assert workers == sorted(f"pyfork-worker-{i}" for i in shared_app.ready_workers()), names

    def test_good_counter_is_exact(self, shared_app, rclient):
        rclient.delete("global:visit_counter")
        results = _many(shared_app.port, "/good-counter", 1000)
        assert [r.status for r in results] == [200] * 1000
        counts = sorted(r.json()["globalVisitCount"] for r in results)
        assert counts == list(range(1, 1001)), "every INCR returns a distinct value, none lost"
        assert int(rclient.get("global:visit_counter")) == 1000
        assert len({r.json()["servedByWorkerId"] for r in results}) >= 2

    def test_bad_counter_is_per_worker(self, shared_app):
        n = 200
        results = _many(shared_app.port, "/bad-counter", n, threads=8)
        per_worker: dict[int, list[int]] = {}
        for r in results:
            assert r.status == 200
            d = r.json()
            per_worker.setdefault(d["workerId"], []).append(d["workerVisitCount"])
        assert len(per_worker) >= 2, f"several workers should be seen: {sorted(per_worker)}"
        maxima = {w: max(c) for w, c in per_worker.items()}
        # Each worker counted only its own visits: 1..k once each; the totals add up to n,
        # and no single worker's count reaches the true total.
        for w, c in per_worker.items():
            assert sorted(c) == list(range(1, maxima[w] + 1)), (w, sorted(c))
        assert sum(maxima.values()) == n
        assert max(maxima.values()) < n

    def test_session_shared_across_workers(self, shared_app):
        r = request(shared_app.port, "/login", "POST", {"Content-Type": "application/json"},
                    json.dumps({"username": "alice"}).encode())
        assert r.status == 200, r.body
        creator = r.json()["workerThatCreatedSession"]
        cookie = r.headers["Set-Cookie"].split(";", 1)[0]
        assert cookie.startswith("session=")
        readers = set()
        for _ in range(3 * SHARED_WORKERS):
            p = request(shared_app.port, "/profile", headers={"Cookie": cookie})
            assert p.status == 200, p.body
            d = p.json()
            assert d["user"]["username"] == "alice" and d["sessionCreatedByWorker"] == creator
            readers.add(d["sessionServedByWorker"])
            if readers - {creator}:
                break
        assert readers - {creator}, "a worker other than the creator read the session"
        assert request(shared_app.port, "/profile").status == 401   # no cookie, no session
        out = request(shared_app.port, "/logout", "POST", headers={"Cookie": cookie})
        assert out.status == 200
        for _ in range(SHARED_WORKERS):   # gone for every worker, not just the one that logged out
            assert request(shared_app.port, "/profile", headers={"Cookie": cookie}).status == 401

    def test_rate_limit_holds_across_workers(self, shared_app):
        key = {"X-Client-Key": f"test-{uuid.uuid4()}"}
        results = _many(shared_app.port, "/limited", 60, threads=16, headers=key)
        statuses = [r.status for r in results]
        assert statuses.count(200) == RATE_LIMIT and statuses.count(429) == 60 - RATE_LIMIT, statuses
        assert len({r.json()["workerId"] for r in results if r.status == 200}) >= 2
        assert all(int(r.headers["Retry-After"]) >= 1 for r in results if r.status == 429)
        other = request(shared_app.port, "/limited", headers={"X-Client-Key": f"test-{uuid.uuid4()}"})
        assert other.status == 200, "another client has its own quota"


# ---- 4. cpu_offload ----------------------------------------------------------------------

def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["process", "thread"])
def test_cpu_offload_health_answers_during_fibonacci(tmp_path, mode):
    n = 34   # naive recursion: seconds of CPU, far longer than a /health round trip
    with Example("cpu_offload.py", tmp_path, 1, "--pool-size", "1") as ex:
        assert request(ex.port, "/health").json()["pendingTasks"] == 0
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fib = pool.submit(request, ex.port, f"/fibonacci?n={n}&mode={mode}", timeout=120)
            # The single worker answers /health while its computation is in flight: the
            # response itself says a task is pending, so this is ordering, not timing.
            deadline = time.monotonic() + 60
            while True:
                h = request(ex.port, "/health", timeout=30)
                assert h.status == 200
                if h.json()["pendingTasks"] == 1:
                    break
                assert not fib.done(), f"fibonacci finished before /health saw it pending: {fib.result().body}"
                assert time.monotonic() < deadline
                time.sleep(0.02)
            r = fib.result()
        assert r.status == 200, r.body
        d = r.json()
        assert d["fibonacci"] == _fib(n) and d["mode"] == mode
        if mode == "process":
            assert d["computedInPid"] != d["workerPid"], "computed in a pool process, not the worker"
        else:
            assert d["computedInPid"] == d["workerPid"]
        assert request(ex.port, "/fibonacci?n=99").status == 400
        ex.terminate()
        assert ex.wait() == 0
        assert ex.wait_group_gone(), "the worker's pool processes must end with it"
        assert "Traceback" not in ex.output(), ex.output()[-3000:]


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"   # a zombie has ended
    except OSError:
        return True


@pytest.mark.timeout(180)
def test_cpu_offload_pool_process_dies_with_its_worker(tmp_path):
    with Example("cpu_offload.py", tmp_path, 1, "--pool-size", "1") as ex:
        (wid, wpid), = ex.ready_workers().items()
        # A first small task: the pool process is fully started (it holds its queue pipes,
        # so it would never see EOF by itself) and its pid is in the answer.
        warm = request(ex.port, "/fibonacci?n=1&mode=process").json()
        pool_pid = warm["computedInPid"]
        assert pool_pid != wpid and not _gone(pool_pid)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fib = pool.submit(request, ex.port, "/fibonacci?n=35&mode=process", timeout=120)
            deadline = time.monotonic() + 60
            while request(ex.port, "/health").json()["pendingTasks"] != 1:
                assert time.monotonic() < deadline and not fib.done()
                time.sleep(0.02)
            os.kill(wpid, signal.SIGKILL)   # a hard death mid-computation: no lifespan shutdown, no join
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                fib.result()
        deadline = time.monotonic() + 15
        while not _gone(pool_pid):
            assert time.monotonic() < deadline, f"pool process {pool_pid} outlived worker {wid}"
            time.sleep(0.05)
        ex.wait_for_ready(2, 30)   # the replacement
        assert request(ex.port, "/health").status == 200
        ex.terminate()
        assert ex.wait() == 0
