"""The dispatcher with forked workers, both backends (csrc/tests/test_dispatch_fork.c).

Theory of operation: the dispatcher runs in this process, real workers are
forked children (backend_harness.worker_main) that use only the same backend's
recv_msg and the scoreboard and end in os._exit, and real clients learn which
worker served them from the reply. Covers rr/least choice, busy and full
workers, a SIGKILLed worker's connections, messages and credit, back-pressure,
draining, fd leaks over many connections and fd exhaustion (EMFILE). Only
liveness timeouts, no timing assertions (the CPU check in the EMFILE test is a
generous ratio against wall time).
"""

import errno
import json
import os
import random
import resource
import signal
import socket
import time

import pytest

from backend_harness import LIVENESS, close_fds_except, readable, seqpacket_pair, worker_main

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]


# ---- dispatching ------------------------------------------------------------

def test_rr_order(rig):
    r = rig(3)
    for slot in range(3):
        r.spawn(slot, "reply")
    got = []
    for _ in range(9):
        s = r.client()
        got.append(r.served_by(s))
        s.close()
    assert sorted(got[:3]) == [0, 1, 2], got
    assert got == got[:3] * 3, got
    st = r.d.stats()
    assert st["accepted"] == 9 and st["dispatched"] == 9 and st["pending"] == 0
    for slot in range(3):
        assert r.d.worker_stats(slot)["sent"] == 3
    # Closed counts come back through the scoreboard.
    r.pump(lambda: all(r.d.worker_stats(i)["inflight"] == 0 for i in range(3)),
           what="closes")


def test_only_ready_workers_get_connections(rig):
    r = rig(3)
    r.spawn(0, "reply", ready=False)
    r.spawn(1, "reply")
    r.spawn(2, "reply")
    r.d.set_draining(2)
    assert r.d.worker_stats(0)["state"] == r.be.STATE_SPAWNING
    assert r.d.worker_stats(2)["state"] == r.be.STATE_DRAINING
    for _ in range(4):
        s = r.client()
        assert r.served_by(s) == 1
        s.close()
    r.d.set_ready(0)
    got = set()
    for _ in range(4):
        s = r.client()
        got.add(r.served_by(s))
        s.close()
    assert got == {0, 1}


def test_least_chooses_emptiest(rig):
    r = rig(3, policy="least")
    for slot in range(3):
        r.spawn(slot, "hold")
    rng = random.Random(1234)
    held = {0: [], 1: [], 2: []}
    for step in range(15):
        # Close a random number of held connections, wait until the
        # scoreboard shows it, then the next connection must go to a worker
        # with the fewest in flight.
        for slot in held:
            for _ in range(rng.randint(0, len(held[slot]))):
                held[slot].pop().close()
        r.pump(lambda: all(r.d.worker_stats(i)["inflight"] == len(held[i]) for i in held),
               what="inflight to match")
        before = {i: r.d.worker_stats(i)["inflight"] for i in held}
        s = r.client()
        slot = r.served_by(s)
        assert before[slot] == min(before.values()), (step, before, slot)
        held[slot].append(s)
    for lst in held.values():
        for s in lst:
            s.close()


def test_full_worker_skipped(rig):
    """A worker at max_inflight (it never reads its channel) gets nothing more;
    everything else goes to the other worker."""
    r = rig(2, max_inflight=2)
    r.spawn(0, "stall")
    r.spawn(1, "reply")
    clients = []
    for i in range(8):
        clients.append(r.client())
        r.pump(lambda: r.d.stats()["dispatched"] == i + 1, what="dispatch %d" % i)
    assert r.d.worker_stats(0)["sent"] == 2
    assert r.d.worker_stats(1)["sent"] == 6
    assert r.d.stats()["busy_skips"] >= 1
    r.pump(lambda: sum(readable(s.fileno()) for s in clients) == 6, what="6 replies")
    assert [s.recv(8) for s in clients if readable(s.fileno())] == [b"1\n"] * 6


def test_busy_channel_skipped(rig):
    """A worker whose channel is full (EAGAIN) is skipped, not waited for."""
    r = rig(2, max_inflight=1000)
    r.spawn(0, "stall", sndbuf=1)  # the kernel's minimum send buffer
    r.spawn(1, "reply")
    clients = []
    for i in range(40):
        clients.append(r.client())
        r.pump(lambda: r.d.stats()["dispatched"] == i + 1, what="dispatch %d" % i)
    st = r.d.stats()
    assert st["busy_skips"] >= 1, st
    sent0 = r.d.worker_stats(0)["sent"]
    assert 0 < sent0 < 20 and r.d.worker_stats(1)["sent"] == 40 - sent0
    # The stalled worker dies; what was queued to it is not lost.
    assert r.stop_worker(0) == sent0
    assert r.d.stats()["redispatched"] == sent0
    for s in clients:
        assert r.served_by(s) == 1


def test_sigkilled_worker_connections_redispatched(rig):
    r = rig(3)
    r.spawn(0, "stall")
    r.spawn(1, "reply")
    r.spawn(2, "reply")
    clients = [r.client() for _ in range(12)]
    r.pump(lambda: r.d.stats()["dispatched"] == 12, what="12 dispatched")
    queued = r.d.worker_stats(0)["sent"]
    assert queued >= 1
    # Nobody has read the ones sent to worker 0: they sit in its channel.
    pid = r.pids.pop(0)
    os.kill(pid, signal.SIGKILL)
    r.procs.wait(pid)
    assert r.d.remove_worker(0) == queued
    assert r.d.worker_stats(0)["state"] == r.be.STATE_FREE
    slots = [r.served_by(s) for s in clients]
    assert set(slots) <= {1, 2} and len(slots) == 12
    st = r.d.stats()
    assert st["redispatched"] == queued and st["dispatched"] == 12 + queued
    assert st["dropped"] == 0


def test_hangup_without_peer(rig):
    r = rig(2)
    r.spawn(0, "reply", peer=False)
    r.spawn(1, "reply")
    r.be.send_msg(r.chans[0], r.be.MSG_USER, 0, b"quit")
    assert os.waitstatus_to_exitcode(r.procs.wait(r.pids.pop(0))) == 0
    evs = r.pump(lambda: r.d.worker_stats(0)["state"] == r.be.STATE_GONE, what="hangup")
    evs += r.d.run(0.05)
    assert [e for e in evs if e.kind == "hangup"] == [r.be.Event("hangup", 0, 0)]
    r.d.set_draining(0)  # vacuously done
    with pytest.raises(BrokenPipeError):
        r.d.set_ready(0)
    assert r.d.worker_stats(0)["state"] == r.be.STATE_GONE
    s = r.client()
    assert r.served_by(s) == 1
    assert r.d.remove_worker(0) == 0
    r.spawn(0, "reply")  # the slot can be used again


def test_messages_and_credit(rig):
    r = rig(2)
    r.spawn(0, "reply", ready=False, announce=True)
    evs = []
    deadline = time.monotonic() + LIVENESS
    while not evs:
        assert time.monotonic() < deadline
        evs = r.d.run(0.1)
    # The CREDIT sent first was consumed by the dispatcher; READY is ours.
    assert evs == [r.be.Event("message", 0, 0)]
    assert r.d.run(0.05) == [r.be.Event("message", 0, 0)]  # left unread: reported again
    msg = r.be.recv_msg(r.chans[0])
    assert msg.type == r.be.MSG_READY and msg.arg == r.pids[0]
    assert r.d.run(0.1) == []

def test_back_pressure(rig):
    """Workers that never close: the dispatcher stops accepting (listeners out of
    the poll set, pending bounded) and resumes after closes + credit."""
    r = rig(2, max_inflight=2, max_pending=4, accept_batch=4)
    r.spawn(0, "hold")
    r.spawn(1, "hold")
    clients = [r.client() for _ in range(12)]
    r.pump(lambda: r.d.stats()["dispatched"] >= 4 and r.d.stats()["accepting"] == 0,
           what="listeners out of the poll set")
    for _ in range(10):  # a while longer: nothing more goes out
        r.d.run(0.02)
    st = r.d.stats()
    assert st["dispatched"] == 4 and st["accepting"] == 0, st
    assert st["pending"] <= 4 and st["accepted"] <= 8, st
    served = [s for s in clients if readable(s.fileno(), 0)]
    assert len(served) == 4
    # Close two: the workers close theirs, send credit, and two more go out.
    for s in served[:2]:
        assert s.recv(8).endswith(b"\n")
        s.close()
    r.pump(lambda: r.d.stats()["dispatched"] >= 6, what="resume after credit")
    # Drain all of them.
    done = set(id(s) for s in served[:2])
    deadline = time.monotonic() + LIVENESS
    while len(done) < 12:
        assert time.monotonic() < deadline, r.d.stats()
        r.d.run(0.02)
        for s in clients:
            if id(s) not in done and readable(s.fileno(), 0):
                assert s.recv(8).endswith(b"\n")
                s.close()
                done.add(id(s))
    st = r.d.stats()
    assert st["accepted"] == 12 and st["dispatched"] == 12 and st["dropped"] == 0


def test_stop_accepting_drains_backlog(rig):
    r = rig(1)
    r.spawn(0, "reply")
    clients = [r.client() for _ in range(20)]  # in the kernel backlog only
    r.d.stop_accepting()
    evs = []
    deadline = time.monotonic() + LIVENESS
    while not any(e.kind == "drained" for e in evs):
        assert time.monotonic() < deadline, r.d.stats()
        evs += r.d.run(0.05)
    assert [e for e in evs if e.kind == "drained"] == [r.be.Event("drained", -1, 0)]
    st = r.d.stats()
    assert st["accepted"] == 20 and st["pending"] == 0 and st["accepting"] == 0
    for s in clients:
        assert r.served_by(s) == 0
    late = r.client()
    end = time.monotonic() + 0.3
    more = []
    while time.monotonic() < end:
        more += r.d.run(0.05)
    assert not [e for e in more if e.kind == "drained"]  # reported once
    assert r.d.stats()["accepted"] == 20 and not readable(late.fileno(), 0)


def test_ten_thousand_connections_no_fd_leak(rig, open_fds):
    r = rig(2, listener="unix")
    r.spawn(0, "sink")
    r.spawn(1, "sink")
    before = open_fds()
    total = 10_000
    done = 0
    while done < total:
        n = min(250, total - done)
        for _ in range(n):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(r.addr)
            c.close()
        done += n
        r.pump(lambda: r.d.stats()["accepted"] == done, what="%d accepted" % done)
    r.pump(lambda: sum(r.d.worker_stats(i)["closed"] for i in (0, 1)) == total,
           what="workers closed all")
    st = r.d.stats()
    assert st["dispatched"] == total and st["pending"] == 0 and st["dropped"] == 0
    assert abs(r.d.worker_stats(0)["sent"] - r.d.worker_stats(1)["sent"]) <= 64
    assert open_fds() == before


# ---- fd exhaustion -------------------------------------------------------------

def _exhausted_primary(be, report_w, ctl_r, n_clients, hold_s):
    """Forked primary: a dispatcher with one worker, then RLIMIT_NOFILE so low
    that every accept fails with EMFILE for hold_s seconds; reports its CPU time
    over that period; then frees fds and serves until the test says done."""
    close_fds_except({report_w, ctl_r})
    d = be.Dispatcher(1, emfile_pause_ms=100)
    lfd = be.listen_tcp("127.0.0.1", 0)
    with socket.socket(fileno=os.dup(lfd)) as s:
        port = s.getsockname()[1]
    d.add_listener(lfd)
    a, b = seqpacket_pair()
    chan, end = a.detach(), b.detach()
    d.add_worker(0, chan, os.dup(end))
    board = d.scoreboard
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            close_fds_except({end})
            worker_main(be, end, 0, board, 1, "reply", False)
            code = 0
        finally:
            os._exit(code)
    os.close(end)
    d.set_ready(0)
    d.watch(ctl_r, 1)
    # Every fd number up to the limit in use: accept gets EMFILE.
    top = max(int(x) for x in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 4, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    fillers = []
    while True:
        try:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            break
    os.write(report_w, json.dumps({"port": port}).encode() + b"\n")
    # Wait for the clients (the test connects them all, then writes a byte).
    while not readable(ctl_r, LIVENESS):
        pass
    os.read(ctl_r, 1)
    t0 = time.monotonic()
    c0 = os.times()
    while time.monotonic() - t0 < hold_s:
        d.run(0.05)
    c1 = os.times()
    wall = time.monotonic() - t0
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    exhausted = d.stats()
    for fd in fillers:
        os.close(fd)
    # fds free: serve the rest until the test writes "done".
    deadline = time.monotonic() + LIVENESS * 2
    while time.monotonic() < deadline:
        if any(e.kind == "watch" for e in d.run(0.1)):
            break
    stats = d.stats()
    be.send_msg(chan, be.MSG_USER, 0, b"quit")
    _, status = os.waitpid(pid, 0)
    d.close()
    os.close(lfd)
    os.write(report_w, json.dumps({"cpu": cpu, "wall": wall, "exhausted": exhausted,
                                   "stats": stats, "worker": status}).encode() + b"\n")


def test_emfile_no_spin_and_everyone_served(backend, procs):
    n_clients = 40
    hold_s = 1.5
    report_r, report_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    pid = procs.fork(_exhausted_primary, backend, report_w, ctl_r, n_clients, hold_s)
    os.close(report_w)
    os.close(ctl_r)
    rf = os.fdopen(report_r, "rb")
    clients = []
    try:
        assert readable(report_r, LIVENESS), "primary did not start"
        port = json.loads(rf.readline())["port"]
        for _ in range(n_clients):
            c = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS)
            c.sendall(b"x")
            clients.append(c)
        os.write(ctl_w, b"g")
        replies = []
        for c in clients:  # blocking reads with a generous timeout
            replies.append(c.recv(8))
        os.write(ctl_w, b"d")
        line = rf.readline()
        assert line, "primary died without a report"
        rep = json.loads(line)
        assert os.waitstatus_to_exitcode(procs.wait(pid)) == 0
    finally:
        for c in clients:
            c.close()
        rf.close()
        os.close(ctl_w)
    assert replies == [b"0\n"] * n_clients
    assert rep["exhausted"]["fd_exhaustion"] >= 1, rep
    assert rep["cpu"] < 0.5 * rep["wall"], rep
    assert rep["stats"]["accepted"] == n_clients and rep["stats"]["dropped"] == 0, rep
    assert os.waitstatus_to_exitcode(rep["worker"]) == 0
