"""One suite for both dispatch backends (pyfork._core in C, pyfork._pure in Python).

Theory of operation: every test takes the ``backend`` fixture (parametrised
"c"/"python") and uses only the shared interface, so a divergence between the
two is a failing test on one side. Channel tests use real SOCK_SEQPACKET
socketpairs and raw sendmsg to build malformed datagrams. Dispatcher tests run
the dispatcher in this process, fork real workers (children that only use the
same backend's recv_msg and the scoreboard, and end in os._exit) and drive
real TCP or Unix clients; the client learns which worker served it from the
reply. Every test runs under ``fd_guard``: the open-fd count must be unchanged.
Only liveness timeouts, no timing assertions (the CPU check in the EMFILE
test is a generous ratio against wall time).
"""

import errno
import json
import os
import random
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from array import array

import pytest

import pyfork
import pyfork.backend
from pyfork.scoreboard import SLOT_SIZE, Scoreboard

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]

HDR = struct.Struct("<IHHII")
MAGIC = 0x31464B50
LIVENESS = 30.0  # seconds: generous, only to turn a hang into a failure


# ---- helpers ----------------------------------------------------------------

def seqpacket_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return a, b


def raw_send(sock, data, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def hdr(type=5, nfds=0, length=0, arg=0, magic=MAGIC):
    return HDR.pack(magic, type, nfds, length, arg)


def readable(fd, timeout=0.0):
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


def close_fds_except(keep):
    """Child side: drop every inherited fd except stdio and ``keep``, so a worker
    holds no sibling channel (EOF and hangup then mean what they say)."""
    keep = set(keep) | {0, 1, 2}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


class Procs:
    """Forked children of one test: each ends in os._exit; leftovers are killed."""

    def __init__(self):
        self.pids = set()

    def fork(self, fn, *args):
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                fn(*args)
                code = 0
            except BaseException:  # noqa: BLE001 -- report anything, then exit
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        self.pids.add(pid)
        return pid

    def wait(self, pid, timeout=LIVENESS):
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.pids.discard(pid)
                return status
            if time.monotonic() > deadline:
                raise AssertionError("child %d did not exit within %.0f s" % (pid, timeout))
            time.sleep(0.01)

    def kill(self, pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait(pid)

    def cleanup(self):
        for pid in list(self.pids):
            try:
                self.kill(pid)
            except (AssertionError, ChildProcessError):
                self.pids.discard(pid)


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.cleanup()


def worker_main(be, end, slot, board, capacity, mode, announce):
    """A test worker. Modes: "reply" (read one chunk, answer the slot number,
    close), "hold" (answer, keep the connection until the client closes), "sink"
    (close every fd at once), "stall" (never read the channel). Exits on channel
    EOF, MSG_DRAIN, or MSG_USER b"quit"."""
    sv = Scoreboard(board, capacity).slot(slot)
    sv.set_pid(os.getpid())
    if announce:
        be.send_msg(end, be.MSG_CREDIT, 1)   # consumed by the dispatcher itself
        be.send_msg(end, be.MSG_READY, os.getpid())
    if mode == "stall":
        while True:
            time.sleep(1.0)
    sel = selectors.DefaultSelector()
    sel.register(end, selectors.EVENT_READ, None)
    reply = b"%d\n" % slot

    def closed(sock, n=1):
        if sock is not None:
            sel.unregister(sock)
            sock.close()
        if sv.conn_closed(n):
            be.send_msg(end, be.MSG_CREDIT, n)

    while True:
        for key, _ in sel.select(1.0):
            if key.data is None:
                try:
                    msg = be.recv_msg(end)
                except BrokenPipeError:
                    return
                if msg.type == be.MSG_CONN:
                    if mode == "sink":
                        for fd in msg.fds:
                            os.close(fd)
                        closed(None, len(msg.fds))
                        continue
                    for fd in msg.fds:
                        conn = socket.socket(fileno=fd)
                        conn.setblocking(False)
                        sel.register(conn, selectors.EVENT_READ, "conn")
                elif msg.type == be.MSG_DRAIN or (msg.type == be.MSG_USER
                                                  and msg.payload == b"quit"):
                    return
                else:
                    for fd in msg.fds:
                        os.close(fd)
                continue
            conn = key.fileobj
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                try:
                    conn.sendall(reply)
                except OSError:
                    pass
                if mode == "reply":
                    closed(conn)
            else:
                closed(conn)


class Rig:
    """A dispatcher in this process, forked workers, a listener, clients."""

    def __init__(self, be, procs, capacity, listener="tcp", tmp_path=None, **cfg):
        self.be = be
        self.procs = procs
        self.capacity = capacity
        self.d = be.Dispatcher(capacity, **cfg)
        self.pids = {}
        self.chans = {}
        self.modes = {}
        self.clients = []
        if listener == "tcp":
            self.lfd = be.listen_tcp("127.0.0.1", 0)
            with socket.socket(fileno=os.dup(self.lfd)) as s:
                self.addr = s.getsockname()
            self.family = socket.AF_INET
        else:
            self.addr = str(tmp_path / "l.sock")
            self.lfd = be.listen_unix(self.addr)
            self.family = socket.AF_UNIX
        self.d.add_listener(self.lfd)

    def spawn(self, slot, mode="reply", peer=True, ready=True, sndbuf=None, announce=False):
        a, b = seqpacket_pair()
        if sndbuf is not None:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        chan, end = a.detach(), b.detach()
        self.d.add_worker(slot, chan, os.dup(end) if peer else -1)
        board = self.d.scoreboard

        def child():
            close_fds_except({end})
            worker_main(self.be, end, slot, board, self.capacity, mode, announce)

        pid = self.procs.fork(child)
        os.close(end)
        self.pids[slot] = pid
        self.chans[slot] = chan
        self.modes[slot] = mode
        if ready:
            self.d.set_ready(slot)
        return pid

    def client(self, payload=b"x"):
        s = socket.socket(self.family, socket.SOCK_STREAM)
        self.clients.append(s)
        s.settimeout(LIVENESS)
        s.connect(self.addr)
        if payload:
            s.sendall(payload)
        return s

    def pump(self, cond, timeout=LIVENESS, what="condition"):
        """Runs the dispatcher until cond() is true; returns the events seen."""
        deadline = time.monotonic() + timeout
        seen = []
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s; stats=%r"
                                     % (what, self.d.stats()))
            seen.extend(self.d.run(0.02))
        return seen

    def served_by(self, s):
        """Pumps until client s has its reply; returns the worker slot."""
        self.pump(lambda: readable(s.fileno()), what="a reply")
        data = s.recv(64)
        assert data.endswith(b"\n"), data
        return int(data)

    def stop_worker(self, slot, remove=True):
        pid = self.pids.pop(slot)
        if self.modes[slot] == "stall":
            self.procs.kill(pid)
        else:
            self.be.send_msg(self.chans[slot], self.be.MSG_USER, 0, b"quit")
            status = self.procs.wait(pid)
            assert os.waitstatus_to_exitcode(status) == 0, "worker %d failed" % slot
        if remove:
            return self.d.remove_worker(slot)
        return None

    def close(self):
        for s in self.clients:
            s.close()
        self.clients = []
        for slot in list(self.pids):
            if self.d is not None and self.modes[slot] != "stall":
                try:
                    self.stop_worker(slot, remove=False)
                    continue
                except (OSError, AssertionError):
                    pass
            self.procs.kill(self.pids.pop(slot))
        if self.d is not None:
            self.d.close()
        if self.lfd >= 0:
            os.close(self.lfd)
            self.lfd = -1
        if self.family == socket.AF_UNIX and os.path.exists(self.addr):
            os.unlink(self.addr)


@pytest.fixture
def rig(backend, procs, tmp_path):
    made = []

    def make(capacity, **kw):
        r = Rig(backend, procs, capacity, tmp_path=tmp_path, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


# ---- backend selection -----------------------------------------------------

def test_backend_name_matches_env():
    env = (os.environ.get("PYFORK_BACKEND", "") or "auto").lower()
    got = pyfork.backend.name()
    if env == "c":
        # The check CI relies on: the C backend is really the one in use.
        assert got == "c"
    elif env == "python":
        assert got == "python"
    else:
        assert got in ("c", "python")
    assert pyfork.__version__ == "0.1.0"


def test_backend_load_names():
    assert pyfork.backend.load("python").BACKEND == "python"
    assert pyfork.backend.name("python") == "python"
    assert pyfork.backend.name(pyfork.backend.load("python")) == "python"
    with pytest.raises(ValueError, match="unknown backend"):
        pyfork.backend.load("cython")
    with pytest.raises(ValueError):
        pyfork.backend.load(3)


def test_import_pyfork_is_lazy(tmp_path):
    """import pyfork loads nothing heavy, and works even if cluster.py is broken."""
    import subprocess
    code = ("import sys, pyfork\n"
            "heavy = [m for m in ('pyfork.cluster', 'pyfork._core', 'pyfork._pure', 'cffi')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert pyfork.backend.name('python') == 'python'\n"
            "assert pyfork.scoreboard.SLOT_SIZE == 64\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       timeout=LIVENESS)
    assert r.returncode == 0, r.stderr.decode()
    # A package whose cluster module is broken still imports.
    pkg = tmp_path / "pyfork"
    pkg.mkdir()
    pkg.joinpath("__init__.py").write_bytes(open(pyfork.__file__, "rb").read())
    pkg.joinpath("cluster.py").write_text("raise RuntimeError('broken on purpose')\n")
    code = ("import pyfork\n"
            "assert pyfork.__version__ == '0.1.0'\n"
            "try:\n    pyfork.Cluster\nexcept RuntimeError:\n    pass\n"
            "else:\n    raise SystemExit('Cluster should fail')\n")
    # -S: no site-packages (an editable install's finder would pick the real one).
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path),
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)},
                       capture_output=True, timeout=LIVENESS)
    assert r.returncode == 0, r.stderr.decode()


def test_backend_interface(backend):
    assert backend.MAX_FDS == 32 and backend.MAX_PAYLOAD == 65536 and backend.SLOT_SIZE == 64
    assert (backend.MSG_CONN, backend.MSG_READY, backend.MSG_CREDIT, backend.MSG_DRAIN,
            backend.MSG_USER, backend.MSG_CTL) == (1, 2, 3, 4, 5, 6)
    assert (backend.STATE_FREE, backend.STATE_SPAWNING, backend.STATE_READY,
            backend.STATE_DRAINING, backend.STATE_GONE) == (0, 1, 2, 3, 4)
    assert backend.Message._fields == ("type", "arg", "payload", "fds")
    assert backend.Event._fields == ("kind", "slot", "tag")


# ---- channel messages ----------------------------------------------------------

def test_message_round_trip_with_fds(backend):
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        backend.send_msg(a.fileno(), backend.MSG_USER, 7, b'{"x": 1}', [r, w])
        msg = backend.recv_msg(b.fileno())
        assert (msg.type, msg.arg, msg.payload, len(msg.fds)) == (backend.MSG_USER, 7,
                                                                   b'{"x": 1}', 2)
        r2, w2 = msg.fds
        assert r2 not in (r, w) and w2 not in (r, w)
        assert os.get_inheritable(r2) is False  # MSG_CMSG_CLOEXEC
        os.write(w2, b"ok")
        assert os.read(r, 2) == b"ok"
        os.close(r2)
        os.close(w2)
        # No fds, no payload; the largest payload; the most fds.
        backend.send_msg(a.fileno(), backend.MSG_READY)
        assert backend.recv_msg(b.fileno()) == (backend.MSG_READY, 0, b"", [])
        big = bytes(range(256)) * 256
        backend.send_msg(a.fileno(), backend.MSG_CTL, 2**32 - 1, big)
        msg = backend.recv_msg(b.fileno())
        assert msg.payload == big and msg.arg == 2**32 - 1
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r] * backend.MAX_FDS)
        msg = backend.recv_msg(b.fileno())
        assert len(msg.fds) == backend.MAX_FDS
        for fd in msg.fds:
            os.close(fd)
        # The wire format is the documented header.
        backend.send_msg(a.fileno(), backend.MSG_USER, 9, b"abc")
        data = b.recv(100)
        assert data == HDR.pack(MAGIC, 5, 0, 3, 9) + b"abc"
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_send_limits(backend):
    a, b = seqpacket_pair()
    try:
        with pytest.raises(OSError) as ei:
            backend.send_msg(a.fileno(), backend.MSG_USER, 0, b"x" * (backend.MAX_PAYLOAD + 1))
        assert ei.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError) as ei:
            backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [0] * (backend.MAX_FDS + 1))
        assert ei.value.errno == errno.EMSGSIZE
        for bad in (0, 7, 99):
            with pytest.raises(OSError) as ei:
                backend.send_msg(a.fileno(), bad)
            assert ei.value.errno == errno.EINVAL
        for bad_arg in (-1, 2**32):
            with pytest.raises(ValueError):
                backend.send_msg(a.fileno(), backend.MSG_USER, bad_arg)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            backend.recv_msg(b.fileno())
    finally:
        a.close()
        b.close()


def test_receiver_matches_recv_msg(backend, open_fds):
    """The worker's hot-path Receiver: same messages as recv_msg, None (not
    BlockingIOError) on an empty non-blocking channel, EBADMSG and EOF as recv_msg."""
    before = open_fds()
    a, b = seqpacket_pair()
    b.setblocking(False)
    r, w = os.pipe()
    try:
        rx = backend.Receiver(b.fileno())
        assert rx.recv() is None
        backend.send_msg(a.fileno(), backend.MSG_CONN, 3, b"", [r, w])
        backend.send_msg(a.fileno(), backend.MSG_USER, 0, b'"hi"')
        t, arg, payload, fds = rx.recv()
        assert (t, arg, payload, len(fds)) == (backend.MSG_CONN, 3, b"", 2)
        for fd in fds:
            os.close(fd)
        assert tuple(rx.recv()) == (backend.MSG_USER, 0, b'"hi"', [])
        assert rx.recv() is None
        raw_send(a, b"garbage!", [r])
        with pytest.raises(OSError) as exc:
            rx.recv()
        assert exc.value.errno == errno.EBADMSG
        a.close()
        with pytest.raises(BrokenPipeError):
            rx.recv()
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
    assert open_fds() == before


def test_eof_and_closed_channel(backend, open_fds):
    a, b = seqpacket_pair()
    fa = a.detach()
    os.close(fa)
    with pytest.raises(BrokenPipeError):
        backend.recv_msg(b.fileno())
    with pytest.raises(BrokenPipeError):  # MSG_NOSIGNAL: EPIPE, not a signal
        backend.send_msg(b.fileno(), backend.MSG_READY)
    b.close()
    # A closed fd: EBADF, never a crash.
    with pytest.raises(OSError) as ei:
        backend.send_msg(fa, backend.MSG_READY)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        backend.recv_msg(fa)
    assert ei.value.errno == errno.EBADF


GARBAGE = {
    "short": lambda n: hdr(nfds=n)[:10],
    "bad-magic": lambda n: hdr(nfds=n, magic=0xDEADBEEF),
    "bad-type-0": lambda n: hdr(type=0, nfds=n),
    "bad-type-7": lambda n: hdr(type=7, nfds=n),
    "len-too-big": lambda n: hdr(nfds=n, length=10) + b"12345",
    "len-too-small": lambda n: hdr(nfds=n, length=2) + b"12345",
    "nfds-mismatch": lambda n: hdr(nfds=n + 1),
    "fds-without-nfds": lambda n: hdr(nfds=0) if n else hdr(nfds=3),
    "truncated": lambda n: hdr(nfds=n, length=65536 + 64) + b"z" * (65536 + 64),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
@pytest.mark.parametrize("nfds", [0, 3])
def test_garbage_rejected_without_leak(backend, open_fds, case, nfds):
    a, b = seqpacket_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    r, w = os.pipe()
    try:
        before = open_fds()
        raw_send(a, GARBAGE[case](nfds), [r] * nfds)
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno())
        assert ei.value.errno == errno.EBADMSG, ei.value
        assert open_fds() == before, "received fds leaked"
        # The channel is still usable after a bad datagram.
        backend.send_msg(a.fileno(), backend.MSG_READY, 1)
        assert backend.recv_msg(b.fileno()) == (backend.MSG_READY, 1, b"", [])
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_ctrunc_detected(backend, open_fds):
    """More fds than the receiver's buffer holds: the kernel sets MSG_CTRUNC
    (socket.recv_fds would silently return the ones that fit)."""
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        before = open_fds()
        n = backend.MAX_FDS + 8
        raw_send(a, hdr(type=1, nfds=n), [r] * n)
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno())
        assert ei.value.errno == errno.EBADMSG
        assert open_fds() == before
        # A well-formed message with more fds than this receiver allows (but
        # at most MAX_FDS) is EMSGSIZE, every fd closed.
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r] * 5)
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno(), 2)
        assert ei.value.errno == errno.EMSGSIZE
        assert open_fds() == before
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r])
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno(), 0)
        assert ei.value.errno == errno.EMSGSIZE
        assert open_fds() == before
        # The channel still works.
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r])
        msg = backend.recv_msg(b.fileno(), 1)
        assert len(msg.fds) == 1
        os.close(msg.fds[0])
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_foreign_cmsg_rejected(backend, open_fds):
    """SCM_CREDENTIALS (SO_PASSCRED on the receiver) is not our protocol."""
    a, b = seqpacket_pair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    r, w = os.pipe()
    try:
        before = open_fds()
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r, w])
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno())
        assert ei.value.errno == errno.EBADMSG
        assert open_fds() == before
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_socket_default_timeout_is_ignored(backend):
    """An app's socket.setdefaulttimeout() must not change a channel's flags or
    make a non-blocking receive wait."""
    a, b = seqpacket_pair()
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        assert os.get_blocking(b.fileno()) is True
        b2 = os.dup(b.fileno())
        os.set_blocking(b2, False)  # shares the file description with b
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            backend.recv_msg(b2)
        assert time.monotonic() - t0 < 2.5  # no 5 s poll
        os.close(b2)
        os.set_blocking(b.fileno(), True)
        backend.send_msg(a.fileno(), backend.MSG_READY, 3)
        assert backend.recv_msg(b.fileno()).arg == 3
        assert os.get_blocking(b.fileno()) is True and os.get_blocking(a.fileno()) is True
    finally:
        socket.setdefaulttimeout(saved)
        a.close()
        b.close()


def test_recv_max_fds_range(backend):
    a, b = seqpacket_pair()
    try:
        with pytest.raises(ValueError):
            backend.recv_msg(b.fileno(), backend.MAX_FDS + 1)
        with pytest.raises(ValueError):
            backend.recv_msg(b.fileno(), -1)
    finally:
        a.close()
        b.close()


def test_wire_compatible_across_backends(open_fds):
    try:
        c = pyfork.backend.load("c")
    except ImportError:
        pytest.skip("C backend not built")
    py = pyfork.backend.load("python")
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        for tx, rx in ((c, py), (py, c)):
            tx.send_msg(a.fileno(), tx.MSG_USER, 42, b"hello", [r, w])
            msg = rx.recv_msg(b.fileno())
            assert tuple(msg[:3]) == (5, 42, b"hello") and len(msg.fds) == 2
            for fd in msg.fds:
                os.close(fd)
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


# ---- listeners ------------------------------------------------------------

def test_listen_tcp_and_adopt(backend):
    fd = backend.listen_tcp("127.0.0.1", 0, backlog=16)
    try:
        assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            port = s.getsockname()[1]
        # Two SO_REUSEPORT listeners on one port.
        r1 = backend.listen_tcp("127.0.0.1", 0, reuseport=True)
        with socket.socket(fileno=os.dup(r1)) as s:
            rport = s.getsockname()[1]
        r2 = backend.listen_tcp("127.0.0.1", rport, reuseport=True)
        os.close(r1)
        os.close(r2)
        # Any address: reachable over IPv4 loopback (dual-stack "::" or 0.0.0.0).
        anyfd = backend.listen_tcp("", 0)
        with socket.socket(fileno=os.dup(anyfd)) as s:
            aport = s.getsockname()[1]
        socket.create_connection(("127.0.0.1", aport), timeout=LIVENESS).close()
        os.close(anyfd)
        with pytest.raises(OSError) as ei:  # in use, not SO_REUSEPORT
            backend.listen_tcp("127.0.0.1", port)
        assert ei.value.errno == errno.EADDRINUSE
        # adopt: a listening socket passes and becomes non-blocking + CLOEXEC.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.set_inheritable(True)
        s.setblocking(True)
        assert backend.adopt_listener(s.fileno()) == s.fileno()
        assert os.get_blocking(s.fileno()) is False
        assert os.get_inheritable(s.fileno()) is False
        s.close()
        s = socket.socket()  # not listening
        with pytest.raises(OSError) as ei:
            backend.adopt_listener(s.fileno())
        assert ei.value.errno == errno.EINVAL
        s.close()
        pr, pw = os.pipe()
        with pytest.raises(OSError) as ei:
            backend.adopt_listener(pr)
        assert ei.value.errno == errno.ENOTSOCK
        os.close(pr)
        os.close(pw)
    finally:
        os.close(fd)


def test_listen_unix(backend, tmp_path):
    path = str(tmp_path / "s.sock")
    fd = backend.listen_unix(path, mode=0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.close(fd)
    fd = backend.listen_unix(path)  # a stale socket file is replaced
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.close()
    with pytest.raises(OSError) as ei:  # a live one never is
        backend.listen_unix(path)
    assert ei.value.errno == errno.EADDRINUSE
    os.close(fd)
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(OSError) as ei:
        backend.listen_unix(str(plain))
    assert ei.value.errno == errno.EADDRINUSE
    assert plain.read_text() == "x"
    with pytest.raises(OSError) as ei:
        backend.listen_unix(str(tmp_path / ("x" * 120)))
    assert ei.value.errno == errno.ENAMETOOLONG


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
                                  "pending", "accepting"}
        assert set(d.worker_stats(0)) == {"state", "sent", "closed", "inflight"}
        mv = d.scoreboard
        assert len(mv) == mv.nbytes == 3 * SLOT_SIZE and not mv.readonly
        assert d.run(0) == []
        del mv


# ---- scoreboard ------------------------------------------------------------

def test_scoreboard_layout_and_sharing(backend, procs):
    with backend.Dispatcher(4) as d:
        board = Scoreboard(d.scoreboard, 4)
        sv = board.slot(2)

        def child():
            sv.set_pid(4242)
            sv.request_started()
            sv.request_started()
            sv.request_finished()
            sv.conn_closed(3)

        assert os.waitstatus_to_exitcode(procs.wait(procs.fork(child))) == 0
        raw = bytes(d.scoreboard[2 * 64:3 * 64])
        closed, handled, hb, busy, active, pid, want = struct.unpack_from("<QQQQIII", raw)
        assert (closed, handled, active, pid, want) == (3, 1, 1, 4242, 0)
        assert hb > 0 and busy > 0
        assert (sv.closed, sv.handled, sv.active, sv.pid) == (3, 1, 1, 4242)
        assert sv.conn_closed() is False
        sv.request_credit()
        assert struct.unpack_from("<I", d.scoreboard, 2 * 64 + 40)[0] == 1
        assert sv.conn_closed(2) is True and sv.want_credit == 0
        assert sv.closed == 6
        sv.request_finished()
        assert sv.active == 0 and sv.busy_since_ns == 0
        with pytest.raises(ValueError):
            board.slot(4)
        with pytest.raises(ValueError):
            Scoreboard(bytearray(100), 2)
        # worker_stats reads closed from the scoreboard.
        a, b = seqpacket_pair()
        d.add_worker(2, a.detach())  # zeroes the line
        assert sv.closed == 0 and sv.pid == 0
        sv.conn_closed(0)
        assert d.worker_stats(2) == {"state": backend.STATE_SPAWNING, "sent": 0,
                                     "closed": 0, "inflight": 0}
        b.close()
        board.release()


def test_slot_writer_matches_slotview(backend, procs):
    # A worker writes its line through the backend's SlotWriter (C: csrc/slot.c);
    # the primary reads it through SlotView: same fields, same meaning.
    with backend.Dispatcher(4) as d:
        board = Scoreboard(d.scoreboard, 4)
        sv = board.slot(1)
        writer = backend.SlotWriter(sv.line)

        def child():
            writer.request_started()
            writer.request_started()
            writer.request_finished()
            assert not writer.conn_closed(3)

        assert os.waitstatus_to_exitcode(procs.wait(procs.fork(child))) == 0
        assert (sv.closed, sv.handled, sv.active) == (3, 1, 1)
        assert sv.busy_since_ns > 0 and sv.heartbeat_ns >= sv.busy_since_ns
        assert board.slot(0).closed == 0 and board.slot(2).closed == 0  # only its own line
        sv.request_credit()
        assert writer.conn_closed(2) and sv.want_credit == 0 and sv.closed == 5
        assert not writer.conn_closed(1)
        writer.request_finished()
        assert sv.active == 0 and sv.busy_since_ns == 0 and sv.handled == 2
        with pytest.raises(ValueError):
            backend.SlotWriter(bytearray(8))
        del writer
        board.release()


# ---- dispatching ------------------------------------------------------------

def test_rr_order(rig):
    r = rig(3)
    for slot in range(3):
        r.spawn(slot, "reply")
    got = []
    for _ in range(9):
        s = r.client()
        got.append(r.served_by(s))
        s.close()
    assert sorted(got[:3]) == [0, 1, 2], got
    assert got == got[:3] * 3, got
    st = r.d.stats()
    assert st["accepted"] == 9 and st["dispatched"] == 9 and st["pending"] == 0
    for slot in range(3):
        assert r.d.worker_stats(slot)["sent"] == 3
    # Closed counts come back through the scoreboard.
    r.pump(lambda: all(r.d.worker_stats(i)["inflight"] == 0 for i in range(3)),
           what="closes")


def test_only_ready_workers_get_connections(rig):
    r = rig(3)
    r.spawn(0, "reply", ready=False)
    r.spawn(1, "reply")
    r.spawn(2, "reply")
    r.d.set_draining(2)
    assert r.d.worker_stats(0)["state"] == r.be.STATE_SPAWNING
    assert r.d.worker_stats(2)["state"] == r.be.STATE_DRAINING
    for _ in range(4):
        s = r.client()
        assert r.served_by(s) == 1
        s.close()
    r.d.set_ready(0)
    got = set()
    for _ in range(4):
        s = r.client()
        got.add(r.served_by(s))
        s.close()
    assert got == {0, 1}


def test_least_chooses_emptiest(rig):
    r = rig(3, policy="least")
    for slot in range(3):
        r.spawn(slot, "hold")
    rng = random.Random(1234)
    held = {0: [], 1: [], 2: []}
    for step in range(15):
        # Close a random number of held connections, wait until the
        # scoreboard shows it, then the next connection must go to a worker
        # with the fewest in flight.
        for slot in held:
            for _ in range(rng.randint(0, len(held[slot]))):
                held[slot].pop().close()
        r.pump(lambda: all(r.d.worker_stats(i)["inflight"] == len(held[i]) for i in held),
               what="inflight to match")
        before = {i: r.d.worker_stats(i)["inflight"] for i in held}
        s = r.client()
        slot = r.served_by(s)
        assert before[slot] == min(before.values()), (step, before, slot)
        held[slot].append(s)
    for lst in held.values():
        for s in lst:
            s.close()


def test_full_worker_skipped(rig):
    """A worker at max_inflight (it never reads its channel) gets nothing more;
    everything else goes to the other worker."""
    r = rig(2, max_inflight=2)
    r.spawn(0, "stall")
    r.spawn(1, "reply")
    clients = []
    for i in range(8):
        clients.append(r.client())
        r.pump(lambda: r.d.stats()["dispatched"] == i + 1, what="dispatch %d" % i)
    assert r.d.worker_stats(0)["sent"] == 2
    assert r.d.worker_stats(1)["sent"] == 6
    assert r.d.stats()["busy_skips"] >= 1
    r.pump(lambda: sum(readable(s.fileno()) for s in clients) == 6, what="6 replies")
    assert [s.recv(8) for s in clients if readable(s.fileno())] == [b"1\n"] * 6


def test_busy_channel_skipped(rig):
    """A worker whose channel is full (EAGAIN) is skipped, not waited for."""
    r = rig(2, max_inflight=1000)
    r.spawn(0, "stall", sndbuf=1)  # the kernel's minimum send buffer
    r.spawn(1, "reply")
    clients = []
    for i in range(40):
        clients.append(r.client())
        r.pump(lambda: r.d.stats()["dispatched"] == i + 1, what="dispatch %d" % i)
    st = r.d.stats()
    assert st["busy_skips"] >= 1, st
    sent0 = r.d.worker_stats(0)["sent"]
    assert 0 < sent0 < 20 and r.d.worker_stats(1)["sent"] == 40 - sent0
    # The stalled worker dies; what was queued to it is not lost.
    assert r.stop_worker(0) == sent0
    assert r.d.stats()["redispatched"] == sent0
    for s in clients:
        assert r.served_by(s) == 1


def test_sigkilled_worker_connections_redispatched(rig):
    r = rig(3)
    r.spawn(0, "stall")
    r.spawn(1, "reply")
    r.spawn(2, "reply")
    clients = [r.client() for _ in range(12)]
    r.pump(lambda: r.d.stats()["dispatched"] == 12, what="12 dispatched")
    queued = r.d.worker_stats(0)["sent"]
    assert queued >= 1
    # Nobody has read the ones sent to worker 0: they sit in its channel.
    pid = r.pids.pop(0)
    os.kill(pid, signal.SIGKILL)
    r.procs.wait(pid)
    assert r.d.remove_worker(0) == queued
    assert r.d.worker_stats(0)["state"] == r.be.STATE_FREE
    slots = [r.served_by(s) for s in clients]
    assert set(slots) <= {1, 2} and len(slots) == 12
    st = r.d.stats()
    assert st["redispatched"] == queued and st["dispatched"] == 12 + queued
    assert st["dropped"] == 0


def test_hangup_without_peer(rig):
    r = rig(2)
    r.spawn(0, "reply", peer=False)
    r.spawn(1, "reply")
    r.be.send_msg(r.chans[0], r.be.MSG_USER, 0, b"quit")
    assert os.waitstatus_to_exitcode(r.procs.wait(r.pids.pop(0))) == 0
    evs = r.pump(lambda: r.d.worker_stats(0)["state"] == r.be.STATE_GONE, what="hangup")
    evs += r.d.run(0.05)
    assert [e for e in evs if e.kind == "hangup"] == [r.be.Event("hangup", 0, 0)]
    r.d.set_draining(0)  # vacuously done
    with pytest.raises(BrokenPipeError):
        r.d.set_ready(0)
    assert r.d.worker_stats(0)["state"] == r.be.STATE_GONE
    s = r.client()
    assert r.served_by(s) == 1
    assert r.d.remove_worker(0) == 0
    r.spawn(0, "reply")  # the slot can be used again


def test_messages_and_credit(rig):
    r = rig(2)
    r.spawn(0, "reply", ready=False, announce=True)
    evs = []
    deadline = time.monotonic() + LIVENESS
    while not evs:
        assert time.monotonic() < deadline
        evs = r.d.run(0.1)
    # The CREDIT sent first was consumed by the dispatcher; READY is ours.
    assert evs == [r.be.Event("message", 0, 0)]
    assert r.d.run(0.05) == [r.be.Event("message", 0, 0)]  # left unread: reported again
    msg = r.be.recv_msg(r.chans[0])
    assert msg.type == r.be.MSG_READY and msg.arg == r.pids[0]
    assert r.d.run(0.1) == []


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


def test_back_pressure(rig):
    """Workers that never close: the dispatcher stops accepting (listeners out of
    the poll set, pending bounded) and resumes after closes + credit."""
    r = rig(2, max_inflight=2, max_pending=4, accept_batch=4)
    r.spawn(0, "hold")
    r.spawn(1, "hold")
    clients = [r.client() for _ in range(12)]
    r.pump(lambda: r.d.stats()["dispatched"] >= 4 and r.d.stats()["accepting"] == 0,
           what="listeners out of the poll set")
    for _ in range(10):  # a while longer: nothing more goes out
        r.d.run(0.02)
    st = r.d.stats()
    assert st["dispatched"] == 4 and st["accepting"] == 0, st
    assert st["pending"] <= 4 and st["accepted"] <= 8, st
    served = [s for s in clients if readable(s.fileno(), 0)]
    assert len(served) == 4
    # Close two: the workers close theirs, send credit, and two more go out.
    for s in served[:2]:
        assert s.recv(8).endswith(b"\n")
        s.close()
    r.pump(lambda: r.d.stats()["dispatched"] >= 6, what="resume after credit")
    # Drain all of them.
    done = set(id(s) for s in served[:2])
    deadline = time.monotonic() + LIVENESS
    while len(done) < 12:
        assert time.monotonic() < deadline, r.d.stats()
        r.d.run(0.02)
        for s in clients:
            if id(s) not in done and readable(s.fileno(), 0):
                assert s.recv(8).endswith(b"\n")
                s.close()
                done.add(id(s))
    st = r.d.stats()
    assert st["accepted"] == 12 and st["dispatched"] == 12 and st["dropped"] == 0


def test_stop_accepting_drains_backlog(rig):
    r = rig(1)
    r.spawn(0, "reply")
    clients = [r.client() for _ in range(20)]  # in the kernel backlog only
    r.d.stop_accepting()
    evs = []
    deadline = time.monotonic() + LIVENESS
    while not any(e.kind == "drained" for e in evs):
        assert time.monotonic() < deadline, r.d.stats()
        evs += r.d.run(0.05)
    assert [e for e in evs if e.kind == "drained"] == [r.be.Event("drained", -1, 0)]
    st = r.d.stats()
    assert st["accepted"] == 20 and st["pending"] == 0 and st["accepting"] == 0
    for s in clients:
        assert r.served_by(s) == 0
    late = r.client()
    end = time.monotonic() + 0.3
    more = []
    while time.monotonic() < end:
        more += r.d.run(0.05)
    assert not [e for e in more if e.kind == "drained"]  # reported once
    assert r.d.stats()["accepted"] == 20 and not readable(late.fileno(), 0)


def test_ten_thousand_connections_no_fd_leak(rig, open_fds):
    r = rig(2, listener="unix")
    r.spawn(0, "sink")
    r.spawn(1, "sink")
    before = open_fds()
    total = 10_000
    done = 0
    while done < total:
        n = min(250, total - done)
        for _ in range(n):
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(r.addr)
            c.close()
        done += n
        r.pump(lambda: r.d.stats()["accepted"] == done, what="%d accepted" % done)
    r.pump(lambda: sum(r.d.worker_stats(i)["closed"] for i in (0, 1)) == total,
           what="workers closed all")
    st = r.d.stats()
    assert st["dispatched"] == total and st["pending"] == 0 and st["dropped"] == 0
    assert abs(r.d.worker_stats(0)["sent"] - r.d.worker_stats(1)["sent"]) <= 64
    assert open_fds() == before


# ---- fd exhaustion -------------------------------------------------------------

def _exhausted_primary(be, report_w, ctl_r, n_clients, hold_s):
    """Forked primary: a dispatcher with one worker, then RLIMIT_NOFILE so low
    that every accept fails with EMFILE for hold_s seconds; reports its CPU time
    over that period; then frees fds and serves until the test says done."""
    close_fds_except({report_w, ctl_r})
    d = be.Dispatcher(1, emfile_pause_ms=100)
    lfd = be.listen_tcp("127.0.0.1", 0)
    with socket.socket(fileno=os.dup(lfd)) as s:
        port = s.getsockname()[1]
    d.add_listener(lfd)
    a, b = seqpacket_pair()
    chan, end = a.detach(), b.detach()
    d.add_worker(0, chan, os.dup(end))
    board = d.scoreboard
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            close_fds_except({end})
            worker_main(be, end, 0, board, 1, "reply", False)
            code = 0
        finally:
            os._exit(code)
    os.close(end)
    d.set_ready(0)
    d.watch(ctl_r, 1)
    # Every fd number up to the limit in use: accept gets EMFILE.
    top = max(int(x) for x in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 4, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    fillers = []
    while True:
        try:
            fillers.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            assert exc.errno == errno.EMFILE
            break
    os.write(report_w, json.dumps({"port": port}).encode() + b"\n")
    # Wait for the clients (the test connects them all, then writes a byte).
    while not readable(ctl_r, LIVENESS):
        pass
    os.read(ctl_r, 1)
    t0 = time.monotonic()
    c0 = os.times()
    while time.monotonic() - t0 < hold_s:
        d.run(0.05)
    c1 = os.times()
    wall = time.monotonic() - t0
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    exhausted = d.stats()
    for fd in fillers:
        os.close(fd)
    # fds free: serve the rest until the test writes "done".
    deadline = time.monotonic() + LIVENESS * 2
    while time.monotonic() < deadline:
        if any(e.kind == "watch" for e in d.run(0.1)):
            break
    stats = d.stats()
    be.send_msg(chan, be.MSG_USER, 0, b"quit")
    _, status = os.waitpid(pid, 0)
    d.close()
    os.close(lfd)
    os.write(report_w, json.dumps({"cpu": cpu, "wall": wall, "exhausted": exhausted,
                                   "stats": stats, "worker": status}).encode() + b"\n")


def test_emfile_no_spin_and_everyone_served(backend, procs):
    n_clients = 40
    hold_s = 1.5
    report_r, report_w = os.pipe()
    ctl_r, ctl_w = os.pipe()
    pid = procs.fork(_exhausted_primary, backend, report_w, ctl_r, n_clients, hold_s)
    os.close(report_w)
    os.close(ctl_r)
    rf = os.fdopen(report_r, "rb")
    clients = []
    try:
        assert readable(report_r, LIVENESS), "primary did not start"
        port = json.loads(rf.readline())["port"]
        for _ in range(n_clients):
            c = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS)
            c.sendall(b"x")
            clients.append(c)
        os.write(ctl_w, b"g")
        replies = []
        for c in clients:  # blocking reads with a generous timeout
            replies.append(c.recv(8))
        os.write(ctl_w, b"d")
        line = rf.readline()
        assert line, "primary died without a report"
        rep = json.loads(line)
        assert os.waitstatus_to_exitcode(procs.wait(pid)) == 0
    finally:
        for c in clients:
            c.close()
        rf.close()
        os.close(ctl_w)
    assert replies == [b"0\n"] * n_clients
    assert rep["exhausted"]["fd_exhaustion"] >= 1, rep
    assert rep["cpu"] < 0.5 * rep["wall"], rep
    assert rep["stats"]["accepted"] == n_clients and rep["stats"]["dropped"] == 0, rep
    assert os.waitstatus_to_exitcode(rep["worker"]) == 0


# ---- the dispatcher as seen from a worker's end (no fork needed) -------------------

class Ends:
    """A dispatcher whose workers are channel ends held by this test."""

    def __init__(self, be, capacity, **cfg):
        self.be = be
        self.d = be.Dispatcher(capacity, **cfg)
        self.ends = []
        for slot in range(capacity):
            a, b = seqpacket_pair()
            b.setblocking(False)
            self.d.add_worker(slot, a.detach(), os.dup(b.fileno()))
            self.d.set_ready(slot)
            self.ends.append(b)
        self.lfd = be.listen_tcp("127.0.0.1", 0)
        with socket.socket(fileno=os.dup(self.lfd)) as s:
            self.addr = s.getsockname()
        self.d.add_listener(self.lfd)
        self.clients = []

    def connect(self, n=1):
        for _ in range(n):
            self.clients.append(socket.create_connection(self.addr, timeout=LIVENESS))

    def pump_until_dispatched(self, n):
        deadline = time.monotonic() + LIVENESS
        while self.d.stats()["dispatched"] < n:
            assert time.monotonic() < deadline, self.d.stats()
            self.d.run(0.02)

    def take(self, slot):
        """Every CONN message queued to slot: a list of fd lists."""
        msgs = []
        while True:
            try:
                msg = self.be.recv_msg(self.ends[slot].fileno())
            except BlockingIOError:
                return msgs
            assert msg.type == self.be.MSG_CONN
            msgs.append(msg.fds)

    def close(self):
        self.d.close()
        os.close(self.lfd)
        for s in self.ends + self.clients:
            s.close()


@pytest.fixture
def ends(backend):
    made = []

    def make(capacity, **cfg):
        e = Ends(backend, capacity, **cfg)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


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
