"""pyfork.primary.watched.WatchedListener on a real dispatcher (both backends) and real
Unix sockets: accept up to max_clients and refuse the rest with the reason, vet, tags in
the owner's range and never two clients on one tag, per-client reads, EOF drops, idle
expiry with keep, close leaves no fd behind."""
import os
import socket
import time

import pytest

from pyfork.primary.watched import WatchedListener

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(60)]

LIVENESS = 10.0
TAG = 100


class Demo:
    """A protocol that records what the listener asks of it."""

    def __init__(self):
        self.refused = []        # reasons
        self.data = {}           # tag -> bytes received
        self.dropped = []        # tags
        self.deny = False

    def vet(self, sock):
        return "not today" if self.deny else None

    def refuse(self, sock, why):
        self.refused.append(why)
        sock.send(why.encode())
        sock.close()

    def on_data(self, client, data):
        self.data[client.tag] = self.data.get(client.tag, b"") + data

    def on_drop(self, client):
        self.dropped.append(client.tag)


@pytest.fixture
def served(backend, tmp_path):
    path = str(tmp_path / "demo.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    lsock.setblocking(False)
    demo = Demo()
    with backend.Dispatcher(1, max_watch=8) as d:
        wl = WatchedListener("demo", lsock, path, d, demo, tag=TAG, client_tags=3, max_clients=2,
                             idle_timeout=5.0, recv_size=64)
        peers = []
        try:
            yield d, wl, demo, path, peers
        finally:
            wl.close()
            for p in peers:
                p.close()
        assert lsock.fileno() == -1 and not os.path.exists(path)     # closed and unlinked


def pump_until(d, wl, cond):
    deadline = time.monotonic() + LIVENESS
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        for ev in d.run(0.2):
            if ev.kind == "watch":
                assert wl.owns(ev.tag)
                wl.on_readable(ev.tag)


def connect(path, peers):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(LIVENESS)
    s.connect(path)
    peers.append(s)
    return s


def test_clients_beyond_max_are_refused_with_the_reason_and_data_reaches_its_tag(served):
    d, wl, demo, path, peers = served
    a, b = connect(path, peers), connect(path, peers)
    pump_until(d, wl, lambda: len(wl.clients) == 2)
    c = connect(path, peers)
    pump_until(d, wl, lambda: demo.refused)
    assert demo.refused == ["too many demo clients"]
    assert c.recv(100) == b"too many demo clients" and c.recv(100) == b""
    assert sorted(wl.clients) == [TAG + 1, TAG + 2]
    a.sendall(b"from a")
    b.sendall(b"from b")
    pump_until(d, wl, lambda: len(demo.data) == 2)
    assert demo.data == {TAG + 1: b"from a", TAG + 2: b"from b"}      # accepted in order


def test_vet_refuses_and_eof_drops(served):
    d, wl, demo, path, peers = served
    demo.deny = True
    s = connect(path, peers)
    pump_until(d, wl, lambda: demo.refused)
    assert demo.refused == ["not today"] and s.recv(100) == b"not today" and not wl.clients
    demo.deny = False
    s = connect(path, peers)
    pump_until(d, wl, lambda: wl.clients)
    (tag,) = wl.clients
    s.close()
    pump_until(d, wl, lambda: not wl.clients)
    assert demo.dropped == [tag]


def test_idle_clients_expire_unless_kept_and_tags_are_never_shared(served):
    d, wl, demo, path, peers = served
    connect(path, peers), connect(path, peers)
    pump_until(d, wl, lambda: len(wl.clients) == 2)
    first, second = sorted(wl.clients)
    wl.expire(time.monotonic() + 1.0)            # not idle long enough
    assert len(wl.clients) == 2
    wl.expire(time.monotonic() + 60.0, keep=lambda tag: tag == second)
    assert list(wl.clients) == [second] and demo.dropped == [first]
    assert peers[0].recv(100) == b""              # closed by the primary side
    # The range is 3 tags wide: the next clients take the free ones, never `second`'s.
    for _ in range(2):
        connect(path, peers)
        pump_until(d, wl, lambda: len(wl.clients) == 2)
        new = (set(wl.clients) - {second}).pop()
        assert TAG < new <= TAG + 3 and new != second
        wl.drop(new)
