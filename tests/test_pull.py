"""Pull (rr, least): a new connection that no worker can start stays in the kernel's queue,
and the first worker that frees room accepts it itself (csrc/dispatch_send.c, pf__pull_start).

Theory of operation: the dispatcher tests hold the workers' channel ends and write their
scoreboard lines (capacity, requests running) as a worker would; the "worker" that pulls is
this test, accepting from its own copy of the listener. The runtime test drives a real
pyfork.worker.runtime.Worker; the end-to-end test runs a real primary with its default
options and blocked workers. Both backends.
"""

import os
import select
import signal
import socket
import threading
import time

import pytest

from pyfork.primary import control
from pyfork.scoreboard import Scoreboard

import supervisor_harness as H

pytestmark = pytest.mark.usefixtures("fd_guard")


def _lines(e):
    return Scoreboard(e.d.scoreboard, len(e.ends))


def _all_busy(backend, e):
    """Every worker: capacity 1, one request running (none can start another)."""
    writers = []
    for s in range(len(e.ends)):
        w = backend.SlotWriter(_lines(e).slot(s).line)
        w.set_capacity(1)
        w.request_started()
        writers.append(w)
    return writers


def _pump(e, cond, what):
    deadline = time.monotonic() + 30
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {e.d.stats()}"
        e.d.run(0.02)


def _accept_one(lfd):
    """What a pulling worker does: accept from the listener it inherited."""
    with socket.socket(fileno=os.dup(lfd)) as ls:
        ls.settimeout(30)
        conn, _ = ls.accept()
    return conn


def test_a_connection_no_worker_can_start_is_left_to_the_workers(backend, ends):
    e = ends(2)
    e.d.set_pull(True)
    w = _all_busy(backend, e)
    e.connect()
    _pump(e, lambda: e.d.stats()["pulls"] == 1, "a pull")
    for _ in range(5):                        # while it lasts, the primary does not accept
        e.d.run(0.02)
    st = e.d.stats()
    assert (st["accepted"], st["dispatched"], st["pending"], st["accepting"]) == (0, 0, 0, 0), st
    assert [_lines(e).slot(s).pull for s in range(2)] == [1, 1]
    assert e.take(0) == [] and e.take(1) == []
    conn = _accept_one(e.lfd)                 # the connection waited in the kernel's queue
    conn.close()
    # Slot 0 finishes, and then gets nothing for a whole look: the pull is over, and the
    # primary accepts again itself (one client at a time goes round robin again).
    w[0].request_finished()
    _pump(e, lambda: e.d.stats()["accepting"] == 1, "the primary accepting again")
    assert [_lines(e).slot(s).pull for s in range(2)] == [0, 0]
    w[1].request_finished()
    e.connect()
    e.pump_until_dispatched(1)
    assert e.d.stats()["accepted"] == 1 and e.d.stats()["pulls"] == 1
    for s in range(2):
        for m in e.take(s):
            for fd in m:
                os.close(fd)


def test_without_pull_the_primary_accepts_and_holds_it(backend, ends):
    """The default of the bare dispatcher (embedders whose workers only read their channel):
    the connection is accepted, and waits in the ring or a worker's channel, never in the
    kernel's queue."""
    e = ends(2)
    _all_busy(backend, e)
    e.connect()
    _pump(e, lambda: e.d.stats()["accepted"] == 1, "the accept")
    assert e.d.stats()["pulls"] == 0
    assert [_lines(e).slot(s).pull for s in range(2)] == [0, 0]
    held = [fd for s in range(2) for m in e.take(s) for fd in m]
    assert len(held) + e.d.stats()["pending"] == 1     # prefetched, or in the ring
    for fd in held:
        os.close(fd)


def test_a_parked_request_waiting_in_the_ring_ends_the_pull(backend, ends):
    """Something waits in the primary (here: a parked connection's next request, in the
    ring): the workers must not go on accepting new ones ahead of it."""
    import struct
    from pyfork.scoreboard import SLOT_SIZE
    e = ends(2)
    e.d.set_pull(True)
    _all_busy(backend, e)
    for s in range(2):      # long-running requests: nothing is prefetched behind them
        struct.pack_into("<Q", e.d.scoreboard, s * SLOT_SIZE + 24, time.monotonic_ns() - 10**10)
    e.connect()
    _pump(e, lambda: e.d.stats()["pulls"] == 1, "a pull")
    a, b = socket.socketpair()
    try:
        e.be.send_msg(e.ends[0].fileno(), e.be.MSG_PARK, 0, b"", [b.fileno()])
        a.sendall(b"GET / HTTP/1.1\r\n\r\n")     # its next request: it goes to the ring
        _pump(e, lambda: _lines(e).slot(0).pull == 0, "the pull to end")
        assert e.d.stats()["pending"] == 1
    finally:
        a.close()
        b.close()
    conn = _accept_one(e.lfd)
    conn.close()


def test_a_worker_that_becomes_ready_during_a_pull_ends_it(backend, ends):
    """A replacement that says READY during a pull can start a connection, but asleep on its
    channel it would not look at its line until its tick: the pull ends, and the primary
    sends it the connection."""
    e = ends(3)
    e.d.set_pull(True)
    e.d.set_draining(2)
    w = _all_busy(backend, e)[:2]
    e.connect()
    _pump(e, lambda: e.d.stats()["pulls"] == 1, "a pull")
    _lines(e).slot(2).clear()                 # as add_worker leaves a new worker's line
    e.d.set_ready(2)
    assert [_lines(e).slot(s).pull for s in range(3)] == [0, 0, 0]
    e.pump_until_dispatched(1)
    held = [fd for m in e.take(2) for fd in m]
    assert len(held) == 1 and e.d.stats()["pulls"] == 1
    for fd in held:
        os.close(fd)
    for x in w:
        x.request_finished()


def test_no_pull_when_the_open_connection_cap_is_what_holds_the_workers(backend, ends):
    """A worker with room for work but at its open-connection cap (idle kept-alive ones):
    a pull would look over at once and start again; the connection waits in the ring."""
    e = ends(1, max_inflight=1)
    e.d.set_pull(True)
    w = backend.SlotWriter(_lines(e).slot(0).line)
    w.set_capacity(1)
    e.connect()
    e.pump_until_dispatched(1)
    held = [fd for m in e.take(0) for fd in m]
    w.conn_taken(1)                           # served one request, kept it open: idle, at the cap
    w.request_started()
    w.request_finished()
    e.connect()
    _pump(e, lambda: e.d.stats()["accepted"] == 2, "the second accept")
    st = e.d.stats()
    assert (st["pulls"], st["pending"]) == (0, 1), st
    for fd in held:
        os.close(fd)


def test_set_pull_off_ends_a_pull(backend, ends):
    e = ends(1)
    e.d.set_pull(True)
    _all_busy(backend, e)
    e.connect()
    _pump(e, lambda: e.d.stats()["pulls"] == 1, "a pull")
    e.d.set_pull(False)
    assert _lines(e).slot(0).pull == 0
    _pump(e, lambda: e.d.stats()["accepted"] == 1, "the primary to accept it")
    for m in e.take(0):
        for fd in m:
            os.close(fd)


def test_an_rr_worker_accepts_only_while_the_primary_pulls(backend):
    """pyfork.worker.runtime.Worker under rr: it holds the listeners but accepts nothing
    until its line says pull; then what it can start (capacity 1: one per take(), counted
    as accepted); once the pull is over it stops, and at a drain it drops its copies and
    sweeps nothing (the primary and the other workers keep the backlog)."""
    from pyfork.scoreboard import PULL_WORD
    from pyfork.worker.runtime import Worker

    chan, primary_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan.setblocking(False)
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    cs = [socket.create_connection(ls.getsockname(), timeout=30) for _ in range(3)]
    board = Scoreboard(bytearray(backend.SLOT_SIZE), 1)
    line = board.slot(0)
    words = line.line.cast("B").cast("I")
    got = []
    w = Worker(wid=1, slot=0, chan=chan.fileno(), backend=backend, board_slot=line, policy="rr",
               listeners=[os.dup(ls.fileno())], primary_pid=os.getppid())
    try:
        w.set_capacity(1)
        assert w.take() == [] and not w.queued()       # no pull: the primary accepts
        words[PULL_WORD] = 1
        w.tick()                                        # notices the pull: watches the listener
        assert select.select([w.fileno()], [], [], 30)[0]
        got += w.take()
        assert len(got) == 1 and line.accepted == 1 and w.queued()
        w.request_started()
        assert w.take() == [] and line.accepted == 1   # running one: room for none
        w.request_finished()
        words[PULL_WORD] = 0                            # the pull is over
        assert w.take() == [] and line.accepted == 1 and not w.queued()
        backend.send_msg(primary_end.fileno(), backend.MSG_DRAIN)
        words[PULL_WORD] = 1
        assert w.take() == [] and w.draining and line.accepted == 1   # no sweep
        # the two others are still in the backlog, for the primary
        ls.setblocking(False)
        for _ in range(2):
            got.append(ls.accept()[0])
        assert backend.recv_msg(primary_end.fileno()).type == backend.MSG_READY
    finally:
        for s in got + cs + [chan, primary_end, ls]:
            s.close()
        w._ep.close()
        del words
        board.release()


def test_with_default_options_busy_workers_accept_new_connections_themselves(tmp_path, backend):
    """A real primary, defaults (rr), 2 workers: one blocked for good, the other inside a
    1.5 s request, so a new client cannot be started by anyone. The primary leaves it in the
    kernel's queue (a pull), and the worker that finishes accepts it itself: its accepted
    count rises, nothing was sent to it for that client, and the client is answered."""
    H.write_apps(tmp_path)
    ctl = str(tmp_path / "ctl.sock")

    def rows():
        return {w["pid"]: w for w in control.request(ctl, {"cmd": "status"}, timeout=20)["workers"]}

    with H.Server(tmp_path, backend.BACKEND, "--control", ctl) as srv:
        srv.start(ready=2)
        threading.Thread(target=_swallow, args=(srv.port, "/block"), daemon=True).start()
        H.wait_until(lambda: (tmp_path / "blocked.pid").exists() and (tmp_path / "blocked.pid").read_text(),
                     what="a blocked worker")
        blocked = int((tmp_path / "blocked.pid").read_text())
        threading.Thread(target=_swallow, args=(srv.port, "/sleep=1500"), daemon=True).start()
        H.wait_until(lambda: all(r["active"] == 1 for r in rows().values()), what="both workers busy")
        before = rows()
        status, body = H.http_get(srv.port, "/")
        assert status == 200, body
        after = rows()
        other = [pid for pid in after if pid != blocked][0]
        assert after[other]["accepted"] - before[other]["accepted"] == 1, (before, after)
        assert after[other]["sent"] == before[other]["sent"]
        assert control.request(ctl, {"cmd": "status"}, timeout=20)["dispatch"]["pulls"] >= 1
        srv.signal(signal.SIGQUIT)
        srv.wait()


def _swallow(port, path):
    try:
        H.http_get(port, path, timeout=60)
    except OSError:
        pass
