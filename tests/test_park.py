"""Parking: idle kept-alive connections leave a worker stuck in a long request (issue 10).

Two levels, both backends. The dispatcher alone (backend_harness.Ends: workers are channel
ends held by the test, real TCP clients): a connection handed back with MSG_PARK waits in the
loop and is dispatched like a new one once its next request arrives; hang-up, the idle
timeout, a full or absent table, stopping and close are observed from the workers' ends and
the clients. Then real `pyfork serve` processes (tests/supervisor_harness.py) with a WSGI app
that reports its pid: a kept-alive connection whose worker is stuck gets its next response
from the other worker, pipelined requests keep their order, no request is served twice, and
parked connections are closed by the primary when their client hangs up or they idle out
(the primary's open-fd count comes back).
"""

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import termios
import threading
import time

import pytest

from pyfork.primary import control
from pyfork.scoreboard import Scoreboard
from pyfork.worker import runtime as runtime_module
from pyfork.worker.runtime import Worker

import supervisor_harness as H
from backend_harness import LIVENESS, Ends
from net_harness import read_response

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(240)]


# ---- the dispatcher alone -------------------------------------------------------------

def _pump(e, pred, what):
    deadline = time.monotonic() + LIVENESS
    while not pred():
        assert time.monotonic() < deadline, (what, e.d.stats())
        e.d.run(0.02)


def _one_dispatched(e, n):
    """Runs until n connections were dispatched; returns (slot, fd) of the one that arrived."""
    e.pump_until_dispatched(n)
    got = [(s, fds) for s in range(len(e.ends)) for fds in e.take(s)]
    assert len(got) == 1 and len(got[0][1]) == 1, got
    return got[0][0], got[0][1][0]


def _taken(e, slot):
    """The fds waiting in slot's channel, read as its worker would."""
    return [fd for m in e.take(slot) for fd in m]


def _close_taken(e, slot, n):
    """Reads what waits in slot's channel, checks it is n connections, and closes them."""
    fds = _taken(e, slot)
    assert len(fds) == n
    for fd in fds:
        os.close(fd)


def _park(e, slot, fds):
    e.be.send_msg(e.ends[slot].fileno(), e.be.MSG_PARK, 0, b"", fds)
    for fd in fds:
        os.close(fd)          # as the worker does: the connection is the primary's now


def _pump_until_drained(e):
    """After stop_accepting: runs until the DRAINED event."""
    events = []
    _pump(e, lambda: events.extend(e.d.run(0.02)) or any(ev.kind == "drained" for ev in events),
          "drained")


def _same_connection(e, fd, sent):
    """fd (now the test's) is client 0's connection with its bytes intact: it reads what the
    client sent, and the client reads the reply. Closes fd."""
    with socket.socket(fileno=fd) as s:
        s.setblocking(True)
        assert s.recv(100) == sent
        s.sendall(b"ok")
    assert e.clients[0].recv(10) == b"ok"


def _ends_with_parked(backend, n, idle_timeout=30):
    """One worker, parking on (16 entries): n clients connected, dispatched to it, and all
    handed back (parked or on the way). Returns the Ends; the caller closes it."""
    e = Ends(backend, 1)
    try:
        e.d.set_parking(16, idle_timeout)
        e.connect(n)
        e.pump_until_dispatched(n)
        _park(e, 0, _taken(e, 0))
    except BaseException:
        e.close()
        raise
    return e


def test_parked_connection_is_dispatched_when_its_next_request_arrives(backend):
    e = Ends(backend, 2)
    try:
        e.d.set_parking(16, 30)
        assert e.d.stats()["park_cap"] == 16
        e.connect(1)
        slot, fd = _one_dispatched(e, 1)
        _park(e, slot, [fd])
        _pump(e, lambda: e.d.stats()["parked"] == 1, "parked")
        for _ in range(5):                      # idle: nobody gets it
            e.d.run(0.01)
        assert [e.take(s) for s in range(2)] == [[], []]
        e.clients[0].sendall(b"GET / HTTP/1.1\r\n\r\n")
        slot2, fd2 = _one_dispatched(e, 2)
        _same_connection(e, fd2, b"GET / HTTP/1.1\r\n\r\n")
        st = e.d.stats()
        assert (st["parks"], st["unparks"], st["parked"], st["park_closed"]) == (1, 1, 0, 0)
    finally:
        e.close()


def test_parked_connection_whose_client_closes_is_closed(backend):
    e = _ends_with_parked(backend, 2)
    try:
        _pump(e, lambda: e.d.stats()["parked"] == 2, "parked")
        e.clients[1].close()
        _pump(e, lambda: e.d.stats()["park_closed"] == 1, "closed on hang-up")
        st = e.d.stats()
        assert (st["parked"], st["unparks"], st["dispatched"]) == (1, 0, 2)
        e.clients.pop(1)
        e.d.close()
        assert e.clients[0].recv(10) == b""    # close() closed the idle one still parked
    finally:
        e.close()


def test_idle_timeout_closes_parked_connections(backend):
    e = _ends_with_parked(backend, 1, idle_timeout=0.05)
    try:
        _pump(e, lambda: e.d.stats()["park_closed"] == 1, "idle timeout")
        assert e.d.stats()["parked"] == 0
        assert e.clients[0].recv(10) == b""    # the client sees the close
    finally:
        e.close()


def test_a_ready_parked_connection_moves_once_the_ring_has_room(backend):
    """A parked connection whose next request arrives while the pending ring is full waits
    flagged ready. The flush that then empties the ring must not leave it there until some
    later event (another client, the idle sweep): it takes its place in the ring at once.
    One sync worker (capacity 1), a ring of one (csrc/tests/test_park.c has the same case)."""
    e = Ends(backend, 1, max_pending=1, accept_batch=1)
    held = []
    try:
        w = backend.SlotWriter(Scoreboard(e.d.scoreboard, 1).slot(0).line)
        w.set_capacity(1)
        e.d.set_parking(8, 30)
        e.connect(1)                                     # client 0: served, then parked
        _slot, fd0 = _one_dispatched(e, 1)
        w.conn_taken(1)
        w.request_started()
        w.request_finished()
        _park(e, 0, [fd0])
        w.conn_closed(1)
        _pump(e, lambda: e.d.stats()["parked"] == 1, "parked")
        e.connect(1)                                     # client 1: a long request
        held.append(_one_dispatched(e, 2)[1])
        w.conn_taken(1)
        w.request_started()
        struct.pack_into("<Q", e.d.scoreboard, 24, time.monotonic_ns() - 10**9)   # busy_since
        e.connect(1)                                     # client 2 fills the ring
        _pump(e, lambda: e.d.stats()["pending"] == 1, "client 2 in the ring")
        e.clients[0].sendall(b"x")                       # client 0's next request: ready
        for _ in range(5):
            e.d.run(0.01)
        assert e.d.stats()["unparks"] == 0
        # Client 1's request ends; the primary sees the room at its next look and sends
        # client 2. Nothing else wakes it (no CREDIT is sent): without the look at once that
        # moves client 0's connection, the timeout would be the only wake-up (the call's
        # last look would move it too, only later).
        w.request_finished()
        wakeups = e.d.stats()["wakeups"]
        e.d.run(0.3)
        st = e.d.stats()
        # client 0's connection is in the ring, or already prefetched behind client 2
        assert st["unparks"] == 1 and st["dispatched"] + st["pending"] == 4, st
        assert st["wakeups"] - wakeups >= 2, st
    finally:
        for fd in held + _taken(e, 0):
            os.close(fd)
        e.close()


def test_no_table_or_full_table_dispatches_at_once(backend):
    e = Ends(backend, 1)
    try:
        e.connect(3)
        e.pump_until_dispatched(3)
        fds = _taken(e, 0)
        _park(e, 0, fds[:1])                    # parking off: straight back to a worker
        _pump(e, lambda: e.d.stats()["dispatched"] == 4, "re-dispatched")
        (again,) = _taken(e, 0)
        e.d.set_parking(1, 30)
        _park(e, 0, [again] + fds[1:2])         # one entry: the second goes to a worker
        _pump(e, lambda: e.d.stats()["dispatched"] == 5, "the one that did not fit")
        st = e.d.stats()
        assert (st["parks"], st["parked"], st["unparks"]) == (3, 1, 2)
        with pytest.raises(OSError):            # resizing while one is parked: EBUSY
            e.d.set_parking(4, 30)
        e.d.set_parking(1, 10)                  # same size: only the timeout changes
        for fd in _taken(e, 0) + fds[2:]:
            os.close(fd)
    finally:
        e.close()


def test_parked_connections_go_back_to_workers_once_stopping(backend):
    e = _ends_with_parked(backend, 2)
    try:
        _pump(e, lambda: e.d.stats()["parked"] == 2, "parked")
        e.clients[0].sendall(b"GET / HTTP/1.1\r\n\r\n")    # a request in flight
        e.d.stop_accepting()
        # Both go back to the (still READY) worker, which applies its drain rules;
        # DRAINED comes once they were sent.
        _pump_until_drained(e)
        st = e.d.stats()
        assert (st["parked"], st["dispatched"], st["park_closed"]) == (0, 4, 0)
        _close_taken(e, 0, 2)
    finally:
        e.close()


def test_drained_only_once_every_parked_connection_left(backend):
    """Stopping with more parked connections than the pending ring holds: they go back
    through it in turns, and DRAINED comes only once every one is with a worker (a DRAINED
    before that left the rest to be closed with the dispatcher). A ring of one, three parked
    (csrc/tests/test_park.c has the same case)."""
    e = Ends(backend, 1, max_pending=1, accept_batch=1)
    try:
        e.d.set_parking(8, 30)
        e.connect(3)
        e.pump_until_dispatched(3)
        _park(e, 0, _taken(e, 0))
        _pump(e, lambda: e.d.stats()["parked"] == 3, "parked")
        e.d.stop_accepting()
        _pump_until_drained(e)
        st = e.d.stats()
        assert (st["parked"], st["pending"], st["dispatched"], st["park_closed"]) == (0, 0, 6, 0), st
        _close_taken(e, 0, 3)
    finally:
        e.close()


def _unread_by_peer(sock):
    """Bytes sent on `sock` that its peer has not consumed yet (SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def test_a_park_read_after_drained_goes_back_to_the_worker_that_sent_it(backend):
    # A worker can hand a connection back just before it sees park_off; read after DRAINED,
    # when no worker takes from the ring any more, it used to be held until the primary
    # exited, then reset with the request its client had sent. Now it goes back to its
    # worker (alive: inside the request that made it park), in its channel by the time the
    # PARK is consumed.
    e = Ends(backend, 2)
    try:
        e.d.set_parking(16, 30)
        e.connect(1)
        slot, fd = _one_dispatched(e, 1)
        e.d.stop_accepting()
        _pump_until_drained(e)
        for s in range(2):                       # what the primary does on DRAINED
            e.d.set_draining(s)
        e.clients[0].sendall(b"GET /next HTTP/1.1\r\n\r\n")   # its next request, in flight
        _park(e, slot, [fd])
        _pump(e, lambda: _unread_by_peer(e.ends[slot]) == 0, "the PARK consumed")
        (back,) = _taken(e, slot)
        assert _taken(e, 1 - slot) == []
        _same_connection(e, back, b"GET /next HTTP/1.1\r\n\r\n")
        st = e.d.stats()
        assert (st["parks"], st["unparks"], st["parked"], st["park_closed"], st["dispatched"]) == (1, 1, 0, 0, 2)
    finally:
        e.close()


def test_a_draining_worker_that_parked_waits_for_what_may_come_back(backend):
    # The worker side of the test above (pyfork.worker.runtime.Worker.parks_settled): a
    # draining worker that parked asks, before it exits, whether anything can still come
    # back. It waits until the primary has consumed all it sent, then looks in its channel.
    # Here the "primary" (a thread on the other end) answers the PARK late, as the
    # dispatcher does after DRAINED: it sends the fd back, then consumes the PARK.
    chan, primary_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    chan.setblocking(False)
    settle_max = runtime_module.PARK_SETTLE_MAX
    board = Scoreboard(bytearray(backend.SLOT_SIZE), 1)
    client, server = socket.socketpair()
    try:
        w = Worker(wid=1, slot=0, chan=chan.fileno(), backend=backend, board_slot=board.slot(0),
                   primary_pid=os.getppid(), conn_family=socket.AF_UNIX)
        w.ready()
        assert backend.recv_msg(primary_end.fileno()).type == backend.MSG_READY   # nothing else unread
        assert w.parks_settled()                  # never parked: nothing to wait for
        handed = os.dup(server.fileno())
        assert w.park([handed]) == 1
        os.close(handed)                          # as the interface does once it is handed over
        backend.send_msg(primary_end.fileno(), backend.MSG_DRAIN)
        assert w.take_fds() == [] and w.draining
        problems = []

        def late_primary():
            try:
                time.sleep(0.2)                   # the PARK sits unread meanwhile
                _, anc, _, _ = primary_end.recvmsg(64, socket.CMSG_SPACE(4), socket.MSG_PEEK)
                peeked = list(struct.unpack("i", anc[0][2]))    # the kernel's duplicate of the fd
                backend.send_msg(primary_end.fileno(), backend.MSG_CONN, 0, b"", peeked)
                board.slot(0).publish_sent(1)     # as the dispatcher does for what it sends
                consumed = backend.recv_msg(primary_end.fileno())
                if consumed.type != backend.MSG_PARK:
                    problems.append(f"consumed type {consumed.type}")
                for f in peeked + list(consumed.fds):
                    os.close(f)
            except Exception as e:                # noqa: BLE001 -- reported below
                problems.append(repr(e))

        t = threading.Thread(target=late_primary)
        t.start()
        try:
            # It waits for the PARK to be consumed (not for its PARK_SETTLE_MAX bound: the
            # bound is raised past the liveness timeout here), then finds the connection.
            runtime_module.PARK_SETTLE_MAX = LIVENESS * 2
            t0 = time.monotonic()
            assert not w.parks_settled()
            assert time.monotonic() - t0 < LIVENESS, "waited for the bound, not for the primary"
        finally:
            runtime_module.PARK_SETTLE_MAX = settle_max
            t.join(LIVENESS)
        assert not t.is_alive() and problems == [], problems
        (fd,) = w.take_fds()
        with socket.socket(fileno=fd) as back:
            back.setblocking(True)
            client.sendall(b"ping")
            assert back.recv(10) == b"ping"
        assert w.parks_settled()                  # asked again: nothing more can come
    finally:
        for s in (chan, primary_end, client, server):
            s.close()


def test_set_parking_arguments(backend):
    with backend.Dispatcher(2) as d:
        for bad in ((-1, 1), (2 ** 20 + 1, 1), (1, 0), (1, -1), (1, float("nan")), (1, 10 ** 6),
                    ("x", 1), (1, "x")):
            with pytest.raises(ValueError):
                d.set_parking(*bad)
        d.set_parking(0, 5)
        assert d.stats()["park_cap"] == 0


# ---- real servers ----------------------------------------------------------------------

APP = r'''
import json, os, time
import pyfork.serve.wsgi
# A longer threshold than the 2 ms default, so that on a loaded test machine a light request
# never runs long enough to park connections early (correct, but it would move them away
# from the worker the test blocks); /block runs far longer.
pyfork.serve.wsgi.PARK_AFTER = 0.25
# How many other connections a worker parks all of, before it parks only the ready ones.
pyfork.serve.wsgi.PARK_ALL_MAX = int(os.environ.get("TEST_PARK_ALL_MAX", "64"))
# A pause of holding outlasts any test (the default 10 s could end between two batches).
pyfork.serve.wsgi.HOLD_PAUSE = 300.0

def app(environ, start_response):
    path = environ["PATH_INFO"]
    qs = environ.get("QUERY_STRING", "")
    if path == "/cblock":
        # Stuck in a system call Python cannot interrupt (a restarted read, as a database
        # driver's): until the test writes to the FIFO `gate`.
        with open("cblocked.pid", "w") as f:
            f.write(str(os.getpid()))
        fd = os.open("gate", os.O_RDONLY)
        try:
            os.read(fd, 1)
        finally:
            os.close(fd)
    if path == "/block":
        # Stuck until the test creates the release file (a condition, not a timer).
        with open("blocked.pid", "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.005)
    body = json.dumps({"pid": os.getpid(), "q": qs}).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "wapp.py").write_text(APP)
    return tmp_path


def _serve_argv(app_dir, backend, keep_alive, policy="rr"):
    ctl = str(app_dir / "ctl.sock")
    argv = [sys.executable, "-m", "pyfork", "serve", "wapp:app", "-b", "127.0.0.1:0",
            "--interface", "wsgi", "-w", "2", "--keep-alive", str(keep_alive), "--control", ctl,
            "--policy", policy]
    return argv, ctl


class Client:
    """One kept-alive HTTP/1.1 connection; reads responses by Content-Length."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS)
        self.buf = b""

    def send(self, *paths):
        self.sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % p.encode() for p in paths))

    def response(self):
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed before a response"
            self.buf += chunk
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        length = int([l.split(b":", 1)[1] for l in head.split(b"\r\n")
                      if l.lower().startswith(b"content-length:")][0])
        while len(rest) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed inside a response"
            rest += chunk
        self.buf = rest[length:]
        assert head.startswith(b"HTTP/1.1 200"), head
        return json.loads(rest[:length])

    def get(self, path="/"):
        self.send(path)
        return self.response()

    def eof(self):
        """True when the server closed the connection with nothing more to read."""
        return self.buf == b"" and self.sock.recv(1) == b""

    def close(self):
        self.sock.close()


def _status(ctl):
    return control.request(ctl, {"cmd": "status"}, timeout=20)


def _handled(ctl):
    return sum(w["handled"] for w in _status(ctl)["workers"])


def _parked(ctl):
    return _status(ctl)["dispatch"]["parked"]


def _handled_exactly(ctl, since, sent):
    """No request was served twice (nor lost): the workers handled exactly `sent` requests
    after `since`."""
    H.wait_until(lambda: _handled(ctl) - since >= sent, what="handled == sent")
    assert _handled(ctl) - since == sent


def _wait_blocked(app_dir, pid):
    H.wait_until(lambda: (app_dir / "blocked.pid").exists()
                 and (app_dir / "blocked.pid").read_text() == str(pid), what="blocked")


def _fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _spread(port, n=6, rounds=5):
    """n kept-alive clients, each with one request answered: {pid: [Client, ...]}, over both
    workers. All connect before any sends: under `shared`, where the kernel picks, both idle
    workers are woken by the connects (sent one at a time, the worker that just answered
    won 40 of 40 in one run). Another batch (at most `rounds`) if one worker got every
    connection all the same."""
    by_pid, clients = {}, []
    try:
        for _ in range(rounds):
            batch = [Client(port) for _ in range(n)]
            clients += batch
            for c in batch:
                by_pid.setdefault(c.get()["pid"], []).append(c)
            if len(by_pid) == 2:
                return by_pid
        raise AssertionError(f"every connection went to one worker: {list(by_pid)}")
    except BaseException:
        for c in clients:
            c.close()
        raise


# The primary parks for workers that accept themselves too (shared): a worker stuck in a long
# request hands its idle kept-alive connections back all the same.
POLICIES = pytest.mark.parametrize("policy", ["rr", "shared"])


@POLICIES
def test_kept_alive_connection_of_a_stuck_worker_is_served_by_the_other(app_dir, backend, policy):
    argv, ctl = _serve_argv(app_dir, backend, 30, policy)
    with H.Server(app_dir, backend.BACKEND, argv=argv) as srv:
        srv.start(ready=2)
        by_pid = _spread(srv.port)
        clients = [c for cs in by_pid.values() for c in cs]
        try:
            assert _status(ctl)["dispatch"]["parks"] == 0       # fast requests park nothing
            # Open connections per worker, whoever accepted them (the primary, or the
            # worker itself with shared): sent + accepted - closed.
            assert {w["pid"]: w["inflight"] for w in _status(ctl)["workers"]} == {
                pid: len(cs) for pid, cs in by_pid.items()}
            stuck = max(by_pid, key=lambda p: len(by_pid[p]))   # at least half of them are on it
            blocker, *others = by_pid[stuck]
            # A response leaves before its request is counted: wait for all to be.
            handled = H.wait_until(lambda: _handled(ctl) >= len(clients) and _handled(ctl),
                                   what="one request per client handled")
            assert handled == len(clients)
            blocker.send("/block")
            _wait_blocked(app_dir, stuck)
            H.wait_until(lambda: _parked(ctl) >= len(others), what="the stuck worker's idle "
                         "connections parked")
            # Their next requests (one of them pipelined: two requests in one write) are
            # answered by the other worker, in order, while the stuck one is still stuck.
            first, *rest = others
            first.send("/?a", "/?b")
            assert [first.response() for _ in range(2)] == [
                {"pid": p, "q": q} for p, q in ((pid_of_other(by_pid, stuck), "a"),
                                                (pid_of_other(by_pid, stuck), "b"))]
            for c in rest:
                assert c.get("/?c")["pid"] != stuck
            (app_dir / "release").write_text("")
            assert blocker.response() == {"pid": stuck, "q": ""}
            # Every connection still works, and no request was served twice: the workers
            # handled exactly the requests sent (the blocked one, 2 pipelined, the rest).
            for c in clients:
                assert c.get("/?z")["q"] == "z"
            sent = 1 + 2 + len(rest) + len(clients)
            _handled_exactly(ctl, handled, sent)
        finally:
            for c in clients:
                c.close()
        srv.signal(2)
        assert srv.wait() == 0


def test_a_silent_connection_of_a_stuck_worker_is_served_by_the_other(app_dir, backend):
    """A client that connects and sends its request later (a browser's preconnect, a client
    that connects ahead): its connection is taken by a worker while silent. If that worker
    then runs a long request, the silent connection is parked with the idle kept-alive ones,
    so its request, when it comes, is answered by the other worker instead of waiting."""
    argv, ctl = _serve_argv(app_dir, backend, 30)
    with H.Server(app_dir, backend.BACKEND, argv=argv) as srv:
        srv.start(ready=2)
        silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=LIVENESS)
                  for _ in range(6)]
        blocker = None
        try:
            # Both workers hold some of them (sent to each, none closed).
            H.wait_until(lambda: all(w["inflight"] >= 1 for w in _status(ctl)["workers"])
                         and sum(w["inflight"] for w in _status(ctl)["workers"]) == 6,
                         what="the silent connections on both workers")
            held = {w["pid"]: w["inflight"] for w in _status(ctl)["workers"]}
            blocker = Client(srv.port)
            blocker.send("/block")
            H.wait_until(lambda: (app_dir / "blocked.pid").exists(), what="blocked")
            stuck = int((app_dir / "blocked.pid").read_text())
            H.wait_until(lambda: _parked(ctl) >= held[stuck], what="its silent connections parked")
            # Every silent client now sends its request: all answered while one worker is
            # still stuck, so none by it.
            for s in silent:
                s.sendall(b"GET /?s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            for s in silent:
                status, _, body = read_response(s)
                assert status == 200, body
                assert json.loads(body) == {"pid": pid_of_other({stuck: 0, **held}, stuck), "q": "s"}
            assert not (app_dir / "release").exists()
            (app_dir / "release").write_text("")
            assert blocker.response() == {"pid": stuck, "q": ""}
        finally:
            for s in silent:
                s.close()
            if blocker is not None:
                blocker.close()
        srv.signal(2)
        assert srv.wait() == 0


def test_a_worker_with_many_connections_parks_only_those_whose_request_came(app_dir, backend):
    """Beyond PARK_ALL_MAX other connections (here 1), a stuck worker hands back only those
    whose next request has arrived: each is answered by the other worker (pipelined ones in
    order), and the idle ones stay with it until it is free (parking thousands on every long
    request is what made a 10,000-connection load's tail, bench/README.md)."""
    argv, ctl = _serve_argv(app_dir, backend, 30)
    with H.Server(app_dir, backend.BACKEND, argv=argv, env={"TEST_PARK_ALL_MAX": "1"}) as srv:
        srv.start(ready=2)
        by_pid = _spread(srv.port)
        clients = [c for cs in by_pid.values() for c in cs]
        try:
            stuck = max(by_pid, key=lambda p: len(by_pid[p]))   # at least half of them are on it
            other = pid_of_other(by_pid, stuck)
            blocker, first, *idle = by_pid[stuck]
            handled = H.wait_until(lambda: _handled(ctl) >= 6 and _handled(ctl), what="6 handled")
            parks = _status(ctl)["dispatch"]["parks"]
            blocker.send("/block")
            _wait_blocked(app_dir, stuck)
            # Not an ordering wait: past PARK_AFTER (0.25 s) the stuck worker has looked and
            # found nothing ready at least once, so the answer below comes from a later look.
            time.sleep(0.4)
            first.send("/?a", "/?b")
            assert [first.response() for _ in range(2)] == [{"pid": other, "q": "a"},
                                                            {"pid": other, "q": "b"}]
            # Only `first` was handed back; the idle ones are still the stuck worker's.
            assert _status(ctl)["dispatch"]["parks"] - parks == 1
            (app_dir / "release").write_text("")
            assert blocker.response() == {"pid": stuck, "q": ""}
            for c in idle:
                assert c.get("/?z") == {"pid": stuck, "q": "z"}
            _handled_exactly(ctl, handled, 1 + 2 + len(idle))   # /block, /?a, /?b, the idle
        finally:
            for c in clients:
                c.close()
        srv.signal(2)
        assert srv.wait() == 0


def pid_of_other(by_pid, stuck):
    (other,) = [p for p in by_pid if p != stuck]
    return other


def _block_one_worker(app_dir, ctl, port):
    """6 kept-alive clients spread over the 2 workers, then /block on one of the worker with
    most; returns (blocker, the others, every client) once the others on it are parked."""
    by_pid = _spread(port)
    clients = [c for cs in by_pid.values() for c in cs]
    stuck = max(by_pid, key=lambda p: len(by_pid[p]))
    blocker, *others = by_pid[stuck]
    blocker.send("/block")
    H.wait_until(lambda: (app_dir / "blocked.pid").exists(), what="blocked")
    H.wait_until(lambda: _parked(ctl) >= len(others), what="parked")
    return blocker, [c for c in clients if c is not blocker], clients


@POLICIES
def test_parked_connections_whose_clients_hang_up_are_closed(app_dir, backend, policy):
    argv, ctl = _serve_argv(app_dir, backend, 30, policy)     # no idle timeout within the test
    with H.Server(app_dir, backend.BACKEND, argv=argv) as srv:
        srv.start(ready=2)
        primary = srv.proc.pid
        _status(ctl)                            # the control connection's fds come and go
        base = _fd_count(primary)
        blocker, others, clients = _block_one_worker(app_dir, ctl, srv.port)
        try:
            closed = _status(ctl)["dispatch"]["park_closed"]
            parked = _parked(ctl)
            for c in others:
                c.close()                       # every client hangs up
            H.wait_until(lambda: _parked(ctl) == 0, what="parked connections closed on hang-up")
            assert _status(ctl)["dispatch"]["park_closed"] - closed == parked
            (app_dir / "release").write_text("")
            assert blocker.response()["q"] == ""       # the blocked request's answer
            assert blocker.get("/?after")["q"] == "after"
        finally:
            for c in clients:
                c.close()
        # Every connection is gone: the primary holds no more fds than before.
        H.wait_until(lambda: _fd_count(primary) <= base, what="primary fds back to %d" % base)
        srv.signal(2)
        assert srv.wait() == 0


@POLICIES
def test_parked_connections_idle_out(app_dir, backend, policy):
    argv, ctl = _serve_argv(app_dir, backend, 2, policy)
    with H.Server(app_dir, backend.BACKEND, argv=argv) as srv:
        srv.start(ready=2)
        primary = srv.proc.pid
        _status(ctl)
        base = _fd_count(primary)
        blocker, others, clients = _block_one_worker(app_dir, ctl, srv.port)
        try:
            closed = _status(ctl)["dispatch"]["park_closed"]
            parked = _parked(ctl)
            # --keep-alive 2: the primary closes the parked ones (their workers close the rest).
            H.wait_until(lambda: _parked(ctl) == 0, what="idle timeout")
            assert _status(ctl)["dispatch"]["park_closed"] - closed == parked
            for c in others:
                assert c.eof()
            (app_dir / "release").write_text("")
            assert blocker.response()["pid"] == int((app_dir / "blocked.pid").read_text())
        finally:
            for c in clients:
                c.close()
        H.wait_until(lambda: _fd_count(primary) <= base, what="primary fds back to %d" % base)
        srv.signal(2)
        assert srv.wait() == 0


# ---- held responses (pyfork/serve/wsgi.py: a whole response waits for the end of its batch) ----

# What /proc/<pid>/wchan says of a process blocked in epoll_wait() (the name differs by kernel).
_EPOLL_WAIT = ("do_epoll_wait", "ep_poll")


def _proc_state(pid):
    return _proc_file(pid, "stat").rsplit(")", 1)[1].split()[0]


def _proc_file(pid, name):
    with open(f"/proc/{pid}/{name}") as f:
        return f.read()


@contextlib.contextmanager
def _spread_serve(app_dir, backend, *extra):
    """`pyfork serve` of the test app (2 workers, --keep-alive 30, `extra` options) with
    6 kept-alive clients spread over the workers: yields (srv, ctl, by_pid, clients); closes
    every client in `clients` (the test may add its own) and stops the server after."""
    argv, ctl = _serve_argv(app_dir, backend, 30)
    with H.Server(app_dir, backend.BACKEND, argv=argv + list(extra)) as srv:
        srv.start(ready=2)
        by_pid = _spread(srv.port)
        clients = [c for cs in by_pid.values() for c in cs]
        try:
            yield srv, ctl, by_pid, clients
        finally:
            for c in clients:
                c.close()
        srv.signal(2)
        assert srv.wait() == 0


def _stopped_batch(pid, *sends, then=None):
    """Runs each (client, path) send, and then `then()`, while worker `pid` is stopped, so
    that its next epoll_wait() returns them all, in this order (epoll's ready list is FIFO)."""
    # Idle in epoll_wait() first: stopped inside a request, the worker would find that
    # request "long" when it runs again, and hand the connections back (parking).
    H.wait_until(lambda: _proc_file(pid, "wchan") in _EPOLL_WAIT, what="worker idle")
    os.kill(pid, signal.SIGSTOP)
    try:
        # Stopped for sure first: a stop takes effect when the worker next runs, and a
        # worker that woke for the first request would read it alone.
        H.wait_until(lambda: _proc_state(pid) == "T", what="worker stopped")
        for client, paths in sends:       # a path, or a tuple of pipelined paths
            client.send(*(paths if isinstance(paths, tuple) else (paths,)))
        if then is not None:
            then()
        time.sleep(0.2)        # loopback delivers at once; margin for a loaded machine
    finally:
        os.kill(pid, signal.SIGCONT)


def _clients_on(port, pid, n, clients):
    """n new kept-alive clients answered by worker `pid` (all opened on the way are added
    to `clients`, for the caller to close)."""
    mine = []
    for _ in range(8 * n):
        c = Client(port)
        clients.append(c)
        if c.get()["pid"] == pid:
            mine.append(c)
            if len(mine) == n:
                return mine
    raise AssertionError(f"no {n} connections reached worker {pid}")


def _busiest(by_pid):
    """The worker with the most of the spread clients (at least 3 of the 6)."""
    return max(by_pid, key=lambda p: len(by_pid[p]))


def test_a_held_response_is_not_kept_behind_a_long_request_of_the_same_batch(app_dir, backend):
    """Two requests for one worker in one select() batch: a quick one, then one that blocks.
    The quick one's response is held for the end of the batch; the park timer (PARK_AFTER
    after the long one began) sends it, so it reaches its client while the long one still
    runs, from the worker that read it (without the timer's send it came only after the
    long request, and the connection could not be handed back meanwhile)."""
    with _spread_serve(app_dir, backend) as (srv, ctl, by_pid, clients):
        stuck = _busiest(by_pid)
        quick, blocker = by_pid[stuck][:2]
        _stopped_batch(stuck, (quick, "/?quick"), (blocker, "/block"))
        assert quick.response() == {"pid": stuck, "q": "quick"}
        _wait_blocked(app_dir, stuck)
        assert not (app_dir / "release").exists()          # the long request still runs
        (app_dir / "release").write_text("")
        assert blocker.response() == {"pid": stuck, "q": ""}
        assert quick.get("/?again")["q"] == "again"


def test_a_held_response_goes_before_the_pipelined_request_behind_it_runs(app_dir, backend):
    """Two pipelined requests in one write, the second one long: the first one's response
    is not held until the second ends (the park timer does not touch the connection that is
    in the application, so the held response must leave before that request starts)."""
    with _spread_serve(app_dir, backend) as (srv, ctl, by_pid, clients):
        pid, conn = next((p, cs[0]) for p, cs in by_pid.items())
        conn.send("/?first", "/block")
        assert conn.response() == {"pid": pid, "q": "first"}
        _wait_blocked(app_dir, pid)
        assert not (app_dir / "release").exists()
        (app_dir / "release").write_text("")
        assert conn.response() == {"pid": pid, "q": ""}


def test_held_responses_are_not_counted_by_limit_concurrency(app_dir, backend):
    """--limit-concurrency 1 and two keep-alive requests in one batch: the first one's
    response, held for the end of the batch, is finished work, so the second is not
    refused with 503."""
    with _spread_serve(app_dir, backend, "--limit-concurrency", "1") as (srv, ctl, by_pid, clients):
        pid = _busiest(by_pid)
        a, b = by_pid[pid][:2]
        _stopped_batch(pid, (a, "/?a"), (b, "/?b"))
        assert a.response() == {"pid": pid, "q": "a"}
        assert b.response() == {"pid": pid, "q": "b"}      # 200, not 503


def test_a_pipelined_request_of_a_client_gone_is_not_run(app_dir, backend):
    """A held response whose client reset the connection: sending it fails, and the request
    pipelined behind it (it could be a POST) is not run."""
    with _spread_serve(app_dir, backend) as (srv, ctl, by_pid, clients):
        pid = _busiest(by_pid)
        gone, probe = by_pid[pid][:2]
        handled = H.wait_until(lambda: _handled(ctl) >= 6 and _handled(ctl), what="6 handled")

        def reset():   # SO_LINGER 0: the requests stay readable, the response cannot go
            gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            gone.close()

        _stopped_batch(pid, (gone, ("/?first", "/?second")), then=reset)
        # The worker has handled that batch once it answers the next one.
        assert probe.get("/?probe") == {"pid": pid, "q": "probe"}
        _handled_exactly(ctl, handled, 2)          # /?first and /?probe, not /?second


def test_holding_pauses_for_an_application_in_a_call_python_cannot_interrupt(app_dir, backend):
    """A quick request, then one blocked in a restarted read (as a database driver's), in one
    batch: the quick one's held response waits for that read (Python runs the park timer's
    handler only after it), and the timer, late, pauses holding. The next such batch is not
    held: the quick response arrives while the other request is still blocked."""
    os.mkfifo(app_dir / "gate")

    def release():
        fd = os.open(app_dir / "gate", os.O_WRONLY)
        os.write(fd, b"x")
        os.close(fd)

    with _spread_serve(app_dir, backend) as (srv, ctl, by_pid, clients):
        pid = _busiest(by_pid)
        quick, slow = by_pid[pid][:2]
        _stopped_batch(pid, (quick, "/?quick"), (slow, "/cblock"))
        H.wait_until(lambda: (app_dir / "cblocked.pid").exists(), what="blocked in read")
        time.sleep(0.6)        # past PARK_AFTER (0.25 s) + HOLD_LATE: the timer is due, and late
        release()
        assert quick.response() == {"pid": pid, "q": "quick"}
        assert slow.response() == {"pid": pid, "q": ""}
        (app_dir / "cblocked.pid").unlink()
        H.wait_until(lambda: "could not interrupt" in srv.log(), what="the pause logged")
        # Holding is paused now: the same batch again, on new connections to that worker
        # (the first ones may have been handed back meanwhile).
        quick, slow = _clients_on(srv.port, pid, 2, clients)
        _stopped_batch(pid, (quick, "/?again"), (slow, "/cblock"))
        assert quick.response() == {"pid": pid, "q": "again"}
        # ... before the other one's read ends (only the release below ends it)
        H.wait_until(lambda: (app_dir / "cblocked.pid").exists(), what="blocked in read")
        release()
        assert slow.response() == {"pid": pid, "q": ""}
