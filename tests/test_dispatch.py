"""The dispatcher in one process, both backends (csrc/tests/test_dispatch.c).

Theory of operation: a Dispatcher whose workers are channel ends held by the
test (backend_harness.Ends), real TCP clients and real listeners: argument
checks, counters, watched fds, batching, the least policy's choices and
recovery of a removed worker's queue, all observed from the workers' ends.
"""

import errno
import os
import socket
import struct
import time

import pytest

from pyfork.scoreboard import SLOT_SIZE

from backend_harness import LIVENESS, seqpacket_pair

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]


# ---- dispatcher arguments ---------------------------------------------------

def test_bad_arguments(backend):
    D = backend.Dispatcher
    for kw in ({"capacity": 0}, {"capacity": 4097}, {"capacity": 2, "policy": "random"},
               {"capacity": 2, "max_inflight": 0}, {"capacity": 2, "max_pending": 0},
               {"capacity": 2, "max_listeners": 0}, {"capacity": 2, "max_watch": -1},
               {"capacity": 2, "max_pending": 8, "accept_batch": 9},
               {"capacity": 2, "emfile_pause_ms": 0}, {"capacity": 2, "max_inflight": 2**20 + 1}):
        with pytest.raises(ValueError):
            D(**kw)
    d = D(2, max_listeners=1, max_watch=1)
    a, b = seqpacket_pair()
    c2, e2 = seqpacket_pair()
    lfd = backend.listen_tcp("127.0.0.1", 0)
    lfd2 = backend.listen_tcp("127.0.0.1", 0)
    pr, pw = os.pipe()
    try:
        for slot in (-1, 2, 1000):
            with pytest.raises(ValueError):
                d.add_worker(slot, a.fileno())
            with pytest.raises(ValueError):
                d.set_ready(slot)
            with pytest.raises(ValueError):
                d.worker_stats(slot)
            with pytest.raises(ValueError):
                d.remove_worker(slot)
        with pytest.raises(FileNotFoundError):
            d.set_ready(0)  # free slot
        with pytest.raises(FileNotFoundError):
            d.remove_worker(0)
        assert d.worker_stats(1)["state"] == backend.STATE_FREE
        d.add_worker(0, a.detach())
        assert d.worker_stats(0)["state"] == backend.STATE_SPAWNING
        with pytest.raises(FileExistsError):  # slot reuse; nothing taken over
            d.add_worker(0, c2.fileno())
        assert os.fstat(c2.fileno())
        with pytest.raises(ValueError):
            d.add_worker(1, -5)
        # Not a SOCK_SEQPACKET socket (or not an fd at all): EINVAL, not taken.
        for bad in (pr, e2.fileno() + 1000):
            with pytest.raises(OSError) as ei:
                d.add_worker(1, bad)
            assert ei.value.errno == errno.EINVAL
        assert os.fstat(pr)
        assert d.worker_stats(1) == {"state": backend.STATE_FREE, "sent": 0, "closed": 0,
                                     "inflight": 0}
        d.add_listener(lfd)
        with pytest.raises(FileExistsError):
            d.add_listener(lfd)
        with pytest.raises(OSError) as ei:
            d.add_listener(lfd2)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(FileNotFoundError):
            d.remove_listener(lfd2)
        d.watch(pr, 1)
        with pytest.raises(OSError) as ei:
            d.watch(pw, 2)
        assert ei.value.errno == errno.ENOSPC
        with pytest.raises(FileNotFoundError):
            d.unwatch(pw)
        d.unwatch(pr)
        d.remove_listener(lfd)
        assert d.remove_worker(0) == 0
        for t in (-1, float("nan"), "soon"):
            with pytest.raises(ValueError):
                d.run(t)
        with pytest.raises(ValueError):
            d.add_worker(1.0, c2.fileno())
        d.close()
        d.close()  # idempotent
        for call in (lambda: d.run(0), d.stats, lambda: d.worker_stats(0),
                     lambda: d.add_listener(lfd), lambda: d.set_ready(0),
                     d.stop_accepting, lambda: d.scoreboard[0]):
            with pytest.raises(ValueError, match="closed"):
                call()
        with backend.Dispatcher(1) as d2:
            assert d2.stats()["accepted"] == 0
        with pytest.raises(ValueError):
            d2.stats()
    finally:
        d.close()
        b.close()
        c2.close()
        e2.close()
        os.close(lfd)
        os.close(lfd2)
        os.close(pr)
        os.close(pw)


def test_stats_keys(backend):
    with backend.Dispatcher(3) as d:
        assert set(d.stats()) == {"accepted", "dispatched", "redispatched", "busy_skips",
                                  "fd_exhaustion", "accept_errors", "dropped", "wakeups",
                                  "pending", "accepting", "parks", "unparks", "park_closed",
                                  "parked", "park_cap", "pulls"}
        assert set(d.worker_stats(0)) == {"state", "sent", "closed", "inflight"}
        mv = d.scoreboard
        assert len(mv) == mv.nbytes == 3 * SLOT_SIZE and not mv.readonly
        assert d.run(0) == []
        del mv

def test_watch_events(backend):
    pr, pw = os.pipe()
    try:
        with backend.Dispatcher(1) as d:
            d.watch(pr, 77)
            assert d.run(0) == []
            os.write(pw, b"!")
            assert d.run(LIVENESS) == [backend.Event("watch", -1, 77)]
            assert d.run(0) == [backend.Event("watch", -1, 77)]  # level-triggered
            os.read(pr, 1)
            assert d.run(0.02) == []
            d.unwatch(pr)
            os.write(pw, b"!")
            assert d.run(0.02) == []
    finally:
        os.close(pr)
        os.close(pw)

def test_accepted_sockets_are_nodelay_nonblocking_cloexec(ends):
    e = ends(1)
    e.connect(3)
    e.pump_until_dispatched(3)
    fds = [fd for m in e.take(0) for fd in m]
    assert len(fds) == 3
    for fd in fds:
        assert os.get_blocking(fd) is False
        assert os.get_inheritable(fd) is False
        with socket.socket(fileno=fd) as s:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert s.getpeername()[0] == "127.0.0.1"


def test_batches_at_most_max_fds(ends):
    e = ends(1)
    e.connect(40)  # all in the backlog before the first accept
    e.pump_until_dispatched(40)
    msgs = e.take(0)
    sizes = [len(m) for m in msgs]
    assert sum(sizes) == 40 and max(sizes) <= e.be.MAX_FDS
    assert len(msgs) < 40, sizes  # several fds per sendmsg
    for m in msgs:
        for fd in m:
            os.close(fd)
    st = e.d.stats()
    assert st["accepted"] == 40 and st["pending"] == 0


def test_least_tie_breaks(ends):
    """Equal load: an idle worker beats a busy one; among busy ones the one
    whose request started most recently (it looks least stuck) wins."""
    e = ends(3, policy="least")
    sb = e.d.scoreboard

    def busy_since(slot, ns):
        struct.pack_into("<Q", sb, slot * SLOT_SIZE + 24, ns)

    # Start times a minute ahead count as "started just now" however slow the
    # machine is, so only the tie-breaks decide (no age penalty).
    soon = time.monotonic_ns() + 60 * 10**9
    busy_since(0, soon)
    busy_since(1, 0)        # idle
    busy_since(2, soon + 4_000)
    order = []
    for i in range(3):
        e.connect()
        e.pump_until_dispatched(i + 1)
        got = [s for s in range(3) if e.d.worker_stats(s)["sent"] > order.count(s)]
        assert len(got) == 1
        order.append(got[0])
    # 1 (idle), then 2 (busy since later), then 0.
    assert order == [1, 2, 0]
    for s in range(3):
        for m in e.take(s):
            for fd in m:
                os.close(fd)


def test_least_avoids_a_worker_stuck_on_a_long_request(ends):
    """least counts work, not just connections: a worker whose request has been
    running for 50 ms (10 x 5 ms) loses to workers with more, fresher, connections
    in flight (Node issue #39815: round robin keeps feeding a stuck worker)."""
    e = ends(2, policy="least")
    sb = e.d.scoreboard
    e.connect()
    e.pump_until_dispatched(1)          # slot 0 (the lowest of two idle ones)
    assert e.d.worker_stats(0)["sent"] == 1
    struct.pack_into("<Q", sb, 0 * SLOT_SIZE + 24, time.monotonic_ns() - 50_000_000)
    for i in range(3):                   # 3 more: slot 1 despite 1, 2 in flight there
        e.connect()
        e.pump_until_dispatched(2 + i)
    assert [e.d.worker_stats(s)["sent"] for s in (0, 1)] == [1, 3]
    for s in range(2):
        for m in e.take(s):
            for fd in m:
                os.close(fd)


def test_least_takes_turns_among_idle_workers(ends):
    """Workers that tie on everything (idle, nothing in flight) take turns, so a
    quiet cluster at concurrency 1 is spread like round robin, not piled on slot 0."""
    e = ends(2, policy="least")
    sb = e.d.scoreboard
    for i in range(4):
        e.connect()
        e.pump_until_dispatched(i + 1)
        for slot in range(2):            # each worker closes what it got: idle again
            sent = e.d.worker_stats(slot)["sent"]
            struct.pack_into("<Q", sb, slot * SLOT_SIZE, sent)
            for m in e.take(slot):
                for fd in m:
                    os.close(fd)
    assert [e.d.worker_stats(s)["sent"] for s in (0, 1)] == [2, 2]


def test_remove_worker_recovers_queue(ends):
    e = ends(2)
    e.connect(10)
    e.pump_until_dispatched(10)
    sent = [e.d.worker_stats(s)["sent"] for s in (0, 1)]
    assert sum(sent) == 10 and min(sent) >= 1
    # Nobody read slot 1's queue: removing it sends all of it to slot 0.
    assert e.d.remove_worker(1) == sent[1]
    st = e.d.stats()
    assert st["redispatched"] == sent[1] and st["dispatched"] == 10 + sent[1]
    assert st["pending"] == 0 and st["dropped"] == 0
    fds = [fd for m in e.take(0) for fd in m]
    assert len(fds) == 10
    for fd in fds:
        os.close(fd)


def test_recovered_fds_wait_for_a_worker_or_are_dropped_when_full(backend, ends):
    e = ends(1, max_pending=4, accept_batch=4)
    e.connect(10)
    e.pump_until_dispatched(10)
    assert e.d.worker_stats(0)["sent"] == 10
    # Nobody else can take them: max_pending are held, the rest are closed.
    assert e.d.remove_worker(0) == 4
    st = e.d.stats()
    assert st["pending"] == 4 and st["dropped"] == 6
    assert e.d.run(0.05) == [] and e.d.stats()["accepting"] == 0  # fds wait: no accepting
    # A new worker in the slot gets the held ones.
    a, b = seqpacket_pair()
    e.d.add_worker(0, a.detach())
    e.d.set_ready(0)
    deadline = time.monotonic() + LIVENESS
    while e.d.stats()["pending"]:
        assert time.monotonic() < deadline
        e.d.run(0.02)
    st = e.d.stats()
    assert st["redispatched"] == 4 and st["dispatched"] == 14
    msg = backend.recv_msg(b.fileno())
    assert len(msg.fds) == 4
    for fd in msg.fds:
        os.close(fd)
    b.close()
