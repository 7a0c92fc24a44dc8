"""Unit tests of the worker-side runtime pieces that need no primary: StandaloneRuntime
(used by interface tests) and pyfork.worker.current() in the primary."""
import os
import select
import socket

import pytest

import pyfork.worker as W
from pyfork.scoreboard import Scoreboard
from pyfork.worker.standalone import StandaloneRuntime

pytestmark = pytest.mark.usefixtures("fd_guard")


def test_current_is_none_in_the_primary():
    assert W.current() is None


def test_standalone_runtime_takes_counts_and_stops():
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        with StandaloneRuntime(ls) as rt:
            assert rt.take() == []
            c1 = socket.create_connection(ls.getsockname())
            c2 = socket.create_connection(ls.getsockname())
            got = []
            while len(got) < 2:
                # wait for the listener to be readable (a connection in its backlog), then take
                assert select.select([ls], [], [], 30)[0], "connections never reached the backlog"
                got += rt.take()
            assert len(got) == 2
            for s in got:
                assert s.getblocking() is False
                assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                s.close()
            rt.closed(2)
            rt.request_started()
            rt.request_finished()
            assert (rt.taken, rt.closed_count, rt.started, rt.finished) == (2, 2, 1, 1)
            rt.stop()
            assert rt.draining
            # wakeup_fd became readable; tick() drains it
            assert os.read(rt.wakeup_fd(), 10)
            rt.tick()
            c3 = socket.create_connection(ls.getsockname())
            assert rt.take() == []                 # after draining: [] forever
            for c in (c1, c2, c3):
                c.close()


def test_worker_send_is_size_checked(backend):
    board = Scoreboard(bytearray(backend.SLOT_SIZE), 1).slot(0)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        w = W.Worker(wid=1, slot=0, chan=a.fileno(), backend=backend, board_slot=board)
        w.send({"k": 1})
        msg = backend.recv_msg(b.fileno())
        assert (msg.type, msg.payload, msg.fds) == (backend.MSG_USER, b'{"k":1}', [])
        with pytest.raises(ValueError):
            w.send("x" * backend.MAX_PAYLOAD)
        with pytest.raises(TypeError):
            w.send(object())
    finally:
        a.close()
        b.close()
