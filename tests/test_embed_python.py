"""Third-party Python servers in pyfork's workers (pyfork.embed): Tornado and aiohttp.

Theory of operation: examples/embed_tornado.py and examples/embed_aiohttp.py are copied to
the test's directory and served with `python -m pyfork serve MODULE:main` (a worker body
marked with pyfork.embed.worker_body, found without --interface), on both dispatch
backends. Real HTTP from several client threads, with `Connection: close` and kept alive;
the primary's status (`pyfork status --json`) shows every request finished on the
scoreboard and every connection reported closed (back-pressure needs both); SIGTERM with a
kept-alive connection open still exits 0 (the worker's on_drain closes it); the test
process's fd count is unchanged.
"""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import supervisor_harness as H

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SERVERS = {"tornado": "embed_tornado", "aiohttp": "embed_aiohttp"}

pytestmark = pytest.mark.usefixtures("fd_guard")


def status(tmp_path, ctl):
    r = subprocess.run([sys.executable, "-m", "pyfork", "status", "--control", ctl, "--json"],
                       cwd=str(tmp_path), capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(params=sorted(SERVERS))
def embedded(request, tmp_path, backend):
    pytest.importorskip(request.param)
    module = SERVERS[request.param]
    shutil.copy(os.path.join(EXAMPLES, module + ".py"), tmp_path)
    ctl = str(tmp_path / "ctl.sock")
    argv = [sys.executable, "-m", "pyfork", "serve", f"{module}:main", "-b", "127.0.0.1:0", "-w", "2",
            "--control", ctl]
    with H.Server(tmp_path, backend.BACKEND, argv=argv) as srv:
        srv.start(ready=2)
        srv.ctl = ctl
        srv.name = request.param
        yield srv


def test_requests_are_served_and_reported(embedded, tmp_path):
    srv = embedded
    results, errors = [], []

    def client():
        try:
            for _ in range(8):
                results.append(H.http_get(srv.port))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(results) == 40
    pids = set()
    for code, body in results:
        assert code == 200
        doc = json.loads(body)
        assert doc["message"] == f"hello from {srv.name}"
        pids.add(doc["workerPid"])
    assert len(pids) == 2

    # The scoreboard saw every request end and every connection close.
    def settled():
        rows = status(tmp_path, srv.ctl)["workers"]
        return (sum(r["handled"] for r in rows) == 40 and all(r["active"] == 0 for r in rows)
                and all(r["inflight"] == 0 for r in rows))
    H.wait_until(settled, what="handled == 40 and nothing in flight")
    srv.signal(signal.SIGTERM)
    assert srv.wait() == 0


def test_keep_alive_then_graceful_stop(embedded, tmp_path):
    srv = embedded
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        seen = set()
        for _ in range(5):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.status == 200
            seen.add(json.loads(resp.read())["workerPid"])
        assert len(seen) == 1                     # one connection, one worker
        rows = status(tmp_path, srv.ctl)["workers"]
        assert sum(r["handled"] for r in rows) == 5
        assert sum(r["inflight"] for r in rows) == 1   # the kept-alive connection is open
        # Stop with the idle kept-alive connection open: the worker closes it and exits.
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    finally:
        conn.close()
