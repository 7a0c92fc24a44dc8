"""pyfork.embed on its own, in this process: Connections, ReportingSocket, run_asyncio.

Theory of operation: a StandaloneRuntime (the runtime contract over one real listening
socket, counting closed() calls) stands in for a forked worker's; real TCP clients connect.
Checked: every socket handed out reports its close exactly once (close twice, detach),
`open` follows, and run_asyncio serves on asyncio's loop and on uvloop's (which detaches the
socket object after closing the fd itself), drains on stop() and returns with every close
reported (in a forked child: uvloop keeps a signal pipe for the process). The
supervised, end-to-end cases are tests/test_embed_python.py.
"""
import asyncio
import json
import os
import socket
import threading

import pytest

import pyfork.embed
from pyfork.worker.standalone import StandaloneRuntime

pytestmark = pytest.mark.usefixtures("fd_guard")


@pytest.fixture
def rt():
    ls = socket.create_server(("127.0.0.1", 0))
    runtime = StandaloneRuntime(ls)
    yield runtime
    runtime.close()
    ls.close()


def _connect(rt):
    return socket.create_connection(rt._sock.getsockname(), timeout=10)


def _take_one(conns):
    for _ in range(200):
        got = conns.take()
        if got:
            return got
        threading.Event().wait(0.01)
    raise AssertionError("no connection arrived")


def test_sockets_report_their_close_once(rt):
    conns = pyfork.embed.Connections(rt)
    clients = [_connect(rt), _connect(rt)]
    got = _take_one(conns)
    while len(got) < 2:
        got += _take_one(conns)
    a, b = got
    assert isinstance(a, socket.socket) and not a.getblocking()
    assert conns.open == 2 and rt.closed_count == 0
    a.close()
    a.close()
    assert conns.open == 1 and rt.closed_count == 1
    fd = b.detach()            # the fd leaves the object: reported (uvloop's way)
    assert conns.open == 0 and rt.closed_count == 2
    socket.socket(fileno=fd).close()
    assert rt.closed_count == 2
    for c in clients:
        c.close()


def _serve_five(rt):
    """In a forked child: run_asyncio over rt with 5 clients; returns what it saw."""
    replies, drained = [], []

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"hi")
            transport.close()

    def adopt(sock):
        return asyncio.get_running_loop().connect_accepted_socket(Hello, sock)

    def clients():
        for _ in range(5):
            with _connect(rt) as c:
                replies.append(c.recv(16).decode())
        rt.stop()

    t = threading.Thread(target=clients)
    t.start()
    pyfork.embed.run_asyncio(rt, adopt, on_drain=lambda: drained.append(True))
    t.join(10)
    return {"replies": replies, "drained": drained, "taken": rt.taken, "closed": rt.closed_count}


@pytest.mark.parametrize("uvloop", ["0", "1"])
def test_run_asyncio_serves_and_drains(rt, uvloop):
    # In a child process: uvloop keeps a process-wide signal pipe after its loop closes.
    if uvloop == "1":
        pytest.importorskip("uvloop")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.environ["PYFORK_UVLOOP"] = uvloop
            os.write(w, json.dumps(_serve_five(rt)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    got = json.loads(out)
    assert got == {"replies": ["hi"] * 5, "drained": [True], "taken": 5, "closed": 5}


def test_worker_body_marks_the_embed_interface():
    import pyfork.serve

    @pyfork.embed.worker_body
    def main(rt):
        pass

    assert pyfork.serve.resolve(main).NAME == "embed"
    with pytest.raises(ValueError):
        pyfork.serve.resolve(lambda rt: None)     # a bare one-argument callable is never guessed


def test_worker_body_declares_interface_and_capacity():
    # The central queue sends a worker no more than its capacity: a body declares it.
    from pyfork import embed

    @embed.worker_body
    def loop_body(rt):
        pass

    @embed.worker_body(capacity=1)
    def one_at_a_time(rt):
        pass

    assert (loop_body.pyfork_interface, loop_body.pyfork_capacity) == ("embed", 100)
    assert (one_at_a_time.pyfork_interface, one_at_a_time.pyfork_capacity) == ("embed", 1)
    with pytest.raises(ValueError):
        embed.worker_body(capacity=0)
