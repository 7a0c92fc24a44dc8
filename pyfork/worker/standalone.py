"""StandaloneRuntime: the worker-runtime contract (pyfork/serve/runtime.py) without a primary.

For testing an interface on its own (and for embedding one in a process that does
its own accepting): take() accepts from a listening socket with the same lean
per-connection path as pyfork's Worker in shared/reuseport mode, and the counters
stand in for the scoreboard. tcp_cork() is the backend's (PYFORK_BACKEND, or the
``backend`` argument).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from typing import Callable, List, Optional

import pyfork.backend
from pyfork.worker.runtime import Acceptor


class StandaloneRuntime:
    """A Runtime without a primary, for testing an interface on its own:
    take() accepts from ``listen_sock``; closed()/request_* are counters; stop()
    sets draining (and wakes the loop through wakeup_fd()). ``backend`` is a
    pyfork.backend name (None: PYFORK_BACKEND, default auto)."""

    tick_interval = 1.0
    tcp_nodelay = True    # take() sets TCP_NODELAY on TCP sockets, as the dispatcher does
    parks = False         # no primary to hand connections back to

    def __init__(self, listen_sock: socket.socket, id: int = 0, backend: Optional[str] = None):
        self.id = id
        self.pid = os.getpid()
        self.log = logging.getLogger("pyfork.worker")
        self.draining = False
        self.taken = self.closed_count = self.started = self.finished = 0
        self.ticks = 0
        self.sent: list = []
        self._callbacks: List[Callable] = []
        self._sock = listen_sock
        listen_sock.setblocking(False)
        self._acceptor = Acceptor(listen_sock)
        self.conn_family = int(listen_sock.family)   # every connection has the listener's family
        self._backend = pyfork.backend.load(backend)
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def ready(self) -> None:
        pass

    def fileno(self) -> int:
        return self._sock.fileno()

    def wakeup_fd(self) -> int:
        return self._r

    def take(self) -> List[socket.socket]:
        out: List[socket.socket] = []
        if self.draining:
            return out
        take = self._acceptor.take
        for _ in range(64):
            try:
                out.append(take())
            except (BlockingIOError, InterruptedError):
                break
        self.taken += len(out)
        return out

    def take_fds(self) -> List[int]:
        return [conn.detach() for conn in self.take()]

    def tcp_cork(self, fd: int, on: bool) -> None:
        self._backend.tcp_cork(fd, on)

    def closed(self, n: int = 1) -> None:
        self.closed_count += n

    def park(self, fds: List[int]) -> int:
        return 0

    def parks_settled(self) -> bool:
        return True     # never parks

    def queued(self) -> bool:
        return False

    def request_started(self) -> None:
        self.started += 1

    def request_finished(self) -> None:
        self.finished += 1

    def tick(self) -> None:
        self.ticks += 1
        try:
            while os.read(self._r, 512):
                pass
        except BlockingIOError:
            pass

    def stop(self) -> None:
        self.draining = True
        try:
            os.write(self._w, b"\0")
        except OSError:
            pass

    def send(self, obj) -> None:
        self.sent.append(json.loads(json.dumps(obj)))

    def on_message(self, callback: Callable) -> None:
        self._callbacks.append(callback)

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
