"""Shared plumbing of the backend suites (test_fdpass, test_listen, test_scoreboard,
test_dispatch, test_dispatch_fork): no tests here.

Theory of operation: raw channel helpers for malformed datagrams (hdr, raw_send);
Procs, forked children that end in os._exit; worker_main, a test worker that uses
only the backend's recv_msg and the scoreboard; Rig, a dispatcher in this process
with forked workers, a listener and clients; Ends, a dispatcher whose workers are
channel ends held by the test. The fixtures over them (procs, rig, ends) are in
conftest.py. Tests import this module by name (conftest.py puts tests/ on sys.path).
"""

import os
import select
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from array import array

from pyfork.scoreboard import Scoreboard


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
