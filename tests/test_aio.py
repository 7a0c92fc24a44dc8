"""The asyncio interface: handlers run as asyncio.start_server would run them, in a forked worker.

Each test forks a worker (tests/asgi_harness.py) serving a handler on a real
listening socket, talks to it with plain sockets, drains it with SIGTERM and checks
the runtime's counters and this process's open-fd count.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

import pytest

from pyfork.serve import aio, resolve

pytestmark = pytest.mark.timeout(120)


import asgi_harness as H
LOOPS = [pytest.param({"PYFORK_UVLOOP": "1"}, id="uvloop"), pytest.param({"PYFORK_UVLOOP": "0"}, id="asyncio")]


async def echo(reader, writer):
    while True:
        data = await reader.read(65536)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def greet_and_return(reader, writer):
    # Returns without closing: the interface must close the connection (start_server would leak it).
    line = await reader.readline()
    writer.write(b"hello " + line)


async def crash(reader, writer):
    await reader.readline()
    raise RuntimeError("handler bug (expected by the test)")


async def hold(reader, writer):
    await reader.readline()
    H.child_notify(b"H")
    await H.child_wait_release()
    writer.write(b"done\n")
    await writer.drain()


async def loop_kind(reader, writer):
    await reader.readline()
    writer.write(type(asyncio.get_running_loop()).__module__.encode() + b"\n")


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=H.LIVENESS)
    return sock


@pytest.fixture
def fds():
    before = H.fd_count()
    yield
    assert H.fd_count() == before


@contextlib.contextmanager
def running_worker(handler, env=None, **kw):
    """A ForkedWorker serving `handler` with the asyncio interface; killed (and reaped) on the
    way out whatever happened, so stop()/join() it inside the block to get its stats."""
    lsock = H.listener()
    worker = H.ForkedWorker(lsock, handler, "asyncio", env=env, **kw)
    lsock.close()
    try:
        yield worker
    finally:
        worker.kill()


@pytest.mark.parametrize("env", LOOPS)
def test_echo_many_connections(fds, env):
    with running_worker(echo, env) as worker:
        payload = os.urandom(200_000)  # several reads and a drain() under back-pressure
        for i in range(5):
            with connect(worker.port) as sock:
                sock.sendall(payload + bytes([i]))
                sock.shutdown(socket.SHUT_WR)
                assert recv_all(sock) == payload + bytes([i])
        stats = worker.stop()
    assert stats["taken"] == 5
    H.assert_balanced(stats)


@pytest.mark.parametrize("env", LOOPS)
def test_uvloop_switch(fds, env):
    with running_worker(loop_kind, env) as worker:
        with connect(worker.port) as sock:
            sock.sendall(b"?\n")
            kind = recv_all(sock)
        worker.stop()
    assert kind.startswith(b"uvloop" if env["PYFORK_UVLOOP"] == "1" else b"asyncio")


def test_handler_returning_without_close_closes_connection(fds):
    with running_worker(greet_and_return) as worker:
        with connect(worker.port) as sock:
            sock.sendall(b"pyfork\n")
            assert recv_all(sock) == b"hello pyfork\n"  # EOF comes: the interface closed it
        stats = worker.stop()
    H.assert_balanced(stats)


def test_handler_exception_closes_connection_and_worker_keeps_serving(fds):
    with running_worker(crash) as worker:
        for _ in range(3):
            with connect(worker.port) as sock:
                sock.sendall(b"x\n")
                assert recv_all(sock) == b""
        stats = worker.stop()
    assert stats["taken"] == 3
    H.assert_balanced(stats)


@pytest.mark.parametrize("env", LOOPS)
def test_drain_waits_for_running_handler(fds, env):
    with running_worker(hold, env) as worker:
        with connect(worker.port) as sock:
            sock.sendall(b"go\n")
            worker.wait_event(b"H")       # the handler is running
            worker.drain()
            worker.wait_event(b"D")       # the worker is draining; the handler still runs
            worker.release()
            assert recv_all(sock) == b"done\n"
        stats = worker.join()
    assert stats["taken"] == 1
    H.assert_balanced(stats)


def test_detect():
    async def two(reader, writer):
        pass

    async def three(scope, receive, send):
        pass

    def sync_two(a, b):
        pass

    class Handler:
        async def __call__(self, reader, writer):
            pass

    async def star(*args):
        pass

    assert aio.detect(two)
    assert aio.detect(Handler())
    assert not aio.detect(three)
    assert not aio.detect(sync_two)
    assert not aio.detect(star)
    assert not aio.detect(42)
    assert resolve(two) is aio
    assert resolve(Handler(), "asyncio") is aio


def test_with_the_shipped_standalone_runtime(fds):
    pytest.importorskip("pyfork.worker.standalone").StandaloneRuntime  # noqa: B018 (supervisor's helper)
    with running_worker(echo, runtime="standalone") as worker:
        with connect(worker.port) as sock:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == b"ping"
        stats = worker.stop()
    assert stats["taken"] == 1
    H.assert_balanced(stats)


def test_uvloop_does_not_steal_the_runtime_wakeup_fd(monkeypatch):
    """uvloop installs its own signal wakeup fd while running; the driver puts the runtime's back."""
    monkeypatch.setenv("PYFORK_UVLOOP", "1")
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    lsock = H.listener()
    rt = H.FakeRuntime(lsock)
    previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    seen = {}
    try:
        async def main(wakeup_write_fd):
            seen["loop"] = type(asyncio.get_running_loop()).__module__
            driver = aio.LoopDriver(rt, on_socket=lambda sock: sock.close(), wakeup_write_fd=wakeup_write_fd)
            driver.start()
            current = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(current, warn_on_full_buffer=False)
            seen["inside"] = current
            driver.stop()

        aio.run(main, rt)
        seen["after"] = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    finally:
        signal.set_wakeup_fd(previous)
        for fd in (r, w, rt._wake_r, rt._wake_w):
            os.close(fd)
        lsock.close()
    assert seen == {"loop": "uvloop", "inside": w, "after": w}
