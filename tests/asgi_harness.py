"""Test support for the asyncio/ASGI/demo tests: a runtime and a forked worker.

Theory of operation: `FakeRuntime` implements the worker-runtime contract (the `Runtime`
protocol, pyfork/serve/runtime.py) on a plain listening socket (what pyfork.worker.standalone.StandaloneRuntime does): take() accepts
until EAGAIN, closed()/request_*() count, tick() drains the signal wakeup pipe and
turns a SIGTERM into `draining`. `ForkedWorker` forks a child that builds one, runs
`pyfork.serve.<interface>.serve(app, rt)` on a listening socket the parent made (or,
with runtime="standalone", pyfork.worker.standalone.StandaloneRuntime: then there is no b"D"), and
when serve() returns writes the runtime's counters as JSON on a pipe and `_exit`s.
The parent talks HTTP to the socket, sends SIGTERM to drain, reaps the child within
a generous bound and checks the counters (every socket taken was reported closed,
every request started also finished).

Synchronisation without timing: the child writes one byte on `events` once its
SIGTERM handler is installed (b"S", the constructor waits for it), and when it starts
draining (b"D") and test apps can write their own (`child_notify`) and wait for the
parent (`child_wait_release`, a pipe read).

The pipes, fd counting and a minimal response reader are shared with wsgi_harness
(net_harness.py); tests import this module by name (conftest.py puts tests/ on sys.path).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import time


from net_harness import CHILD, LIVENESS, ForkedChild, fd_count as fd_count, read_response as read_response
from net_harness import listener as net_listener


class FakeRuntime:
    """pyfork.serve.runtime.Runtime on a listening socket (accepts itself, like the shared
    policy). With nodelay=False its sockets lack TCP_NODELAY and `tcp_nodelay` says so, so
    the interface must set it. `conn_family` is None: interfaces then use take(), not
    take_fds() (the shipped runtimes cover that path)."""

    tick_interval = 1.0
    conn_family = None
    parks = False       # no primary: park() hands nothing back

    def __init__(self, listen_sock: socket.socket, worker_id: int = 1, nodelay: bool = True,
                 events_fd: int = -1):
        self.listen_sock = listen_sock
        self.id = worker_id
        self.pid = os.getpid()
        self.log = logging.getLogger("pyfork.worker")
        self.nodelay = self.tcp_nodelay = nodelay
        self.events_fd = events_fd
        self.draining = False
        self.taken = self.closed_count = self.started = self.finished = self.ticks = 0
        self.max_busy = 0
        self._sigterm = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # signals: SIGTERM only records (STYLE.md principle 8); tick() acts on it
    def install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _on_sigterm(self, signum, frame) -> None:
        self._sigterm = True

    def ready(self) -> None:
        pass

    def fileno(self) -> int:
        return self.listen_sock.fileno()

    def wakeup_fd(self) -> int:
        return self._wake_r

    def take(self) -> list[socket.socket]:
        if self.draining:
            return []
        out = []
        while True:
            try:
                sock, _addr = self.listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                break
            sock.setblocking(False)
            if self.nodelay:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            out.append(sock)
        self.taken += len(out)
        return out

    def take_fds(self) -> list[int]:
        return [sock.detach() for sock in self.take()]

    def tcp_cork(self, fd: int, on: bool) -> None:
        with socket.socket(fileno=fd) as sock:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
            finally:
                sock.detach()

    def closed(self, n: int = 1) -> None:
        self.closed_count += n

    def park(self, fds) -> int:
        return 0

    def parks_settled(self) -> bool:
        return True     # never parks

    def queued(self) -> bool:
        return False

    def request_started(self) -> None:
        self.started += 1
        self.max_busy = max(self.max_busy, self.started - self.finished)

    def request_finished(self) -> None:
        self.finished += 1

    def tick(self) -> None:
        self.ticks += 1
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass
        if self._sigterm and not self.draining:
            self.stop()

    def stop(self) -> None:
        self.draining = True
        if self.events_fd >= 0:
            os.write(self.events_fd, b"D")

    def stats(self) -> dict:
        return {"taken": self.taken, "closed": self.closed_count, "started": self.started,
                "finished": self.finished, "ticks": self.ticks, "max_busy": self.max_busy,
                "pid": self.pid, "id": self.id}


def child_notify(byte: bytes) -> None:
    os.write(CHILD["events_w"], byte)


async def child_wait_release() -> None:
    """Waits (without blocking the loop) until the parent calls ForkedWorker.release()."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    fd = CHILD["release_r"]
    loop.add_reader(fd, lambda: fut.done() or fut.set_result(None))
    try:
        await fut
        os.read(fd, 1)
    finally:
        loop.remove_reader(fd)


def listener() -> socket.socket:
    return net_listener(backlog=128, blocking=False)


class ForkedWorker(ForkedChild):
    """One child running `pyfork.serve.<interface>.serve(app, FakeRuntime(...))`."""

    def __init__(self, listen_sock, app, interface: str, worker_id: int = 1, env: dict | None = None,
                 nodelay: bool = True, report=None, runtime: str = "fake"):
        self.interface = interface
        self.port = listen_sock.getsockname()[1]

        def run_child(events_w: int) -> dict:
            for key, value in (env or {}).items():
                os.environ[key] = value
            from pyfork.serve import load
            module = load(interface)
            if runtime == "standalone":  # the supervisor's, as shipped
                from pyfork.worker.standalone import StandaloneRuntime
                rt = StandaloneRuntime(listen_sock, id=worker_id)
                signal.signal(signal.SIGTERM, lambda signum, frame: rt.stop())
            else:
                rt = FakeRuntime(listen_sock, worker_id=worker_id, nodelay=nodelay, events_fd=events_w)
                rt.install_signals()
            try:  # make pyfork.worker.current() answer as in a real worker (this child only)
                import pyfork.worker
                pyfork.worker.current = lambda: rt
            except ImportError:
                pass
            os.write(events_w, b"S")  # the parent may signal us from now on
            module.serve(app, rt)
            out = rt.stats() if runtime != "standalone" else {
                "taken": rt.taken, "closed": rt.closed_count, "started": rt.started,
                "finished": rt.finished, "ticks": rt.ticks, "pid": rt.pid, "id": rt.id}
            out["extra"] = report() if report else None
            return out

        self._fork(run_child)
        try:
            self.wait_event(b"S")
        except BaseException:
            self.kill()
            raise

    def drain(self) -> None:
        os.kill(self.pid, signal.SIGTERM)

    def join(self, timeout: float = LIVENESS) -> dict:
        """Reaps the child (SIGKILL after `timeout`) and returns its stats; closes our fds."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self._close_pipes()
            raise AssertionError(f"child {self.pid} did not exit within {timeout} s of the drain")
        chunks = []
        while True:
            chunk = os.read(self.stats_r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        self._close_pipes()
        raw = b"".join(chunks)
        self.stats = json.loads(raw) if raw else {"error": f"no stats, wait status {status}"}
        assert "error" not in self.stats, self.stats["error"]
        assert os.waitstatus_to_exitcode(status) == 0, self.stats
        return self.stats

    def stop(self) -> dict:
        self.drain()
        return self.join()


class Client:
    """A requests.Session with a base URL and the liveness timeout (requests is in the
    test extras; one Session = one kept-alive connection per host, as a browser would)."""

    def __init__(self, base: str = "", headers: dict | None = None):
        import requests

        self.session = requests.Session()
        self.session.headers.update(headers or {})
        self.base = base

    def request(self, method: str, path: str, **kw):
        kw.setdefault("timeout", LIVENESS)
        return self.session.request(method, self.base + path, **kw)

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw):
        return self.request("POST", path, **kw)

    def head(self, path: str, **kw):
        return self.request("HEAD", path, **kw)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.session.close()


def assert_balanced(stats: dict) -> None:
    """Every socket the runtime handed out was reported closed; requests started == finished."""
    assert stats["closed"] == stats["taken"], stats
    assert stats["started"] == stats["finished"], stats
