"""--metrics: Prometheus text served by the primary (pyfork.primary.metrics), both backends.

Real forks, a real HTTP client, the output parsed by prometheus_client.parser. Counts are
compared exactly with the requests the test sent; order is waited for through the event
stream and the scrape itself, never slept for.
"""
import json
import os
import signal
import threading

import pytest

import obs_harness as O
import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]


@pytest.fixture
def apps(tmp_path):
    O.write_apps(tmp_path)
    return tmp_path


def _serve(apps, backend, *args, workers=2):
    return H.Server(apps, backend.BACKEND, "--interface", "wsgi", "--metrics", "127.0.0.1:0", *args,
                    app="wapp:app", workers=workers)


def _wait_requests(url, want):
    return H.wait_until(lambda: O.total(O.scrape(url), "pyfork_requests_total") == want or None,
                        what=f"pyfork_requests_total == {want}")


@pytest.mark.parametrize("policy", ["rr", "shared"])
def test_metrics_parse_and_name_the_contract(apps, backend, policy):
    with _serve(apps, backend, "--policy", policy) as srv:
        srv.start(ready=2)
        url = srv.started["metrics"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        for _ in range(4):
            assert O.request(srv.port, "/")[0] == 200
        _wait_requests(url, 4)
        m = O.scrape(url)
        names = {n for n, _ in m}
        for name in ("pyfork_requests_total", "pyfork_connections_total", "pyfork_dispatch_pending",
                     "pyfork_backpressure_total", "pyfork_pulls_total", "pyfork_fd_exhaustion_total",
                     "pyfork_workers",
                     "pyfork_worker_restarts_total", "pyfork_inflight", "pyfork_busy_seconds_total",
                     "pyfork_worker_rss_bytes", "process_resident_memory_bytes", "process_cpu_seconds_total"):
            assert name in names, name
        assert O.by_label(m, "pyfork_workers", "state") == {
            "spawning": 0, "ready": 2, "draining": 0, "backoff": 0, "gave_up": 0}
        assert set(O.by_label(m, "pyfork_worker_restarts_total", "cause")) == {
            "crash", "signal", "timeout", "max_requests", "memory", "lifetime", "reload", "scale"}
        # scrapes are not connections; under shared the workers accepted them
        assert O.total(m, "pyfork_connections_total") == 4
        assert all(v > 0 for v in O.by_label(m, "pyfork_worker_rss_bytes", "slot").values())
        assert set(O.by_label(m, "pyfork_requests_total", "slot")) == {"0", "1"}
        # other paths and methods: a clear status, never the primary's problem
        import urllib.request, urllib.error
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=10)
        assert e.value.code == 404
        e.value.close()
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_requests_total_is_exact_across_a_killed_worker(apps, backend):
    with _serve(apps, backend) as srv:
        srv.start(ready=2)
        url = srv.started["metrics"]
        before = O.total(O.scrape(url), "pyfork_requests_total")
        pids = set()
        for _ in range(250):
            pids.add(O.pid_of(srv.port))
        # the last response may reach us before its worker counted it: wait for the count,
        # then kill a worker mid-run
        _wait_requests(url, before + 250)
        per_slot = O.by_label(O.scrape(url), "pyfork_requests_total", "slot")
        victim = sorted(pids)[0]
        import os
        os.kill(victim, signal.SIGKILL)
        srv.wait_event("exit", pid=victim, signal=signal.SIGKILL)
        srv.wait_event("ready", n=3)
        after_kill = O.by_label(O.scrape(url), "pyfork_requests_total", "slot")
        assert after_kill == per_slot                     # folded into its slot: never goes back
        for _ in range(250):
            assert O.request(srv.port, "/")[0] == 200
        _wait_requests(url, before + 500)
        m = O.scrape(url)
        assert O.total(m, "pyfork_requests_total") - before == 500
        assert O.by_label(m, "pyfork_worker_restarts_total", "cause")["signal"] == 1
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def _histogram(m, name="pyfork_request_duration_seconds"):
    """({le: cumulative count}, sum, count) of a histogram in a parsed scrape."""
    le = {dict(labels)["le"]: v for (n, labels), v in m.items() if n == name + "_bucket"}
    return le, O.total(m, name + "_sum"), O.total(m, name + "_count")


def _wait_count(url, want):
    return H.wait_until(lambda: _histogram(O.scrape(url))[2] == want or None,
                        what=f"pyfork_request_duration_seconds_count == {want}")


def test_request_duration_histogram_counts_each_request_once_across_a_kill(apps, backend):
    with _serve(apps, backend) as srv:
        srv.start(ready=2)
        url = srv.started["metrics"]
        le0, sum0, count0 = _histogram(O.scrape(url))
        assert list(le0) == ["0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                             "1.0", "2.5", "5.0", "10.0", "+Inf"]
        assert count0 == le0["+Inf"] == O.total(O.scrape(url), "pyfork_requests_total")
        pids = set()
        for _ in range(20):                      # each one sleeps 30 ms: above the 25 ms bound
            status, body = O.request(srv.port, "/sleep?ms=30")
            assert status == 200
            pids.add(json.loads(body)["pid"])
        _wait_count(url, count0 + 20)
        m = O.scrape(url)
        le, total_s, count = _histogram(m)
        assert count == count0 + 20 == le["+Inf"]
        assert le["0.025"] == le0["0.025"]       # none of them took 25 ms or less
        assert total_s - sum0 >= 20 * 0.030
        assert all(le[a] <= le[b] for a, b in zip(list(le), list(le)[1:]))     # cumulative
        # a dead worker's buckets stay in its slot: the histogram never goes back
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        srv.wait_event("exit", pid=victim, signal=signal.SIGKILL)
        srv.wait_event("ready", n=3)
        assert _histogram(O.scrape(url)) == (le, total_s, count)
        for _ in range(30):
            assert O.request(srv.port, "/")[0] == 200
        _wait_count(url, count0 + 50)
        le2, _, count2 = _histogram(O.scrape(url))
        assert count2 == count0 + 50 == le2["+Inf"]
        assert all(le2[k] >= le[k] for k in le)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_restarts_counted_by_cause_kill_timeout_max_requests(apps, backend):
    import os
    with _serve(apps, backend, "--timeout", "3", "--max-requests", "30") as srv:
        srv.start(ready=2)
        url = srv.started["metrics"]
        # a kill from outside: cause "signal"
        victim = O.pid_of(srv.port)
        os.kill(victim, signal.SIGKILL)
        srv.wait_event("exit", pid=victim, cause="crash")
        srv.wait_event("ready", n=3)
        # a hung worker: SIGABRT, then SIGKILL; cause "timeout"
        t = threading.Thread(target=lambda: _swallow(O.request, srv.port, "/stuck"), daemon=True)
        t.start()
        hung = srv.wait_event("kill", reason="hung", timeout=60)
        srv.wait_event("exit", pid=hung["pid"], cause="hung", timeout=60)
        srv.wait_event("ready", n=4, timeout=60)
        t.join(30)
        # max-requests recycling: cause "max_requests"
        for _ in range(70):
            assert O.request(srv.port, "/")[0] == 200
        rec = srv.wait_event("replace", purpose="recycle", timeout=60)
        srv.wait_event("exit", worker=rec["old"], cause="max_requests", timeout=60)
        recycled = {e["worker"] for e in srv.events("recycle")}
        restarts = None

        def settled():
            nonlocal restarts
            gone = {e["worker"] for e in srv.events("exit")} & recycled
            restarts = O.by_label(O.scrape(url), "pyfork_worker_restarts_total", "cause")
            return restarts["max_requests"] == len(gone)
        H.wait_until(settled, what="restart counters matching the exits")
        assert restarts["signal"] == 1
        assert restarts["timeout"] == 1
        assert restarts["max_requests"] >= 1
        assert restarts["crash"] == restarts["reload"] == restarts["scale"] == 0
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        # a stop is not a restart
        final = [e for e in srv.events("exit") if e["cause"] == "drained"]
        assert final


def test_status_json_shows_the_same_numbers(apps, backend, tmp_path):
    ctl = str(tmp_path / "ctl.sock")
    with _serve(apps, backend, "--control", ctl) as srv:
        srv.start(ready=2)
        for _ in range(10):
            assert O.request(srv.port, "/")[0] == 200
        _wait_requests(srv.started["metrics"], 10)
        from pyfork.primary import control
        st = control.request(ctl, {"cmd": "status"})
        assert sum(st["totals"]["requests"].values()) == 10
        dur = st["totals"]["request_duration"]
        assert dur["count"] == dur["le"]["+Inf"] == 10 and dur["sum_seconds"] > 0
        assert sum(sum(w["durations"]["counts"]) for w in st["workers"]) == 10
        assert set(st["totals"]["restarts"]) >= {"crash", "signal", "timeout", "max_requests"}
        assert st["dispatch"]["accepted"] == 10
        assert all(w["rss"] > 0 for w in st["workers"])
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@pytest.mark.parametrize("addr", ["fd://3", "bogus", "256.0.0.1:80"])
def test_bad_metrics_address_exits_2_before_any_fork(apps, backend, addr):
    with H.Server(apps, backend.BACKEND, "--metrics", addr, app="wapp:app") as srv:
        assert srv.wait() == 2
        lines = [l for l in srv.log().splitlines() if l.strip()]
        assert len(lines) == 1 and "metrics" in lines[0], lines
        assert srv.count_events("fork") == 0


def test_metrics_port_in_use_exits_2(apps, backend):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with H.Server(apps, backend.BACKEND, "--metrics", f"127.0.0.1:{port}", app="wapp:app") as srv:
            assert srv.wait() == 2
            lines = [l for l in srv.log().splitlines() if l.strip()]
            assert len(lines) == 1 and "--metrics" in lines[0], lines
            assert srv.count_events("fork") == 0


def _swallow(fn, *args):
    try:
        fn(*args)
    except (OSError, IndexError, ValueError):     # the hung worker's connection dies with it
        pass
