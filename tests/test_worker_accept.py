"""The worker's own accept path (shared/reuseport): pyfork.worker.runtime.Acceptor.

Theory of operation: the Acceptor triages accept(2) errors into the classes the C
core's loop uses (pyfork._api, csrc/dispatch_loop.c). Each test drives a real
listening socket with real clients: an empty backlog, a budget, a listener that
was shut down (EINVAL: dead), and fd exhaustion, made real by lowering
RLIMIT_NOFILE in a forked child and filling every free fd number below it; there
the reserve fd must get the client at the head of the backlog served, and the
acceptor must pause instead of spinning. Every test keeps the open-fd count.
"""

import json
import os
import resource
import socket
import traceback

import pytest

from pyfork import _api
from pyfork.worker.runtime import Acceptor

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("fd_guard")]

LIVENESS = 30.0


def listener(backlog=16):
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(backlog)
    ls.setblocking(False)
    return ls


def clients(ls, n):
    out = []
    for _ in range(n):
        c = socket.create_connection(ls.getsockname(), timeout=LIVENESS)
        out.append(c)
    return out


def test_accepts_up_to_budget_then_again():
    ls = listener()
    cs = clients(ls, 3)
    acc = Acceptor(ls)
    out = []
    try:
        assert acc.accept_some(out, 2) == Acceptor.MORE
        assert len(out) == 2
        assert acc.accept_some(out, 10) == Acceptor.AGAIN
        assert len(out) == 3
        for conn in out:
            assert conn.getblocking() is False
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert not os.get_inheritable(conn.fileno())
        # every client has its own connection: the peers are the clients
        assert sorted(c.getsockname() for c in cs) == sorted(conn.getpeername() for conn in out)
    finally:
        for s in out + cs + [ls]:
            s.close()
        acc.close()


def test_shut_down_listener_is_dead():
    ls = listener()
    acc = Acceptor(ls, reserve=True)
    try:
        ls.shutdown(socket.SHUT_RDWR)   # accept(2) now fails with EINVAL
        out = []
        assert acc.accept_some(out, 4) == Acceptor.DEAD
        assert out == []
    finally:
        acc.close()
        ls.close()


def test_pause_is_checked_and_configurable():
    ls = listener()
    try:
        assert Acceptor(ls).pause_s == _api.EMFILE_PAUSE_MS / 1000.0
        assert Acceptor(ls, emfile_pause_ms=250).pause_s == 0.25
        for bad in (0, 60001, "100", 1.5):
            with pytest.raises(ValueError):
                Acceptor(ls, emfile_pause_ms=bad)
    finally:
        ls.close()


def _fill_fd_table():
    """Opens /dev/null until EMFILE: afterwards no fd number is free."""
    held = []
    while True:
        try:
            held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            assert e.errno == 24, e     # EMFILE
            return held


def _emfile_child(report_w):
    ls = listener()
    cs = clients(ls, 3)
    acc = Acceptor(ls, emfile_pause_ms=250, reserve=True)
    # A limit just above what is open now, then every free number below it taken.
    top = max(int(n) for n in os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 8, hard))
    held = _fill_fd_table()
    res = {}
    out = []
    # Out of fds: the reserve fd is spent on the head of the backlog, then PAUSE.
    res["first"] = acc.accept_some(out, 16)
    res["served"] = len(out)
    if out:
        out[0].sendall(b"ok")
        res["head_got_it"] = cs[0].recv(2) == b"ok"
    # Still out of fds and the reserve could not be reopened: PAUSE, nothing taken.
    res["second"] = acc.accept_some(out, 16)
    res["served_second"] = len(out)
    # fds free again: the reserve comes back and the rest of the backlog is taken.
    for fd in held:
        os.close(fd)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    res["third"] = acc.accept_some(out, 16)
    res["served_third"] = len(out)
    res["reserve_back"] = acc.reserve >= 0
    for conn in out + cs + [ls]:
        conn.close()
    acc.close()
    os.write(report_w, json.dumps(res).encode())


def test_emfile_serves_the_head_of_the_backlog_then_pauses():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            _emfile_child(w)
            code = 0
        except BaseException:  # noqa: BLE001 -- report anything, then exit
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    res = json.loads(data)
    assert res == {
        "first": Acceptor.PAUSE, "served": 1, "head_got_it": True,
        "second": Acceptor.PAUSE, "served_second": 1,
        "third": Acceptor.AGAIN, "served_third": 3, "reserve_back": True,
    }


def test_a_shared_worker_accepts_what_it_can_start_and_sweeps_the_rest_on_drain(backend):
    """The Worker under `shared` (both backends' scoreboard writers): a sync worker
    (capacity 1) accepts one connection per take() while none runs, none while one runs,
    and says the backlog may hold more (queued); MSG_DRAIN makes the same take() sweep the
    rest. Each accepted connection is counted on its line (accepted, which status and
    metrics read), the swept ones too. The test plays the primary's end of the channel."""
    from pyfork.scoreboard import Scoreboard
    from pyfork.worker.runtime import Worker

    chan, primary_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan.setblocking(False)
    ls = listener()
    cs = clients(ls, 3)
    board = Scoreboard(bytearray(backend.SLOT_SIZE), 1)
    line = board.slot(0)
    got = []
    w = Worker(wid=1, slot=0, chan=chan.fileno(), backend=backend, board_slot=line, policy="shared",
               listeners=[os.dup(ls.fileno())], primary_pid=os.getppid())
    try:
        w.set_capacity(1)
        got += w.take()
        assert len(got) == 1 and line.accepted == 1 and line.taken == 0
        assert w.queued()                      # its budget filled: the backlog may hold more
        w.request_started()                    # running one: room for none
        assert w.take() == [] and line.accepted == 1
        backend.send_msg(primary_end.fileno(), backend.MSG_DRAIN)
        got += w.take()                        # the DRAIN, then the final sweep in the same call
        assert w.draining and len(got) == 3 and line.accepted == 3
        assert sorted(c.getsockname() for c in cs) == sorted(g.getpeername() for g in got)
        assert backend.recv_msg(primary_end.fileno()).type == backend.MSG_READY
    finally:
        for s in got + cs + [chan, primary_end, ls]:
            s.close()
        w._ep.close()                          # the worker's private epoll (it exits instead)
        board.release()
