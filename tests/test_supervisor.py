"""Supervisor integration tests: real forks, real clients, both backends.

Each test runs `python -m pyfork serve` on a tiny raw app (tests/supervisor_harness.py)
and checks the test process's open-fd count is unchanged. What the primary did is read
from its event stream (README "Events": kind + fields), never from log wording; the
order of things is waited for (events, the control socket's status), never slept for.
Few workers, short graceful timeouts, generous liveness timeouts, no timing assertions
(2 shared cores).
"""
import json
import os
import signal
import threading

import pytest

from pyfork.primary import control

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]


@pytest.fixture
def apps(tmp_path):
    H.write_apps(tmp_path)
    return tmp_path


def test_serves_on_every_worker_and_stops_with_0(apps, backend):
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)
        st = srv.started
        assert (st["policy"], st["backend"], st["workers"]) == ("rr", backend.BACKEND, 2)
        pids = H.serving_pids(srv.port, 6)
        assert len(pids) == 2                       # round robin reaches both
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        for pid in pids:
            assert not H.alive(pid)


def test_primary_runs_sched_batch_and_workers_as_started(apps, backend):
    # pyfork.primary.sched: the primary never preempts a busy worker to accept; the workers
    # (the app's code) get the scheduling class the primary was started with.
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)
        pids = H.serving_pids(srv.port, 6)
        assert len(pids) == 2
        assert os.sched_getscheduler(srv.proc.pid) == os.SCHED_BATCH
        assert {os.sched_getscheduler(pid) for pid in pids} == {os.SCHED_OTHER}
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    with H.Server(apps, backend.BACKEND, env={"PYFORK_PRIMARY_SCHED": "normal"}) as srv:
        srv.start(ready=2)
        assert os.sched_getscheduler(srv.proc.pid) == os.SCHED_OTHER
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    with H.Server(apps, backend.BACKEND, env={"PYFORK_PRIMARY_SCHED": "fast"}) as srv:
        assert srv.wait() == 2
        # the one-line startup error is the feature here
        assert "PYFORK_PRIMARY_SCHED must be batch or normal, not 'fast'" in srv.log()
        assert srv.events() == []                   # nothing started


def _sent(ctl):
    """pid -> connections the primary has dispatched to that worker (control socket status)."""
    return {w["pid"]: w["sent"] for w in control.request(ctl, {"cmd": "status"})["workers"]}


def test_sigkilled_worker_replaced_and_queued_connections_not_lost(apps, backend):
    ctl = str(apps / "ctl.sock")
    with H.Server(apps, backend.BACKEND, "--control", ctl, "--interface", "asyncio", app="loopapp:app") as srv:
        srv.start(ready=2)
        # Stall one asyncio worker's event loop: connections sent to it (it has room for 100)
        # queue in its channel, unread.
        blocker = threading.Thread(target=lambda: _swallow(H.http_get, srv.port, "/block", 60), daemon=True)
        blocker.start()
        marker = apps / "blocked.pid"
        H.wait_until(lambda: marker.exists() and marker.read_text(), what="a blocked worker")
        victim = int(marker.read_text())
        before = _sent(ctl)
        results = []
        lock = threading.Lock()

        def one():
            try:
                r = H.http_get(srv.port, "/", timeout=60)
            except OSError as e:
                r = e
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        # Until the victim dies only the other worker answers. Once the primary has
        # dispatched all 8 and the other worker answered every one it got, the rest sit
        # in the victim's channel.
        def queued_at_victim():
            sent = _sent(ctl)
            delta = {pid: n - before.get(pid, 0) for pid, n in sent.items()}
            others = sum(n for pid, n in delta.items() if pid != victim)
            with lock:
                answered = len(results)
            if sum(delta.values()) == 8 and answered == others:
                return delta[victim] or None
            return None
        queued = H.wait_until(queued_at_victim, what="8 connections dispatched, the other worker's answered")
        assert len(results) == 8 - queued
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(results) == 8
        bad = [r for r in results if not (isinstance(r, tuple) and r[0] == 200)]
        assert bad == []                            # every queued connection was served
        srv.wait_event("exit", pid=victim, code=None, signal=signal.SIGKILL, cause="crash")
        srv.wait_event("ready", n=3)                # the replacement
        assert victim not in H.serving_pids(srv.port)
        assert [e["count"] for e in srv.events("recovered")] == [queued]
        assert srv.events("recovered")[0]["pid"] == victim
        blocker.join(30)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def _swallow(fn, *a):
    try:
        fn(*a)
    except OSError:
        pass


def test_worker_failing_at_import_bounded_forks_then_exit_3(apps, backend):
    with H.Server(apps, backend.BACKEND, "--max-restarts", "2", app="badapp:app") as srv:
        code = srv.wait(timeout=90)
        log = srv.log()
        assert code == 3, log
        exits = srv.events("exit")
        assert len(exits) == 4, log                 # 2 slots x max_restarts 2, no more
        assert all(e["code"] == 4 and e["cause"] == "crash" and not e["ready"] for e in exits)
        assert sorted(e["slot"] for e in srv.events("gave_up")) == [0, 1]
        assert [e["delay"] for e in srv.events("backoff")] == [0.2, 0.2]
        assert srv.events("ready") == []
        assert [e["code"] for e in srv.events("shutdown")] == [3]
        assert "boom: this app fails to import inside a worker" in log   # the traceback is logged


def test_rolling_restart_repeated_under_load_fails_nothing(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "20") as srv:
        srv.start(ready=2)
        before = H.serving_pids(srv.port)
        with H.Load(srv.port, threads=3) as load:
            for i in range(3):
                srv.signal(signal.SIGHUP)
                srv.wait_event("reload_complete", n=i + 1, timeout=60)
            ok = load.ok
            H.wait_until(lambda: load.ok >= ok + 20, what="requests after the last reload")
        assert load.failed == [], load.failed[:5]
        after = H.serving_pids(srv.port)
        assert not (before & after)                 # every worker was replaced
        assert srv.count_events("reload_aborted") == 0
        assert [e["generation"] for e in srv.events("reload_complete")] == [1, 2, 3]
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_reload_aborts_when_replacement_fails_and_old_workers_keep_serving(apps, backend):
    with H.Server(apps, backend.BACKEND, app="markapp:app") as srv:
        srv.start(ready=2)
        before = H.serving_pids(srv.port)
        # Break the app on disk: replacements fail at import.
        (apps / "markapp.py").write_text(H.BAD_IN_WORKER_APP + "\n# broken\n")
        srv.signal(signal.SIGHUP)
        srv.wait_event("reload_aborted", reason="exited")
        assert H.serving_pids(srv.port) == before
        assert srv.count_events("reload_complete") == 0
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_graceful_stop_completes_every_slow_request(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "30") as srv:
        srv.start(ready=2)
        results = []
        lock = threading.Lock()
        started = threading.Barrier(5)

        def slow():
            import socket
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as s:
                    s.sendall(b"GET /sleep?ms=1500 HTTP/1.0\r\nConnection: close\r\n\r\n")
                    started.wait(30)
                    buf = b""
                    while True:
                        c = s.recv(65536)
                        if not c:
                            break
                        buf += c
                r = buf.split(b" ", 2)[1] if buf else b"EMPTY"
            except (OSError, threading.BrokenBarrierError) as e:
                r = repr(e)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait(30)                  # all 4 connected and sent before the stop
        srv.signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert results == [b"200"] * 4, results
        assert srv.wait() == 0
        assert srv.events("kill") == []
        assert [e["cause"] for e in srv.events("exit")] == ["drained", "drained"]


def test_hung_worker_is_killed_and_replaced(apps, backend):
    with H.Server(apps, backend.BACKEND, "--timeout", "2") as srv:
        srv.start(ready=2)
        t = threading.Thread(target=lambda: _swallow(H.http_get, srv.port, "/block", 60), daemon=True)
        t.start()
        marker = apps / "blocked.pid"
        H.wait_until(lambda: marker.exists() and marker.read_text(), what="a blocked worker")
        victim = int(marker.read_text())
        srv.wait_event("kill", pid=victim, reason="hung", timeout=60)
        srv.wait_event("exit", pid=victim, signal=signal.SIGKILL, cause="hung", timeout=60)
        srv.wait_event("ready", n=3, timeout=60)
        t.join(30)
        assert victim not in H.serving_pids(srv.port)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_ttin_ttou_change_the_worker_count(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "10") as srv:
        srv.start(ready=2)
        srv.signal(signal.SIGTTIN)
        srv.wait_event("scale", **{"from": 2, "to": 3})
        srv.wait_event("ready", n=3)
        H.wait_until(lambda: len(H.serving_pids(srv.port, 6)) == 3, what="3 pids answering")
        srv.signal(signal.SIGTTOU)
        srv.wait_event("scale", **{"from": 3, "to": 2})
        srv.wait_event("exit", code=0, cause="drained")
        pids = H.serving_pids(srv.port, 6)
        assert len(pids) == 2
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_max_requests_recycles_without_failures(apps, backend):
    with H.Server(apps, backend.BACKEND, "--max-requests", "5", "--max-requests-jitter", "2") as srv:
        srv.start(ready=2)
        first = H.serving_pids(srv.port)
        for _ in range(12):                      # past 5..7 requests per worker
            H.pid_of(srv.port)
        srv.wait_event("recycle")
        # replacement READY first, then the old one drains
        srv.wait_event("replace", n=2, purpose="recycle")
        H.wait_until(lambda: not (H.serving_pids(srv.port) & first), what="recycled pids")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_sigkill_of_the_primary_leaves_no_worker(apps, backend):
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)
        pids = H.serving_pids(srv.port, 6)
        assert len(pids) == 2
        srv.signal(signal.SIGKILL)
        srv.wait()
        H.wait_until(lambda: not any(H.alive(p) for p in pids), timeout=30, what="workers to die")


def test_second_sigint_stops_at_once(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "60") as srv:
        srv.start(ready=2)
        t = threading.Thread(target=lambda: _swallow(H.http_get, srv.port, "/block", 60), daemon=True)
        t.start()
        H.wait_until(lambda: (apps / "blocked.pid").exists(), what="a blocked worker")
        srv.signal(signal.SIGINT)
        srv.wait_event("stop", graceful=True)
        srv.signal(signal.SIGINT)
        assert srv.wait(timeout=30) == 0
        t.join(30)
        assert [e["graceful"] for e in srv.events("stop")] == [True, False]
        assert "stop" in {e["cause"] for e in srv.events("exit")}     # the blocked one, stopped at once


@pytest.mark.parametrize("pol", ["shared", "reuseport", "least"])
def test_other_policies_serve_reload_and_stop(apps, backend, pol):
    with H.Server(apps, backend.BACKEND, "--policy", pol, "--graceful-timeout", "20") as srv:
        srv.start(ready=2)
        with H.Load(srv.port, threads=2) as load:
            srv.signal(signal.SIGHUP)
            srv.wait_event("reload_complete", timeout=60)
        assert load.failed == [], load.failed[:5]
        assert load.ok > 0
        # scale down: with reuseport the removed slot's listener must leave the group
        srv.signal(signal.SIGTTOU)
        srv.wait_event("scale", **{"from": 2, "to": 1})
        srv.wait_event("exit", n=3, code=0)       # 2 replaced by the reload + the scaled-down one
        assert len(H.serving_pids(srv.port, 10)) == 1
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_message_from_worker_reaches_the_primary_and_broadcast_reaches_every_worker(apps, backend):
    # Through the Python API: Node-style callbacks (on) and records (subscribe) in one
    # script, which writes what they saw to a file the test reads after the exit.
    script = apps / "primary.py"
    script.write_text(r'''
import json, sys
import pyfork
c = pyfork.Cluster("app:app", bind=["127.0.0.1:0"], workers=2, interface="raw", graceful_timeout=10)
seen = {"on": [], "records": [], "broadcast": []}
c.on("fork", lambda w: seen["on"].append(["fork", w.id]))
c.on("online", lambda w: seen["on"].append(["online", w.id]))
def ready(w):
    seen["on"].append(["ready", w.id])
    w.send({"hello": w.id})
c.on("ready", ready)
def message(w, obj):
    seen["on"].append(["message", w.id, obj])
    seen["broadcast"].append(c.broadcast({"bcast": obj["from"]}))
c.on("message", message)
c.on("exit", lambda w, code, sig: seen["on"].append(["exit", w.id, code, sig]))
c.subscribe(lambda ev: seen["records"].append(ev.to_dict()))
code = c.run()
with open("seen.json", "w") as f:
    json.dump(seen, f)
sys.exit(code)
''')
    import sys
    with H.Server(apps, backend.BACKEND, argv=[sys.executable, str(script)]) as srv:
        srv.start(ready=2)
        H.http_get(srv.port, "/send")
        msg = srv.wait_event("message")
        assert msg["message"] == {"from": msg["worker"]}
        # the broadcast (sent from the message callback) reached every worker
        lasts = H.wait_until(lambda: [json.loads(H.http_get(srv.port)[1])["last"] for _ in range(4)],
                             what="answers")
        assert all(last == {"bcast": msg["worker"]} for last in lasts), lasts
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    seen = json.loads((apps / "seen.json").read_text())
    on = seen["on"]
    ids = sorted({e[1] for e in on if e[0] == "fork"})
    assert len(ids) == 2
    for kind in ("fork", "online", "ready"):
        assert sorted(e[1] for e in on if e[0] == kind) == ids, on
    assert [e for e in on if e[0] == "message"] == [["message", msg["worker"], {"from": msg["worker"]}]]
    assert sorted(e[1:] for e in on if e[0] == "exit") == [[i, 0, None] for i in ids]
    assert seen["broadcast"] == [2]
    # subscribe() got the same records the JSON-lines reader got, in the same order
    records = seen["records"]
    assert [r["kind"] for r in records] == [r["kind"] for r in srv.events()]
    assert records[-1]["kind"] == "shutdown" and records[-1]["code"] == 0


def _raw_get_unix(path):
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(path)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        buf = b""
        while True:
            c = s.recv(65536)
            if not c:
                break
            buf += c
    return buf


def test_unix_fd_and_ipv6_binds(apps, backend):
    import socket
    import sys
    ux = str(apps / "s.sock")
    inherited = socket.socket()
    inherited.bind(("127.0.0.1", 0))
    inherited.listen(16)
    fd_port = inherited.getsockname()[1]
    has_v6 = socket.has_ipv6
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        has_v6 = False
    argv = [sys.executable, "-m", "pyfork", "serve", "app:app", "--interface", "raw", "-w", "2",
            "-b", "127.0.0.1:0", "-b", f"unix:{ux}", "-b", f"fd://{inherited.fileno()}"]
    if has_v6:
        argv += ["-b", "[::1]:0"]
    with H.Server(apps, backend.BACKEND, argv=argv, pass_fds=[inherited.fileno()]) as s2:
        s2.start(ready=2)
        urls = s2.started["urls"]
        assert urls[1:3] == [f"unix:{ux}", f"http://127.0.0.1:{fd_port}"], urls
        assert b" 200 " in _raw_get_unix(ux)
        assert H.http_get(fd_port)[0] == 200
        if has_v6:
            assert urls[3].startswith("http://[::1]:"), urls
            v6port = int(urls[3].rsplit(":", 1)[1])
            assert H.http_get(v6port, host="::1")[0] == 200
        s2.signal(signal.SIGTERM)
        assert s2.wait() == 0
    inherited.close()
    assert not os.path.exists(ux)               # the primary removes its unix socket


def test_garbage_from_a_worker_is_dropped_and_never_hurts_the_primary(apps, backend):
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)
        before = H.serving_pids(srv.port)
        for _ in range(2):
            assert H.http_get(srv.port, "/garbage")[0] == 200
        # each worker's garbage is followed by a good message: once both are in, so is the garbage
        srv.wait_event("message", n=2, message={"after": "garbage"})
        assert srv.count_events("bad_message", reason="malformed") >= 4
        assert srv.count_events("bad_message", reason="not_json") == 2
        assert srv.count_events("bad_message", reason="bad_control") == 2
        assert H.serving_pids(srv.port) == before
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_ctrl_c_on_the_process_group_is_a_graceful_stop(apps, backend):
    # Ctrl-C sends SIGINT to the whole foreground group: workers ignore it, the primary drains them.
    ctl = str(apps / "ctl.sock")
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "30", "--control", ctl) as srv:
        srv.start(ready=2)
        out = []
        t = threading.Thread(target=lambda: out.append(H.http_get(srv.port, "/sleep?ms=1500", 60)))
        t.start()
        # the slow request is in a worker's handler now (its scoreboard line says so)
        H.wait_until(lambda: any(w["active"] for w in control.request(ctl, {"cmd": "status"})["workers"]),
                     what="a request in progress")
        os.killpg(srv.proc.pid, signal.SIGINT)
        t.join(60)
        assert out and out[0][0] == 200
        assert srv.wait() == 0
        assert [(e["code"], e["cause"]) for e in srv.events("exit")] == [(0, "drained")] * 2


def test_sigterm_to_one_worker_drains_and_replaces_it_without_failures(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "20") as srv:
        srv.start(ready=2)
        victim = H.pid_of(srv.port)
        with H.Load(srv.port, threads=2) as load:
            H.wait_until(lambda: load.ok >= 20, what="load running")
            os.kill(victim, signal.SIGTERM)
            srv.wait_event("leaving", pid=victim)
            srv.wait_event("exit", pid=victim, code=0, cause="drained")
            srv.wait_event("ready", n=3)
            ok = load.ok
            H.wait_until(lambda: load.ok >= ok + 20, what="load served after the replacement")
        assert load.failed == [], load.failed[:5]
        assert victim not in H.serving_pids(srv.port)
        assert srv.events("backoff") == []
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


VERSIONED_APP = H.READ_HEAD.replace("%", "%%") + r'''
VERSION = "%s"
def app(sock, addr):
    if read_head(sock) is None:
        return
    body = VERSION.encode()
    sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %%d\r\nConnection: close\r\n\r\n%%s" %% (len(body), body))
'''


def test_hup_runs_the_code_now_on_disk(apps, backend):
    (apps / "verapp.py").write_text(VERSIONED_APP % "one")
    with H.Server(apps, backend.BACKEND, app="verapp:app") as srv:
        srv.start(ready=2)
        assert {H.http_get(srv.port)[1] for _ in range(4)} == {b"one"}
        (apps / "verapp.py").write_text(VERSIONED_APP % "version-two")   # a different size: no stale .pyc
        srv.signal(signal.SIGHUP)
        srv.wait_event("reload_complete")
        assert {H.http_get(srv.port)[1] for _ in range(4)} == {b"version-two"}
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
