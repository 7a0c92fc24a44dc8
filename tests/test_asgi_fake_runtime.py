"""Tests of the ASGI test harness itself (tests/asgi_harness.py): the fake runtime hands out
non-blocking TCP_NODELAY sockets and balances its counters; a forked worker drains on SIGTERM."""
import os
import socket
import time

import pytest

from asgi_harness import LIVENESS, FakeRuntime, ForkedWorker, assert_balanced, fd_count, listener

pytestmark = pytest.mark.timeout(120)


def test_fake_runtime_take_sets_nodelay_and_counts():
    before = fd_count()
    lsock = listener()
    rt = FakeRuntime(lsock)
    client = socket.create_connection(lsock.getsockname())
    try:
        deadline = time.monotonic() + LIVENESS
        socks = []
        while not socks and time.monotonic() < deadline:
            socks = rt.take()
            time.sleep(0.01)
        assert len(socks) == 1 and rt.taken == 1
        assert socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        assert socks[0].getblocking() is False
        socks[0].close()
        rt.closed()
        rt.stop()
        assert rt.draining and rt.take() == []
        assert_balanced(rt.stats())
    finally:
        client.close()
        lsock.close()
        os.close(rt._wake_r)
        os.close(rt._wake_w)
    assert fd_count() == before


@pytest.mark.timeout(60)
def test_forked_worker_drains_on_sigterm_with_no_connections():
    async def echo(reader, writer):
        writer.write(await reader.read(100))

    before = fd_count()
    lsock = listener()
    worker = ForkedWorker(lsock, echo, "asyncio")
    lsock.close()
    try:
        stats = worker.stop()
    finally:
        worker.kill()
    assert stats["taken"] == 0
    assert_balanced(stats)
    assert fd_count() == before
