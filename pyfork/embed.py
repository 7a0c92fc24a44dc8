"""pyfork.embed: another server's own connection handling, in pyfork's workers.

Theory of operation: pyfork's primary accepts and hands each connection to a forked worker;
in the worker a *worker body* of the user's own, `main(rt)`, runs instead of one of pyfork's
interfaces (pyfork/serve/embed.py calls it). `rt` is the worker runtime, whose contract is the
`Runtime` protocol (pyfork/serve/runtime.py): `rt.fileno()` turns readable when connections
wait, `rt.take()` returns them without blocking, `rt.tick()` keeps the heartbeat, and
`rt.draining` says when to stop. This module adds what most servers want on top:

  Connections(rt)   the same fd and take(), but every socket it hands out reports its own close
                    to the runtime (exactly once, from socket.close(), which every server and
                    event loop calls), and `open` counts those not yet closed;
  run_asyncio(rt, adopt, on_drain=None)
                    an asyncio loop in this worker (uvloop when installed, as pyfork's own
                    interfaces) driving the runtime: each connection goes to `adopt(sock)`,
                    ticks run on time and on signals, and once the worker drains `on_drain()`
                    runs (it may be a coroutine) and the call returns when every connection
                    is closed; Tornado and aiohttp plug in here (examples/embed_*.py);
  worker_body(fn)   marks `fn(rt)` as a worker body, so `pyfork.Cluster(fn)` or
                    `pyfork serve mod:fn` run it without `--interface embed`.

What stays the body's job (examples/embedding.md): report each request with
rt.request_started()/rt.request_finished() (the scoreboard `least` and the hang detector
read), close every connection it takes, and return once draining with its connections done.
"""
from __future__ import annotations

import asyncio
import inspect
import socket
from typing import Callable, List, Optional

from pyfork.serve import aio
from pyfork.serve.runtime import Runtime

__all__ = ["Connections", "ReportingSocket", "run_asyncio", "worker_body"]

INTERFACE = "embed"


def worker_body(fn: Optional[Callable[[Runtime], None]] = None, *, capacity: int = 100):
    """Marks `fn(rt)` as a worker body (sets `fn.pyfork_interface = "embed"`); returns fn.
    `capacity`: requests the body can run at once (the central queue sends a worker no more
    than it can start): 100 for an event-loop server, 1 for one that serves one at a time.
    Use as `@worker_body` or `@worker_body(capacity=1)`."""
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be an int >= 1, not {capacity!r}")

    def mark(f):
        f.pyfork_interface = INTERFACE
        f.pyfork_capacity = capacity
        return f
    return mark(fn) if fn is not None else mark


class ReportingSocket(socket.socket):
    """A connected socket that calls its `report()` once, when the fd leaves it: at the first
    close(), or at detach(). uvloop's transport closes the fd itself and then detaches the
    socket object (asyncio's and Tornado's call close()), so both must report. A caller that
    detaches the fd to keep using it has therefore already reported it closed."""

    __slots__ = ("_pf_report",)

    def _reported(self) -> None:
        report, self._pf_report = getattr(self, "_pf_report", None), None
        if report is not None:
            report()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._reported()

    def detach(self) -> int:
        try:
            return super().detach()
        finally:
            self._reported()


class Connections:
    """The runtime's connections for a server of your own (see the module docstring).

    `fileno()`: level-triggered, readable when take() may return something. `take()`: the
    connections that are ready now, as non-blocking ReportingSockets the caller owns, [] once
    draining. `open`: taken and not yet closed. Everything else (tick, draining,
    request_started/finished) is the runtime's own, at `rt`.
    """

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.open = 0

    def fileno(self) -> int:
        return self.rt.fileno()

    def take(self) -> List[ReportingSocket]:
        out = []
        for sock in self.rt.take():
            # Same fd; family, type and proto given (SOCK_NONBLOCK: it is), so no syscall.
            fam, typ, proto = sock.family, sock.type | socket.SOCK_NONBLOCK, sock.proto
            conn = ReportingSocket(fam, typ, proto, sock.detach())
            conn._pf_report = self._report
            self.open += 1
            out.append(conn)
        return out

    def _report(self) -> None:
        self.open -= 1
        self.rt.closed()


def run_asyncio(rt: Runtime, adopt: Callable[[socket.socket], object],
                on_drain: Optional[Callable[[], object]] = None, on_start: Optional[Callable[[], object]] = None,
                drain_poll: float = aio.DRAIN_POLL) -> None:
    """Runs an asyncio loop in this worker until it has drained and every connection is closed.

    `adopt(sock)` is called in the loop for each connection (a non-blocking ReportingSocket:
    the server's transport or stream closes it, which reports it). An exception from adopt
    closes that socket and is logged. `on_drain()` runs once when the worker starts draining
    (stop keep-alive, close idle connections); a coroutine it returns is awaited. `on_start()`
    runs (and is awaited) in the loop before the first connection, and before READY: a server
    object that needs the running loop is built there. Blocks."""
    async def main(wakeup_write_fd: int) -> None:
        conns = Connections(rt)
        pending = set()     # adopt() coroutines still running (a Task needs a reference)

        def failed(sock, exc) -> None:
            rt.log.error("worker %s: adopting a connection failed (%r); closed", rt.id, exc)
            sock.close()    # a no-op when a transport closed it already; reports once

        def on_socket(sock) -> None:
            try:
                result = adopt(sock)
            except Exception as e:
                failed(sock, e)
                return
            if inspect.isawaitable(result):     # e.g. loop.connect_accepted_socket(...)
                task = asyncio.ensure_future(result)
                pending.add(task)

                def done(t) -> None:
                    pending.discard(t)
                    if not t.cancelled() and t.exception() is not None:
                        failed(sock, t.exception())
                task.add_done_callback(done)

        if on_start is not None:
            result = on_start()
            if inspect.isawaitable(result):
                await result

        driver = aio.LoopDriver(rt, on_socket, wakeup_write_fd=wakeup_write_fd, take=conns.take)
        driver.start()
        try:
            await driver.drain_started.wait()
            if on_drain is not None:
                result = on_drain()
                if inspect.isawaitable(result):
                    await result
            while conns.open > 0:
                await asyncio.sleep(drain_poll)
        finally:
            driver.stop()

    aio.run(main, rt)
