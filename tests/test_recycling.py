"""Recycling by memory and by age (--max-worker-memory, --max-worker-lifetime).

Unit tests drive pyfork.primary.recycling.Recycler with an injected clock and RSS
reader (hysteresis, flapping hold-off, lifetime jitter). Integration tests run `pyfork
serve` on an app whose RSS grows on demand (GET /grow=MB writes every page of a new
buffer), under real client load, and check on the event stream that the worker over the
limit was replaced (replacement READY first, then drained, cause `memory`) and that no
request failed; likewise for `lifetime`. Both backends; open-fd count unchanged.
"""
import random
import signal

import pytest

from pyfork.primary import recycling as R
from pyfork.primary import lifecycle as P
from pyfork.primary.lifecycle.events import Note

import supervisor_harness as H

MB = 1 << 20


# ---- unit: the Recycler --------------------------------------------------------------
def _recycler(sizes, **kw):
    """sizes: pid -> RSS in MB (mutable); the Recycler samples it."""
    return R.Recycler(rss=lambda pid: sizes.get(pid, 0) * MB, **kw)


def test_memory_needs_consecutive_samples_over_the_limit():
    sizes = {100: 50}
    r = _recycler(sizes, max_memory_mb=64)
    r.worker_started(1, 0.0)
    serving = [(1, 100, 0)]
    assert r.check(serving, 1.0) == []
    sizes[100] = 80
    assert r.check(serving, 2.0) == []          # 1 sample over
    sizes[100] = 60
    assert r.check(serving, 3.0) == []          # back under: the count starts again
    sizes[100] = 80
    for t in range(4, 4 + R.OVER_SAMPLES - 1):
        assert r.check(serving, float(t)) == []
    got = r.check(serving, float(4 + R.OVER_SAMPLES - 1))
    assert got == [(1, "memory", {"rss_mb": 80.0, "limit_mb": 64})]
    # asked again while the replacement boots: still returned, and not counted as a flap
    assert r.check(serving, 10.0) == got
    assert r.slots[0].flaps == 0


def test_samples_at_most_about_once_a_second():
    sizes = {100: 80}
    calls = []
    r = R.Recycler(rss=lambda pid: calls.append(pid) or sizes[pid] * MB, max_memory_mb=64)
    r.worker_started(1, 0.0)
    for t in (1.0, 1.1, 1.5, 1.8):
        r.check([(1, 100, 0)], t)
    assert len(calls) == 1


def test_flapping_slot_is_held_off_with_growing_delays():
    sizes = {}
    r = _recycler(sizes, max_memory_mb=64)
    t = 100.0
    holds = []
    for n, wid in enumerate(range(1, 5)):
        pid = 1000 + wid
        sizes[pid] = 100                    # every new worker of slot 0 is over the limit at once
        r.worker_started(wid, t)
        got = []
        while not got:
            t += 1.0
            got = r.check([(wid, pid, 0)], t)
            assert t < 2000, "never recycled"
        holds.append(t)
        r.worker_gone(wid)
    gaps = [b - a for a, b in zip(holds, holds[1:])]
    # the first recycle is not held; the next ones wait longer and longer
    assert gaps[0] >= R.OVER_SAMPLES + R.hold_delay(1) - 1
    assert gaps[1] > gaps[0] and gaps[2] > gaps[1]
    assert r.slots[0].flaps == 3


def test_a_slot_recycled_rarely_is_not_flapping():
    sizes = {}
    r = _recycler(sizes, max_memory_mb=64)
    t = 0.0
    for wid in (1, 2, 3):
        sizes[wid] = 10
        r.worker_started(wid, t)
        t += R.FLAP_WINDOW + 5                  # lives a while under the limit, then grows
        sizes[wid] = 100
        got = []
        for _ in range(R.OVER_SAMPLES):
            t += 1.0
            got = r.check([(wid, wid, 0)], t)
        assert got and got[0][1] == "memory"
        r.worker_gone(wid)
    assert r.slots[0].flaps == 0


def test_lifetime_with_jitter_in_range():
    r = R.Recycler(max_lifetime=10.0, lifetime_jitter=4.0, rng=random.Random(7))
    for wid in range(1, 41):
        r.worker_started(wid, 0.0)
    deadlines = [w.deadline for w in r.workers.values()]
    assert all(10.0 <= d <= 14.0 for d in deadlines)
    assert len(set(deadlines)) > 30                        # spread, not all at once
    assert r.check([(1, 1, 0)], 9.9) == []
    due = r.check([(w, w, 0) for w in range(1, 41)], 14.0)
    assert {c for _, c, _ in due} == {"lifetime"} and len(due) == 40


def test_disabled_recycler_never_samples():
    r = R.Recycler(rss=lambda pid: pytest.fail("sampled"))
    r.worker_started(1, 0.0)
    assert not r.enabled and r.check([(1, 1, 0)], 5.0) == []


def test_lifecycle_recycle_carries_the_cause():
    lc = P.Lifecycle()
    acts = lc.handle(P.Start(1), 0.0)
    wid = acts[0].wid
    lc.handle(P.Forked(wid, 10), 0.0)
    lc.handle(P.Ready(wid), 0.1)
    acts = lc.handle(P.RecycleRequested(wid, "memory", {"rss_mb": 99.0}), 5.0)
    notes = [a for a in acts if isinstance(a, Note)]
    assert notes[0].kind == "recycle" and notes[0].data == {"slot": 0, "cause": "memory", "rss_mb": 99.0}
    assert [type(a) for a in acts if isinstance(a, P.Spawn)] == [P.Spawn]


# ---- integration: real workers, real load ---------------------------------------------
GROW_APP = H.READ_HEAD + r'''
import json, os
_hog = []

def app(sock, addr):
    data = read_head(sock)
    if data is None:
        return
    path = data.split(b" ", 2)[1].decode()
    if path.startswith("/grow="):
        _hog.append(b"\x01" * (int(path.split("=", 1)[1]) << 20))    # every page written: resident
    body = json.dumps({"pid": os.getpid()}).encode()
    sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))

app.pyfork_interface = "raw"
'''



@pytest.fixture
def growapp(tmp_path):
    (tmp_path / "growapp.py").write_text(GROW_APP)
    return tmp_path


def _rss_mb(pid):
    return (R.rss_bytes(pid) or 0) / MB


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.timeout(180)
def test_memory_recycling_under_load_fails_no_request(growapp, backend):
    with H.Server(growapp, backend.BACKEND, "--max-worker-memory", "64", app="growapp:app") as srv:
        srv.start(ready=2)
        first = H.serving_pids(srv.port)
        assert all(_rss_mb(pid) < 64 for pid in first)           # the limit is above the baseline
        with H.Load(srv.port, threads=4) as load:
            H.wait_until(lambda: load.ok >= 200, what="load running")
            status, body = H.http_get(srv.port, "/grow=96")       # one worker goes over the limit
            assert status == 200
            fat = int(__import__("json").loads(body)["pid"])
            rec = srv.wait_event("recycle", cause="memory", pid=fat)
            assert rec["rss_mb"] > 64 and rec["limit_mb"] == 64
            rep = srv.wait_event("replace", purpose="recycle", old=rec["worker"])
            assert srv.events("ready", worker=rep["worker"])        # the replacement was READY first
            srv.wait_event("exit", pid=fat, code=0, cause="memory")
            mark = load.ok
            H.wait_until(lambda: load.ok >= mark + 200, what="load after the recycle")
        print(f"\nmemory recycling under load (backend {backend.BACKEND}): {load.ok} requests, "
              f"{len(load.failed)} failed")
        assert load.failed == [], load.failed[:10]
        assert srv.count_events("exit", cause=lambda c: c not in ("memory",)) == 0
        assert srv.count_events("recycle", cause="memory") == 1   # hysteresis: the slot does not flap
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.timeout(180)
def test_lifetime_recycling_under_load_fails_no_request(growapp, backend):
    with H.Server(growapp, backend.BACKEND, "--max-worker-lifetime", "2", "--max-worker-lifetime-jitter", "1",
                  app="growapp:app") as srv:
        srv.start(ready=2)
        with H.Load(srv.port, threads=4) as load:
            srv.wait_event("exit", n=4, cause="lifetime", timeout=60)   # each slot recycled twice at least
            for rec in srv.events("recycle"):
                assert rec["cause"] == "lifetime" and rec["age"] >= 2.0
        print(f"\nlifetime recycling under load (backend {backend.BACKEND}): {load.ok} requests, "
              f"{len(load.failed)} failed")
        assert load.failed == [], load.failed[:10]
        assert srv.count_events("exit", cause=lambda c: c != "lifetime") == 0
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@pytest.mark.parametrize("args, msg", [
    (["--max-worker-memory", "-1"], "bad --max-worker-memory -1: must be >= 0"),
    (["--max-worker-memory", "lots"], "expected an integer"),
    (["--max-worker-lifetime", "nan"], "expected a finite number"),
    (["--max-worker-lifetime-jitter", "-2"], "must be >= 0"),
])
def test_bad_recycling_options_exit_2_before_any_fork(tmp_path, args, msg):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pyfork", "serve", *args], cwd=str(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
