"""The worker-runtime contract (pyfork/serve/runtime.py): every runtime an interface can be
given implements the whole `Runtime` protocol.

Checked for pyfork.worker.runtime.Worker (on each backend, as boot builds it),
pyfork.worker.standalone.StandaloneRuntime and the test harness's FakeRuntime: isinstance()
against the runtime_checkable protocol, then member by member (so a failure names what is
missing), callables callable and attributes of the documented types. The runtimes' own
behaviour is tested with the interfaces; here only what the contract adds to them:
take_fds() hands over fds of `conn_family`, tcp_cork() sets TCP_CORK on a real connection.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import pytest

from asgi_harness import FakeRuntime
from net_harness import LIVENESS
from pyfork.scoreboard import Scoreboard
from pyfork.serve.runtime import Runtime
from pyfork.worker.runtime import Worker
from pyfork.worker.standalone import StandaloneRuntime

pytestmark = pytest.mark.usefixtures("fd_guard")

ATTRIBUTES = dict(Runtime.__annotations__)
METHODS = sorted(name for name, value in vars(Runtime).items()
                 if not name.startswith("_") and callable(value))


def _listener() -> socket.socket:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    return ls


@contextlib.contextmanager
def worker_runtime(backend):
    """A Worker as pyfork.worker.boot builds it for the rr policy (a channel, a scoreboard
    line), without the fork: the contract is the object's. Yields it and the primary's end
    of the channel."""
    chan, primary_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    board = Scoreboard(bytearray(backend.SLOT_SIZE), 1)
    try:
        yield Worker(wid=1, slot=0, chan=chan.fileno(), backend=backend, board_slot=board.slot(0),
                     primary_pid=os.getppid(), conn_family=socket.AF_INET), primary_end
    finally:
        chan.close()
        primary_end.close()


@contextlib.contextmanager
def standalone_runtime():
    with _listener() as ls, StandaloneRuntime(ls) as rt:
        yield rt


@contextlib.contextmanager
def fake_runtime():
    with _listener() as ls:
        rt = FakeRuntime(ls)
        try:
            yield rt
        finally:
            os.close(rt._wake_r)    # noqa: SLF001 -- the harness's pipe
            os.close(rt._wake_w)    # noqa: SLF001


def assert_implements_runtime(rt) -> None:
    missing = [name for name in [*ATTRIBUTES, *METHODS] if not hasattr(rt, name)]
    assert not missing, f"{type(rt).__name__} lacks {missing} of pyfork.serve.runtime.Runtime"
    assert isinstance(rt, Runtime)
    for name in METHODS:
        assert callable(getattr(rt, name)), name
    assert isinstance(rt.id, int)
    assert isinstance(rt.log, logging.Logger)
    assert rt.draining is False
    assert isinstance(rt.tick_interval, (int, float)) and rt.tick_interval > 0
    assert isinstance(rt.tcp_nodelay, bool)
    assert rt.conn_family is None or rt.conn_family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def test_protocol_lists_what_the_interfaces_use():
    # The members the interfaces call; a new one must be added to the protocol first.
    assert set(ATTRIBUTES) == {"id", "log", "draining", "tick_interval", "tcp_nodelay", "conn_family",
                               "parks"}
    assert set(METHODS) == {"ready", "fileno", "wakeup_fd", "take", "take_fds", "closed", "park", "parks_settled", "queued",
                            "request_started", "request_finished", "tick", "tcp_cork"}


def test_an_object_lacking_a_member_is_not_a_runtime():
    with fake_runtime() as rt:
        assert isinstance(rt, Runtime)
        del rt.log
        assert not isinstance(rt, Runtime)


def test_worker_implements_runtime(backend):
    with worker_runtime(backend) as (w, _primary_end):
        assert_implements_runtime(w)
        assert w.tcp_nodelay is True and w.conn_family == socket.AF_INET


def test_standalone_runtime_implements_runtime():
    with standalone_runtime() as rt:
        assert_implements_runtime(rt)
        assert rt.tcp_nodelay is True and rt.conn_family == socket.AF_INET


def test_fake_runtime_implements_runtime():
    with fake_runtime() as rt:
        assert_implements_runtime(rt)


def _take_one(take):
    """Polls `take` (a runtime's take or take_fds) until it hands over one connection."""
    deadline = time.monotonic() + LIVENESS
    got = []
    while not got:
        assert time.monotonic() < deadline, "no connection taken"
        got = take()
        if not got:
            time.sleep(0.01)
    assert len(got) == 1
    return got[0]


def _cork_of(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)


def _check_taken_fd(rt, fd) -> None:
    """`fd` from rt.take_fds(): a stream socket of rt.conn_family that rt.tcp_cork() corks
    and uncorks. Closes it and reports it with rt.closed(), as an interface must."""
    try:
        assert isinstance(fd, int)
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.family == rt.conn_family and s.type == socket.SOCK_STREAM
        rt.tcp_cork(fd, True)
        assert _cork_of(fd) == 1
        rt.tcp_cork(fd, False)
        assert _cork_of(fd) == 0
    finally:
        os.close(fd)
        rt.closed()


def test_standalone_runtime_take_fds_and_tcp_cork():
    with _listener() as ls, StandaloneRuntime(ls) as rt, \
            socket.create_connection(ls.getsockname(), timeout=LIVENESS):
        fd = _take_one(rt.take_fds)
        assert os.get_blocking(fd) is False
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)   # as rt.tcp_nodelay says
        _check_taken_fd(rt, fd)
        assert rt.taken == rt.closed_count == 1


def test_worker_take_fds_and_tcp_cork(backend):
    """The connection comes over the channel as the primary sends it (MSG_CONN)."""
    with worker_runtime(backend) as (w, primary_end), _listener() as ls, \
            socket.create_connection(ls.getsockname(), timeout=LIVENESS):
        conn, _ = ls.accept()
        with conn:
            backend.send_msg(primary_end.fileno(), backend.MSG_CONN, 0, b"", [conn.fileno()])
        _check_taken_fd(w, _take_one(w.take_fds))


def test_tcp_cork_on_a_non_tcp_fd_raises(backend):
    a, b = socket.socketpair()
    try:
        with worker_runtime(backend) as (w, _primary_end), pytest.raises(OSError):
            w.tcp_cork(a.fileno(), True)
        with standalone_runtime() as rt, pytest.raises(OSError):
            rt.tcp_cork(a.fileno(), True)
    finally:
        a.close()
        b.close()
