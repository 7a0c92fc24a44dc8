"""The central queue: a connection goes only to a worker that can start it now (issue 10),
and back-pressure counts work, not open connections (issue 18).

Real primaries and workers (tests/supervisor_harness.py), real clients; both backends.
With the old dispatch, a connection could be sent to a worker that was inside a slow request
and wait there (rr sent every other one); and 2,000 open connections on 2 workers stopped the
primary from accepting at all. Observed through HTTP answers (which pid served) and the
control socket's per-worker counters (connections sent, requests handled).
"""

import json
import os
import struct
import resource
import selectors
import signal
import socket
import threading
import time

import pytest

from pyfork.primary import control

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(240)]


@pytest.fixture
def apps(tmp_path):
    H.write_apps(tmp_path)
    return tmp_path


def _workers(ctl):
    """pid -> the control status row of that worker."""
    return {w["pid"]: w for w in control.request(ctl, {"cmd": "status"}, timeout=20)["workers"]}


def test_new_connections_go_to_the_idle_worker_while_the_other_is_busy(apps, backend):
    ctl = str(apps / "ctl.sock")
    with H.Server(apps, backend.BACKEND, "--control", ctl) as srv:
        srv.start(ready=2)
        blocker = threading.Thread(target=lambda: _swallow(H.http_get, srv.port, "/block", 60),
                                   daemon=True)
        blocker.start()
        marker = apps / "blocked.pid"
        H.wait_until(lambda: marker.exists() and marker.read_text(), what="a blocked worker")
        busy = int(marker.read_text())
        before = _workers(ctl)
        # One by one, then 6 at once: every one is answered by the idle worker; none waits
        # behind the blocked request (rr used to send every other one there, for ever).
        pids = [H.pid_of(srv.port) for _ in range(6)]
        results = []
        lock = threading.Lock()

        def one():
            try:
                r = H.pid_of(srv.port)
            except (OSError, AssertionError) as e:
                r = repr(e)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        pids += results
        idle = [pid for pid in before if pid != busy]
        assert len(idle) == 1
        assert pids == idle * 12, pids
        after = _workers(ctl)
        # nothing queued at the busy one, nor accepted by it
        assert ((after[busy]["sent"], after[busy]["accepted"])
                == (before[busy]["sent"], before[busy]["accepted"]))
        # each of the 12 connections reached the idle worker once, and was served once: sent by
        # the primary, or (rr's pull: none could start it when it came) accepted by the worker
        got = {k: after[idle[0]][k] - before[idle[0]][k] for k in ("sent", "accepted")}
        assert got["sent"] + got["accepted"] == 12, got
        H.wait_until(lambda: _workers(ctl)[idle[0]]["handled"] - before[idle[0]]["handled"] == 12,
                     what="12 requests handled by the idle worker")
        srv.signal(signal.SIGQUIT)         # stop at once: the blocked request never ends
        srv.wait()
        blocker.join(30)


def _swallow(fn, *a):
    try:
        fn(*a)
    except OSError:
        pass


KEEPALIVE_CONNS = 2500     # more than the old cap: 1000 open connections per worker, 2 workers
_REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _raise_nofile(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, hard


def _open_kept_alive(port, n):
    """n connections that each got one response on HTTP/1.1 and stay open, idle."""
    socks = []
    sel = selectors.DefaultSelector()
    pending = {}
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
            s.sendall(_REQUEST)
            s.setblocking(False)
            pending[s] = b""
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while pending:
            assert time.monotonic() < deadline, f"{len(pending)} of {n} unanswered"
            for key, _ in sel.select(1.0):
                s = key.fileobj
                data = s.recv(65536)
                assert data, "a kept-alive connection was closed before its response"
                pending[s] += data
                head, sep, body = pending[s].partition(b"\r\n\r\n")
                if sep:
                    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                    if len(body) >= length:
                        assert head.startswith(b"HTTP/1.1 200"), head
                        assert b"connection: close" not in head.lower()
                        del pending[s]
                        sel.unregister(s)
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()
    return socks


def test_idle_kept_alive_connections_do_not_lock_out_a_new_client(apps, backend):
    soft, hard = _raise_nofile(2 * KEEPALIVE_CONNS + 200)
    socks = []
    try:
        with H.Server(apps, backend.BACKEND, "--interface", "wsgi",
                      env={"PYFORK_KEEPALIVE_TIMEOUT": "300"}, app="pyfork.demo:app") as srv:
            srv.start(ready=2)
            socks = _open_kept_alive(srv.port, KEEPALIVE_CONNS)
            # 2,500 open and idle: the workers are free, so a new client is served at once.
            status, body = H.http_get(srv.port, "/health", timeout=30)
            assert status == 200, body
            assert json.loads(body)["status"] == "healthy"
            # and the kept-alive ones still work
            for s in socks[:3] + socks[-3:]:
                s.setblocking(True)
                s.settimeout(30)
                s.sendall(_REQUEST)
                assert s.recv(65536).startswith(b"HTTP/1.1 200")
            for s in socks:
                s.close()
            socks = []
            srv.signal(signal.SIGTERM)
            assert srv.wait() == 0
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---- fresh connections: taken, first request not begun (issue 10's last 1 %) -------------

def _writer(backend, e, slot):
    from pyfork.scoreboard import Scoreboard
    return backend.SlotWriter(Scoreboard(e.d.scoreboard, len(e.ends)).slot(slot).line)


def _busy_since(e, slot, ns):
    """Sets slot's busy_since_ns (when its request in progress began)."""
    from pyfork.scoreboard import SLOT_SIZE
    struct.pack_into("<Q", e.d.scoreboard, slot * SLOT_SIZE + 24, ns)


def _pump_until(e, cond, what):
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, (what, e.d.stats())
        e.d.run(0.01)


def _pump(e, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        e.d.run(0.01)


def test_a_connection_taken_but_not_yet_started_counts_as_work(backend, ends):
    """A sync worker that took a connection whose request has not begun (its bytes may not
    have arrived) is not idle: a new connection goes to a worker that can start it, even
    when round robin's turn says otherwise (if the first turned out slow, the second would
    wait behind it). Once the fresh one closes unstarted, the worker is a candidate again."""
    from pyfork.scoreboard import SLOT_SIZE
    e = ends(2)
    w = [_writer(backend, e, s) for s in range(2)]
    for s in range(2):
        w[s].set_capacity(1)
    held = []
    try:
        for i in range(2):                     # rr: client 0 -> slot 0, client 1 -> slot 1
            e.connect()
            e.pump_until_dispatched(i + 1)
        assert [e.d.worker_stats(s)["sent"] for s in range(2)] == [1, 1]
        held += [fd for m in e.take(0) for fd in m]
        w[0].conn_taken(1)                     # slot 0: taken, request not begun
        # young for a minute however slow the machine (a time ahead of now counts as age 0)
        struct.pack_into("<I", e.d.scoreboard, 0 * SLOT_SIZE + 60,
                         (time.monotonic_ns() // 1_000_000 + 60_000) & 0xFFFFFFFF)
        for fd in [fd for m in e.take(1) for fd in m]:
            os.close(fd)                       # slot 1: served and closed its connection
        w[1].conn_taken(1)
        w[1].request_started()
        w[1].request_finished()
        w[1].conn_closed(1)
        e.connect()                            # rr's turn is slot 0, which is not idle
        e.pump_until_dispatched(3)
        assert [e.d.worker_stats(s)["sent"] for s in range(2)] == [1, 2]
        assert e.take(0) == []
        for fd in [fd for m in e.take(1) for fd in m]:
            os.close(fd)
        w[1].conn_taken(1)
        w[1].request_started()                 # slot 1 busy now; slot 0's fresh one closes
        _busy_since(e, 1, time.monotonic_ns() - 10**9)
        os.close(held.pop())
        w[0].conn_closed(1)
        from pyfork.scoreboard import Scoreboard
        assert Scoreboard(e.d.scoreboard, 2).slot(0).fresh == 0
        e.connect()
        e.pump_until_dispatched(4)
        got = e.take(0)
        held += [fd for m in got for fd in m]
        assert [len(m) for m in got] == [1]
    finally:
        for fd in held:
            os.close(fd)


def test_fresh_ms_matches_the_c_core():
    from pyfork.scoreboard import FRESH_MS
    core = pytest.importorskip("pyfork._core")
    assert core._lib.PF_SLOT_FRESH_MS == FRESH_MS


def test_an_idle_connection_does_not_hold_a_sync_worker(apps, backend):
    """A client that connects and sends nothing (a browser's preconnect) is taken by the only
    worker and counts as its work only briefly: a real request behind it is answered."""
    with H.Server(apps, backend.BACKEND, "--interface", "wsgi", app="pyfork.demo:app",
                  workers=1) as srv:
        srv.start(ready=1)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as idle:
            status, body = H.http_get(srv.port, "/health", timeout=30)
            assert status == 200, body
            idle.sendall(_REQUEST)             # and the idle one is still served
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def _prefetched_behind_b(backend, e, b_young_for_ns):
    """Two workers with capacity 1, each running a request (a's long past the prefetch age,
    b's young for `b_young_for_ns`), then two more clients: prefetched behind b's request.
    Returns (writers, held fds, a, b)."""
    w = [_writer(backend, e, s) for s in range(2)]
    for s in range(2):
        w[s].set_capacity(1)
    held = []
    for i in range(2):
        e.connect()
        e.pump_until_dispatched(i + 1)
    a, b = 0, 1
    for s in (a, b):
        held += [fd for m in e.take(s) for fd in m]
        w[s].conn_taken(1)
        w[s].request_started()
    _busy_since(e, a, time.monotonic_ns() - 10**9)
    _busy_since(e, b, time.monotonic_ns() + b_young_for_ns)
    e.connect(2)
    e.pump_until_dispatched(4)
    assert e.d.worker_stats(b)["sent"] == 3                # prefetched behind b's request
    assert e.d.worker_stats(a)["sent"] == 1
    return w, held, a, b


def test_a_connection_queued_behind_a_request_that_became_long_is_served_by_another_worker(
        backend, ends):
    """With every worker busy, connections may be prefetched behind a request that has just
    begun (the worker then goes on to them without a round trip through the primary). If
    that request turns out long, the primary takes them back from the worker's channel
    (through the end it holds) and the first worker that frees up serves them: they never
    wait for the slow request. Nothing is lost, reordered or delivered twice."""
    e = ends(2)
    w, held, a, b = _prefetched_behind_b(backend, e, 2 * 10**9)   # b: young for 2 s, then long
    try:
        # b's request runs long: the prefetched connections come back to the primary
        _pump_until(e, lambda: e.d.stats()["pending"] == 2, "taken back")
        assert e.take(b) == []
        assert e.d.worker_stats(b)["sent"] == 1
        # a frees up first: client 2 (the older) is the first it gets
        if w[a].request_finished():
            backend.send_msg(e.ends[a].fileno(), backend.MSG_CREDIT)
        e.pump_until_dispatched(5)
        got = [fd for m in e.take(a) for fd in m]
        held += got
        w[a].conn_taken(len(got))
        w[a].request_started()                                 # and runs long too
        _busy_since(e, a, time.monotonic_ns() - 10**9)
        if w[b].request_finished():                            # b frees up
            backend.send_msg(e.ends[b].fileno(), backend.MSG_CREDIT)

        def peer_of(fd):
            with socket.socket(fileno=os.dup(fd)) as p:
                return p.getpeername()

        want = [c.getsockname() for c in e.clients[2:]]
        assert peer_of(got[0]) == want[0]
        # client 3 reaches a worker once (if it was queued behind a's new long request,
        # it is taken back from there first): nothing lost, nothing delivered twice
        deadline = time.monotonic() + 30
        while len(got) < 2:
            assert time.monotonic() < deadline, e.d.stats()
            e.d.run(0.01)
            more = [fd for m in e.take(b) for fd in m]
            held += more
            got += more
        assert [peer_of(fd) for fd in got] == want
        _pump(e, 0.05)
        assert e.take(a) == [] and e.take(b) == [] and e.d.stats()["pending"] == 0
    finally:
        for fd in held:
            os.close(fd)


def test_a_connection_queued_behind_a_request_that_may_be_slow_moves_to_a_worker_moving_on(
        backend, ends):
    """Connections prefetched behind a request that has run a quarter of a millisecond (not
    yet the full take-back age) come back as soon as another worker would start them sooner:
    one going through requests that each began just now. While no worker would, they stay
    (moving them would only cost syscalls). In order, each to exactly one worker."""
    from pyfork._pure.internal import RESCUE_NS, TAKEBACK_NS
    e = ends(2)
    w, held, a, b = _prefetched_behind_b(backend, e, 2 * 10**9)   # a: long, b: young
    try:
        def b_may_be_slow():
            # b's request is kept between the two ages at every look: only the rescue moves
            _busy_since(e, b, time.monotonic_ns() - RESCUE_NS - (TAKEBACK_NS - RESCUE_NS) // 4)

        # once, just past the rescue age (a take-back would leave b barred, not bouncing)
        aged_at = time.monotonic_ns()
        _busy_since(e, b, aged_at - RESCUE_NS - 20_000)
        for _ in range(3):
            e.d.run(0)
        if time.monotonic_ns() - aged_at < TAKEBACK_NS - RESCUE_NS - 40_000:
            assert e.d.worker_stats(b)["sent"] == 3     # a is stuck: nothing moved ...
            assert _want_credit(e, a)                   # ... and will say when it frees up
        _busy_since(e, a, time.monotonic_ns() + 2 * 10**9)   # a moves on to a new request
        got = []
        deadline = time.monotonic() + 30
        while len(got) < 2:
            assert time.monotonic() < deadline, e.d.stats()
            b_may_be_slow()
            e.d.run(0)
            more = [fd for m in e.take(a) for fd in m]
            held += more
            got += more

        def peer_of(fd):
            with socket.socket(fileno=os.dup(fd)) as p:
                return p.getpeername()

        assert [peer_of(fd) for fd in got] == [c.getsockname() for c in e.clients[2:]]
        assert e.take(b) == [] and e.d.stats()["pending"] == 0
        assert e.d.worker_stats(b)["sent"] == 1
    finally:
        for fd in held:
            os.close(fd)


def _want_credit(e, slot):
    from pyfork.scoreboard import Scoreboard
    return Scoreboard(e.d.scoreboard, len(e.ends)).slot(slot).want_credit


def test_a_worker_is_not_asked_for_a_credit_once_nothing_waits(backend, ends):
    """Both workers were full when the clients came, so each was asked for a CREDIT (say
    when you free room); the clients were then prefetched and nothing waits in the primary
    any more. The requests are withdrawn: a worker that finishes sends no CREDIT, which
    would be a sendmsg there and a wake-up of the primary, for nothing."""
    e = ends(2)
    w, held, a, b = _prefetched_behind_b(backend, e, 2 * 10**9)   # a: long, b: young
    try:
        e.d.run(0)
        assert not _want_credit(e, a) and not _want_credit(e, b)
        assert not w[a].request_finished()
        assert not w[a].conn_closed(1)
    finally:
        for fd in held:
            os.close(fd)


def test_a_rescued_connection_is_watched_where_it_went(backend, ends):
    """A connection the rescue moves is prefetched again at once behind the worker that would
    start it sooner; the take-back scan is armed for that worker then, so if its request runs
    long too, the connection comes back while the dispatcher sleeps, with nothing else to wake
    it (csrc/tests/test_capacity.c has the same case)."""
    from pyfork._pure.internal import RESCUE_NS
    e = ends(2)
    _w, held, a, b = _prefetched_behind_b(backend, e, 2 * 10**9)   # a: long for now, b: young
    try:
        now = time.monotonic_ns()
        _busy_since(e, b, now - RESCUE_NS - 150_000)           # b's may be slow
        # a has just begun one (stamped 2 ms ahead, so it is still young when the dispatcher
        # looks, however slow this process: the pure backend took > 0.2 ms here at times)
        _busy_since(e, a, now + 2_000_000)
        wakeups = e.d.stats()["wakeups"]
        e.d.run(0.3)
        st = e.d.stats()
        assert st["dispatched"] >= 6 and st["pending"] == 2, st   # moved, and came back
        assert st["wakeups"] - wakeups >= 2, st       # one would be the 0.3 s timeout alone
    finally:
        for fd in held:
            os.close(fd)


def test_a_connection_prefetched_before_the_drain_stays_with_its_worker(backend, ends):
    """A graceful stop reports DRAINED once every accepted connection is with a worker; the
    workers are then told to drain and serve what waits in their channels first. A request
    that runs long after DRAINED must not have its prefetched connections taken back: no
    worker would take them from the primary any more (a client lost its request that way,
    test_production_sigterm_drains_in_flight_requests)."""
    e = ends(2)
    _w, held, _a, b = _prefetched_behind_b(backend, e, 2 * 10**9)   # b: young for now
    try:
        events = []
        e.d.stop_accepting()
        _pump_until(e, lambda: events.extend(e.d.run(0.01)) or any(ev.kind == "drained" for ev in events),
                    "drained")
        _busy_since(e, b, time.monotonic_ns() - 10**9)       # b's request turns long now
        _pump(e, 0.1)
        assert e.d.stats()["pending"] == 0
        assert e.d.worker_stats(b)["sent"] == 3
        got = [fd for m in e.take(b) for fd in m]
        held += got
        assert len(got) == 2                                   # both still in b's channel
    finally:
        for fd in held:
            os.close(fd)
