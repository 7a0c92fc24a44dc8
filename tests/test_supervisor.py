"""Supervisor integration tests: real forks, real clients, both backends.

Each test runs `python -m pyfork serve` on a tiny raw app (tests/supervisor_harness.py)
and checks the test process's open-fd count is unchanged. Few workers, short graceful
timeouts, generous liveness timeouts, no timing assertions (2 shared cores).
"""
import json
import os
import signal
import threading
import time

import pytest

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]


@pytest.fixture
def apps(tmp_path):
    H.write_apps(tmp_path)
    return tmp_path


def test_serves_on_every_worker_and_stops_with_0(apps, backend):
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)
        assert f"(policy rr, backend {backend.BACKEND}, 2 workers)" in srv.log()
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
        assert "PYFORK_PRIMARY_SCHED must be batch or normal, not 'fast'" in srv.log()


def test_sigkilled_worker_replaced_and_queued_connections_not_lost(apps, backend):
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)
        # Stall one worker inside a handler: connections sent to it queue in its channel.
        blocker = threading.Thread(target=lambda: _swallow(H.http_get, srv.port, "/block", 60), daemon=True)
        blocker.start()
        marker = apps / "blocked.pid"
        H.wait_until(lambda: marker.exists() and marker.read_text(), what="a blocked worker")
        victim = int(marker.read_text())
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
        # Until the victim dies only the other worker answers: once the number of answers
        # stops growing, the unanswered rest sit in the victim's channel.
        H.wait_until(lambda: len(results) >= 1, what="first answers")
        seen, since = -1, time.monotonic()
        while time.monotonic() - since < 0.7:
            if len(results) != seen:
                seen, since = len(results), time.monotonic()
            time.sleep(0.05)
        assert len(results) < 8
        os.kill(victim, signal.SIGKILL)
        for t in threads:
            t.join(60)
        assert len(results) == 8
        bad = [r for r in results if not (isinstance(r, tuple) and r[0] == 200)]
        assert bad == []                            # every queued connection was served
        srv.wait_log(rf"pid {victim}\) exited code=None signal=9")
        srv.wait_log(r"ready", n=3)                 # the replacement
        assert victim not in H.serving_pids(srv.port)
        recovered = srv.count(r"recovered \d+ queued connection")
        assert recovered == 1, srv.log()
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
        forks = srv.count(r"worker \d+ \(pid \d+\) exited code=4")
        assert forks == 4, log                      # 2 slots x max_restarts 2, no more
        assert srv.count(r"GIVES UP") == 2
        assert "boom: this app fails to import inside a worker" in log   # traceback logged
        assert "respawning in 200 ms" in log


def test_rolling_restart_repeated_under_load_fails_nothing(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "20") as srv:
        srv.start(ready=2)
        before = H.serving_pids(srv.port)
        with H.Load(srv.port, threads=3) as load:
            for i in range(3):
                srv.signal(signal.SIGHUP)
                srv.wait_log(r"reload complete", n=i + 1, timeout=60)
            time.sleep(0.3)
        assert load.failed == [], load.failed[:5]
        assert load.ok > 0
        after = H.serving_pids(srv.port)
        assert not (before & after)                 # every worker was replaced
        assert srv.count(r"reload ABORTED") == 0
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_reload_aborts_when_replacement_fails_and_old_workers_keep_serving(apps, backend):
    with H.Server(apps, backend.BACKEND, app="markapp:app") as srv:
        srv.start(ready=2)
        before = H.serving_pids(srv.port)
        # Break the app on disk: replacements fail at import.
        (apps / "markapp.py").write_text(H.BAD_IN_WORKER_APP + "\n# broken\n")
        srv.signal(signal.SIGHUP)
        srv.wait_log(r"reload ABORTED")
        assert H.serving_pids(srv.port) == before
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
        assert "killing" not in srv.log()


def test_hung_worker_is_killed_and_replaced(apps, backend):
    with H.Server(apps, backend.BACKEND, "--timeout", "2") as srv:
        srv.start(ready=2)
        t = threading.Thread(target=lambda: _swallow(H.http_get, srv.port, "/block", 60), daemon=True)
        t.start()
        marker = apps / "blocked.pid"
        H.wait_until(lambda: marker.exists() and marker.read_text(), what="a blocked worker")
        victim = int(marker.read_text())
        srv.wait_log(rf"pid {victim}\) hung: no heartbeat", timeout=60)
        srv.wait_log(r"ready", n=3, timeout=60)
        t.join(30)
        assert victim not in H.serving_pids(srv.port)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_ttin_ttou_change_the_worker_count(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "10") as srv:
        srv.start(ready=2)
        srv.signal(signal.SIGTTIN)
        srv.wait_log(r"scaling from 2 to 3 workers")
        srv.wait_log(r"ready", n=3)
        H.wait_until(lambda: len(H.serving_pids(srv.port, 6)) == 3, what="3 pids answering")
        srv.signal(signal.SIGTTOU)
        srv.wait_log(r"scaling from 3 to 2 workers")
        srv.wait_log(r"exited code=0", n=1)
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
        srv.wait_log(r"reached max_requests")
        srv.wait_log(r"replaces worker", n=2)    # replacement READY first, then the old one drains
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
        srv.wait_log(r"SIGINT: graceful stop")
        srv.signal(signal.SIGINT)
        assert srv.wait(timeout=30) == 0
        t.join(30)
        assert "stopping at once" in srv.log()


@pytest.mark.parametrize("pol", ["shared", "reuseport", "least"])
def test_other_policies_serve_reload_and_stop(apps, backend, pol):
    with H.Server(apps, backend.BACKEND, "--policy", pol, "--graceful-timeout", "20") as srv:
        srv.start(ready=2)
        with H.Load(srv.port, threads=2) as load:
            srv.signal(signal.SIGHUP)
            srv.wait_log(r"reload complete", timeout=60)
        assert load.failed == [], load.failed[:5]
        assert load.ok > 0
        # scale down: with reuseport the removed slot's listener must leave the group
        srv.signal(signal.SIGTTOU)
        srv.wait_log(r"scaling from 2 to 1")
        srv.wait_log(r"exited code=0", n=3)       # 2 replaced by the reload + the scaled-down one
        assert len(H.serving_pids(srv.port, 10)) == 1
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_message_from_worker_reaches_primary_log(apps, backend):
    # Through the Python API: a script that logs every message event.
    script = apps / "primary.py"
    script.write_text(r'''
import logging, sys
import pyfork
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
c = pyfork.Cluster("app:app", bind=["127.0.0.1:0"], workers=2, interface="raw", graceful_timeout=10)
events = []
c.on("fork", lambda w: events.append("fork"))
c.on("online", lambda w: events.append("online"))
def ready(w):
    events.append("ready")
    w.send({"hello": w.id})
c.on("ready", ready)
def message(w, obj):
    logging.getLogger("test").info("message from %d: %s", w.id, obj)
    logging.getLogger("test").info("broadcast to %d", c.broadcast({"bcast": obj["from"]}))
c.on("message", message)
c.on("exit", lambda w, code, sig: logging.getLogger("test").info("exit event %d %s %s", w.id, code, sig))
code = c.run()
logging.getLogger("test").info("events %s", ",".join(sorted(set(events))))
sys.exit(code)
''')
    import sys
    with H.Server(apps, backend.BACKEND, argv=[sys.executable, str(script)]) as srv:
        srv.start(ready=2)
        H.http_get(srv.port, "/send")
        srv.wait_log(r"message from \d+: \{'from': \d+\}")
        srv.wait_log(r"broadcast to 2")
        lasts = [json.loads(H.http_get(srv.port)[1])["last"] for _ in range(4)]
        assert all(last == {"bcast": lasts[0]["bcast"]} for last in lasts), lasts
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert srv.count(r"exit event \d+ 0 None") == 2
        assert "events fork,online,ready" in srv.log()


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
        line = s2.wait_log(r"Listening at .*").group(0)
        assert f"unix:{ux}" in line and f"http://127.0.0.1:{fd_port}" in line
        assert b" 200 " in _raw_get_unix(ux)
        assert H.http_get(fd_port)[0] == 200
        if has_v6:
            v6port = int(s2.wait_log(r"http://\[::1\]:(\d+)").group(1))
            assert H.http_get(v6port, host="::1")[0] == 200
        s2.signal(signal.SIGTERM)
        assert s2.wait() == 0
    inherited.close()
    assert not os.path.exists(ux)               # the primary removes its unix socket


def test_garbage_from_a_worker_is_dropped_and_never_hurts_the_primary(apps, backend):
    script = apps / "primary.py"
    script.write_text(r'''
import logging, sys
import pyfork
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
c = pyfork.Cluster("app:app", bind=["127.0.0.1:0"], workers=2, interface="raw", graceful_timeout=10)
c.on("message", lambda w, obj: logging.getLogger("test").info("message from %d: %s", w.id, obj))
sys.exit(c.run())
''')
    import sys
    with H.Server(apps, backend.BACKEND, argv=[sys.executable, str(script)]) as srv:
        srv.start(ready=2)
        before = H.serving_pids(srv.port)
        for _ in range(2):
            assert H.http_get(srv.port, "/garbage")[0] == 200
        srv.wait_log(r"message from \d+: \{'after': 'garbage'\}", n=2)
        assert srv.count(r"dropped a malformed message") >= 4
        assert srv.count(r"dropped a message that is not JSON") == 2
        assert srv.count(r"dropped a malformed control message") == 2
        assert H.serving_pids(srv.port) == before
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_ctrl_c_on_the_process_group_is_a_graceful_stop(apps, backend):
    # Ctrl-C sends SIGINT to the whole foreground group: workers ignore it, the primary drains them.
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "30") as srv:
        srv.start(ready=2)
        out = []
        t = threading.Thread(target=lambda: out.append(H.http_get(srv.port, "/sleep?ms=1500", 60)))
        t.start()
        H.wait_until(lambda: any(H.pid_of(srv.port) for _ in range(1)), what="server up")
        time.sleep(0.3)                   # the slow request is in a worker's handler now
        os.killpg(srv.proc.pid, signal.SIGINT)
        t.join(60)
        assert out and out[0][0] == 200
        assert srv.wait() == 0
        assert srv.count("exited code=0") == 2


def test_sigterm_to_one_worker_drains_and_replaces_it_without_failures(apps, backend):
    with H.Server(apps, backend.BACKEND, "--graceful-timeout", "20") as srv:
        srv.start(ready=2)
        victim = H.pid_of(srv.port)
        with H.Load(srv.port, threads=2) as load:
            time.sleep(0.3)
            os.kill(victim, signal.SIGTERM)
            srv.wait_log(rf"pid {victim}\) got SIGTERM; draining it")
            srv.wait_log(rf"pid {victim}\) exited code=0")
            srv.wait_log(r"ready", n=3)
            time.sleep(0.3)
        assert load.failed == [], load.failed[:5]
        assert victim not in H.serving_pids(srv.port)
        assert srv.count("rapid crash") == 0
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
        srv.wait_log(r"reload complete")
        assert {H.http_get(srv.port)[1] for _ in range(4)} == {b"version-two"}
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
