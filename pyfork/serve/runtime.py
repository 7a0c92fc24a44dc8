"""The worker-runtime contract: what an interface (pyfork.serve.*) may ask of the runtime it serves with.

Theory of operation: `serve(app, rt)` gets one runtime object and talks to nothing else about
connections. The runtime owns where connections come from (the primary's channel, or the
worker's own accept() on a shared listener) and the bookkeeping the primary relies on (READY,
heartbeat, the scoreboard, back-pressure credits, drain). The interface owns the loop: it
watches `fileno()` and `wakeup_fd()`, calls `take()` when the first is readable and `tick()`
when the second is and at least every `tick_interval` seconds, reports every connection it
closes with `closed()` and every request with `request_started()`/`request_finished()`, and
returns from serve() once `draining` is true and the connections it took are finished (what
"finished" means per interface is in each module's docstring; the guarantees are DESIGN.md's).

`Runtime` below is that contract as a `typing.Protocol`: the interfaces annotate with it and
call its members directly, never probing for them. It is implemented by
pyfork.worker.runtime.Worker (in a forked worker), pyfork.worker.standalone.StandaloneRuntime
(one listening socket, no primary) and the test harnesses' fake runtimes; tests check that
each one has every member (tests/test_serve_runtime.py).

Everything is called from the interface's one thread (the worker's main thread).
"""
from __future__ import annotations

import logging
import socket
from typing import List, Optional, Protocol, runtime_checkable


@runtime_checkable
class Runtime(Protocol):
    """What `pyfork.serve.<interface>.serve(app, rt)` may use of `rt` (see the module docstring)."""

    id: int
    """This worker's id (its slot's worker number), for log lines."""

    log: logging.Logger
    """The logger interfaces report errors to (the app's exceptions, a failed adoption)."""

    draining: bool
    """True once the worker must stop taking connections; it never turns back. A runtime sets
    it inside take()/take_fds()/tick() (a drain message, a SIGTERM), or from a signal handler
    that also makes wakeup_fd() readable: an interface checks it after each of those calls
    and after each wake-up. From then on take()/take_fds() return [] (they may still deliver
    messages for the app), and the interface finishes the connections it has and returns
    from serve()."""

    tick_interval: float
    """Seconds; the interface calls tick() at least this often (a loop timer) even when
    nothing happens, because tick() carries the heartbeat the primary's --timeout watches."""

    tcp_nodelay: bool
    """True when every TCP socket from take()/take_fds() already has TCP_NODELAY set (the
    dispatcher sets it on accept), so the interface need not make a setsockopt call per
    connection; False when the interface must set it itself (a response written in two parts
    would otherwise wait for the client's delayed ACK, ~40 ms)."""

    parks: bool
    """True when park() can hand connections back (a primary dispatches them: every policy
    of pyfork serve); False when park() always returns 0, so the interface need not prepare
    for it (no timer per request)."""

    conn_family: Optional[int]
    """The address family (socket.AF_INET, AF_INET6, AF_UNIX) of every connection take() and
    take_fds() hand out, or None when it is not one family (listeners of mixed families). An
    interface uses take_fds() only when it is known: a bare fd carries no family."""

    def ready(self) -> None:
        """Tells the primary the worker can take connections (idempotent). Optional to call:
        the first fileno(), take() or tick() does it, since an interface asks for them only
        once its own setup (an ASGI lifespan startup) is done."""

    def fileno(self) -> int:
        """The fd to watch for readability: readable when take() may have connections (or
        messages for the app). Constant for the runtime's life; level-triggered; the runtime
        owns it (the interface never closes it) and stops it mattering after draining."""

    def wakeup_fd(self) -> int:
        """An fd that turns readable when the runtime has work between ticks (a signal arrived:
        the signal wakeup pipe). The interface calls tick() when it is readable; tick() empties
        it. A negative value means there is none (then ticks come from the timer only)."""

    def take(self) -> List[socket.socket]:
        """The connections that are ready now (possibly none), as connected, non-blocking
        stream sockets the interface now owns. Bounded per call, so call again when fileno()
        is still readable. Every socket handed out must be closed by the interface and then
        reported with closed(), exactly once. Returns [] once `draining`."""

    def take_fds(self) -> List[int]:
        """take(), with each connection as a bare fd: for an interface that builds its own
        connection objects (ASGI on uvloop), saving a socket object per connection.
        `conn_family` says what they are; the same closed() accounting applies."""

    def closed(self, n: int = 1) -> None:
        """Reports `n` connections from take()/take_fds() as closed (back-pressure: the
        primary sends a worker at most a bounded number of open connections)."""

    def park(self, fds: List[int]) -> int:
        """Hands idle kept-alive connections back to the primary, which watches them and sends
        each one's next request to a worker that can start it (csrc/park.c): what a worker stuck
        in a long request does so that its other connections do not wait for it. An fd given
        here must have no request bytes the interface has read and not answered (bytes still in
        the kernel travel with the fd, so pipelined requests keep their order). Returns k: the
        first k fds were handed over; the interface closes its sockets for them and does not
        report them with closed() (park() accounted for them); it keeps the rest. 0 when the
        runtime cannot park now (`parks` false, draining, the channel full). Safe to call from
        a signal handler in the main thread: it never blocks and never logs."""

    def parks_settled(self) -> bool:
        """For an interface that parks, once it is draining and has nothing open: True when
        no connection it parked can still come back to it; False when some did (take() them
        and serve them, then ask again). A PARK the primary reads after its final dispatch
        returns to the worker that sent it. Blocks at most a moment (the primary reading its
        channel); True at once for a runtime that never parked."""

    def queued(self) -> bool:
        """True when take() has a connection ready for us without polling (the primary put
        it in our channel), read from shared memory with no syscall: a sync interface that is
        free again takes it at once instead of going back to its selector. False when the
        runtime cannot tell (a shared listener): the interface polls as usual."""

    def request_started(self) -> None:
        """A request began on some connection (the scoreboard's busy count; `least` reads it).
        Runs once per request: implementations keep it to one call."""

    def request_finished(self) -> None:
        """The request that request_started() announced ended (response written or failed);
        counts towards --max-requests. Always paired with request_started()."""

    def tick(self) -> None:
        """Heartbeat and housekeeping: acts on signals (a SIGTERM starts the drain), checks the
        primary is alive, empties wakeup_fd(). Call it when wakeup_fd() is readable and at
        least every `tick_interval` seconds; check `draining` afterwards."""

    def tcp_cork(self, fd: int, on: bool) -> None:
        """Sets (on=True) or clears TCP_CORK on the connected TCP socket `fd` (a connection the
        interface took and has not closed). While corked the kernel holds partial segments, so
        a response's head, body and FIN can leave in one segment; clearing it sends what is
        held at once. Raises OSError (e.g. a non-TCP fd): the caller then serves uncorked."""

