"""The asyncio interface: `async def handler(reader, writer)` per connection.

Theory of operation: one event loop per worker (uvloop when importable, unless
PYFORK_UVLOOP=0). `LoopDriver` ties the worker runtime to that loop and is shared
with the ASGI interface:

  * `rt.fileno()` is watched with `loop.add_reader`; when it is readable every socket
    from `rt.take()` is handed to the interface, which adopts it with
    `loop.connect_accepted_socket` (the loop then owns the fd);
  * `rt.wakeup_fd()` is watched too, and `rt.tick()` runs on it and every
    `rt.tick_interval` (1 s) from a loop timer;
  * once `rt.draining` turns true (after a take, a tick or a wakeup) the driver stops
    watching `rt.fileno()` and tells the interface, which finishes what it has and
    returns.

Here each adopted socket gets a `StreamReader`/`StreamWriter` pair and a task running
the handler, exactly as `asyncio.start_server` would call it. When the handler
returns the writer is closed (start_server would leave that to the handler and leak
the socket until GC); when the transport is gone `rt.closed()` is called, once.
With --proxy-protocol each connection is adopted through aio_proxy.ProxyHeaderProtocol, which
reads the PROXY header (or closes the connection: the handler never runs); the handler's
`writer.get_extra_info("peername")` is then the client it names.
With --certfile the loop runs each connection's TLS handshake first (pyfork.serve.tls); the
handler's streams then carry plaintext. Drain: stop taking, wait for every handler task and connection to end (as Node's
`server.close()`: open connections are not cut; the supervisor's graceful timeout
bounds a handler that never ends), then return.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading

from . import aio_proxy, edge, tls
from .detect import is_asyncio_handler
from .runtime import Runtime

NAME = "asyncio"
# Connections a worker is sent at once (queued plus running): an event loop starts each
# at once, so this only bounds the burst one worker takes; 100 keeps a burst spread over
# the workers.
CAPACITY = 100

DRAIN_POLL = 0.05  # s; how often a draining worker checks whether it is done (only while draining)


# --------------------------------------------------------------------------- detection

detect = is_asyncio_handler     # pyfork.serve.detect: guessing imports only the winner


# --------------------------------------------------------------------------- loop plumbing

def loop_factory():
    """uvloop's loop when importable and not disabled by PYFORK_UVLOOP=0, else asyncio's."""
    if os.environ.get("PYFORK_UVLOOP", "1") != "0":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def run(main_factory, rt: Runtime) -> None:
    """Runs `main_factory()` (a coroutine) to completion on a fresh loop in this thread.

    The runtime's signal wakeup fd is read here, before the loop starts, because
    uvloop replaces it with its own self-pipe while running (loop.pyx
    `_setup_or_resume_signals`) and swallows the bytes: `rt.wakeup_fd()` would then
    never become readable and a SIGTERM would only be noticed at the next tick.
    `LoopDriver.start()` puts it back from inside the running loop; uvloop restores
    the same fd when it stops.
    """
    wakeup_write_fd = -1
    if threading.current_thread() is threading.main_thread():
        wakeup_write_fd = signal.set_wakeup_fd(-1)
        if wakeup_write_fd != -1:
            signal.set_wakeup_fd(wakeup_write_fd, warn_on_full_buffer=False)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(main_factory(wakeup_write_fd))


class LoopDriver:
    """Connects a worker runtime to the running loop (see the module docstring).

    `on_socket(sock)` adopts each taken socket (each fd, when `take` is `rt.take_fds`);
    `on_tick()` runs after every tick;
    `on_drain()` runs once, synchronously, in the very callback that saw `rt.draining`
    (so no request can slip in between); `drain_started` is an asyncio.Event set then.
    """

    def __init__(self, rt: Runtime, on_socket, on_tick=None, on_drain=None, wakeup_write_fd: int = -1,
                 take=None):
        self.rt = rt
        self.loop = asyncio.get_running_loop()
        self.on_socket = on_socket
        self._take = take if take is not None else rt.take   # or rt.take_fds: on_socket(fd)
        self.on_tick = on_tick
        self.on_drain = on_drain
        self.draining = False
        self.drain_started = asyncio.Event()
        self._fileno = rt.fileno()
        self._wakeup = rt.wakeup_fd()
        self._wakeup_write_fd = wakeup_write_fd
        self._interval = float(rt.tick_interval)
        self._timer = None

    def start(self) -> None:
        if self._wakeup_write_fd != -1 and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._wakeup_write_fd, warn_on_full_buffer=False)
        if self._wakeup >= 0:
            self.loop.add_reader(self._wakeup, self._on_wakeup)
        self._timer = self.loop.call_later(self._interval, self._on_timer)
        if self.rt.draining:
            self.begin_drain()
        else:
            self.loop.add_reader(self._fileno, self._on_ready)
            self._on_ready()  # connections may already be waiting: the fd is level-triggered anyway

    def stop(self) -> None:
        if not self.draining:
            self.loop.remove_reader(self._fileno)
        if self._wakeup >= 0:
            self.loop.remove_reader(self._wakeup)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def begin_drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        # Stop watching: after draining take() returns [] forever, and rt.fileno() may cover
        # the listening sockets (shared, reuseport, an rr pull), which could stay readable and spin.
        self.loop.remove_reader(self._fileno)
        if self.on_drain is not None:
            self.on_drain()
        self.drain_started.set()

    def _on_ready(self) -> None:
        rt = self.rt
        try:
            socks = self._take()
        except Exception:
            # A runtime that cannot take connections any more would make this fd spin:
            # stop taking, finish what is open, and let the supervisor replace us.
            rt.log.exception("worker %s: rt.take() failed; draining", rt.id)
            self.begin_drain()
            return
        for sock in socks:
            try:
                self.on_socket(sock)
            except Exception:
                # Never leak the rest of the batch: close and account for this one.
                rt.log.exception("worker %s: could not adopt a connection", rt.id)
                _discard(sock)
                rt.closed()
        if rt.draining:
            self.begin_drain()

    def _tick(self) -> None:
        self.rt.tick()
        if self.on_tick is not None:
            self.on_tick()
        if self.draining:
            # rt.fileno() is no longer watched, but the channel may still carry
            # messages for the app: take() delivers them (and returns nothing now).
            self._on_ready()
        elif self.rt.draining:
            self.begin_drain()

    def _on_wakeup(self) -> None:
        self._tick()

    def _on_timer(self) -> None:
        self._timer = self.loop.call_later(self._interval, self._on_timer)
        self._tick()


class AcceptedFd:
    """A connected stream fd, as uvloop's connect_accepted_socket reads a socket:
    `family`, `type`, `fileno()`, and `close()` once the transport has closed it.

    For fds from `rt.take_fds()`, on uvloop only (asyncio's transport needs a real
    socket): it saves building a socket object per connection and detaching it when
    the transport closes. The transport owns the fd from then on; libuv closes it and
    uvloop then calls `close()`, which must only forget the number (closing it again
    could hit an fd another thread just opened). `discard()` is for a connection no
    transport took: it closes the fd unless that happened.
    """

    __slots__ = ("_fd", "family")
    type = socket.SOCK_STREAM

    def __init__(self, fd: int, family: int):
        self._fd = fd
        self.family = family

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._fd = -1

    def discard(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _discard(conn) -> None:
    """Closes a connection no transport took: a socket, an AcceptedFd or a bare fd."""
    if isinstance(conn, int):
        os.close(conn)
    else:
        getattr(conn, "discard", conn.close)()


def is_uvloop(loop) -> bool:
    return type(loop).__module__.startswith("uvloop")


def needs_nodelay(rt: Runtime) -> bool:
    """True unless the runtime says its sockets have TCP_NODELAY already (`rt.tcp_nodelay`:
    pyfork's Worker, whose dispatcher sets it, and StandaloneRuntime)."""
    return not rt.tcp_nodelay


def adopt_socket(loop, tasks: set, sock: socket.socket, protocol, on_failure, nodelay: bool = True,
                 ssl_context=None) -> None:
    """Hands `sock` to `protocol` on the loop; `on_failure(protocol)` if the loop refuses it
    (or, with `ssl_context` (--certfile), the TLS handshake the loop runs first fails).

    connect_accepted_socket is a coroutine (it waits for connection_made); `Connect`
    runs it at once, without a Task. `tasks` holds it until it is done (drain waits
    for that set to empty).
    """
    # Without TCP_NODELAY a response written in two parts (uvicorn: head, then body)
    # waits for the client's delayed ACK, ~40 ms per keep-alive request. pyfork's
    # runtime hands sockets over with it set (the dispatcher does it on accept; the
    # contract's `tcp_nodelay`, pyfork/serve/runtime.py), so `nodelay` is False then; a runtime that does not promise it gets it here.
    # asyncio's transport would not do it: its _set_nodelay skips sockets whose proto
    # is 0, which is what accept() returns. It fails (harmlessly) on Unix sockets. No
    # `sock.family` test first: that property builds an IntEnum, dearer than the syscall.
    if nodelay:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    if ssl_context is not None:
        connect = loop.connect_accepted_socket(lambda: protocol, sock, ssl=ssl_context,
                                               ssl_handshake_timeout=tls.HANDSHAKE_TIMEOUT)
    else:
        connect = loop.connect_accepted_socket(lambda: protocol, sock)
    Connect(loop, connect, sock, protocol, on_failure, tasks)


class Connect:
    """`Connect(loop, loop.connect_accepted_socket(lambda: protocol, sock), sock,
    protocol, on_failure, pending)`: one connect_accepted_socket() coroutine, driven the way a Task would drive it,
    minus the Task: it runs at once, in the callback that took the socket, up to its
    wait for connection_made (the transport is open and reading by then), and is
    resumed by a done-callback on the future it waits for. A Task per connection
    would cost an object, a context copy and a loop iteration before the transport
    even opens. Exceptions are the loop refusing the socket: close it, `on_failure(protocol)`.
    """

    __slots__ = ("coro", "loop", "on_failure", "pending", "protocol", "sock")

    def __init__(self, loop, coro, sock, protocol, on_failure, pending: set):
        self.loop = loop
        self.coro = coro
        self.sock = sock
        self.protocol = protocol
        self.on_failure = on_failure
        self.pending = pending
        pending.add(self)
        self.step()

    def step(self, _future=None) -> None:
        try:
            waited = self.coro.send(None)
        except StopIteration:
            self.pending.discard(self)
            return
        except Exception:
            self.pending.discard(self)
            _discard(self.sock)  # no-op when the transport already took (and closed/detached) the fd
            self.on_failure(self.protocol)
            return
        except BaseException:
            self.pending.discard(self)
            raise
        add_done_callback = getattr(waited, "add_done_callback", None)
        if add_done_callback is not None:
            add_done_callback(self.step)   # a future (asyncio's or uvloop's)
        else:                              # a bare yield: go on at the next iteration
            self.loop.call_soon(self.step)


# --------------------------------------------------------------------------- the interface

class _StreamProtocol(asyncio.StreamReaderProtocol):
    """start_server's protocol, plus exactly one rt.closed() when the transport goes."""

    client = None     # with --proxy-protocol: the client the header named (set by aio_proxy)

    def __init__(self, reader, server):
        super().__init__(reader, self._connected)
        self._pf_server = server
        self._pf_reported = False

    def _connected(self, reader, writer):
        return self._pf_server._run_handler(reader, writer, self)

    def connection_lost(self, exc):
        try:
            super().connection_lost(exc)
        finally:
            self._pf_server.report_closed(self)


class _ProxiedWriter(asyncio.StreamWriter):
    """The handler's writer when a PROXY header named the client: the same transport and
    protocol, but get_extra_info("peername") is that client, not the balancer."""

    def __init__(self, writer, protocol, reader, loop):
        super().__init__(writer.transport, protocol, reader, loop)
        self._pf_client = protocol.client
        # Held, not dropped: since Python 3.13 a StreamWriter that is garbage collected
        # closes its transport, which is also ours.
        self._pf_original = writer

    def get_extra_info(self, name, default=None):
        if name == "peername":
            return self._pf_client
        return super().get_extra_info(name, default)


class _StreamServer:
    def __init__(self, handler, rt: Runtime, loop):
        self.handler = handler
        self.rt = rt
        self.loop = loop
        self.live: set = set()            # protocols whose socket is not yet reported closed
        self.handler_tasks: set = set()
        self.connect_tasks: set = set()
        self.nodelay = needs_nodelay(rt)
        self.edge = edge.for_worker()
        self.tls_context = tls.server_context(self.edge.tls)     # None: plain TCP

    def adopt(self, sock: socket.socket) -> None:
        reader = asyncio.StreamReader(limit=2 ** 16, loop=self.loop)  # start_server's default limit
        protocol = _StreamProtocol(reader, self)
        self.live.add(protocol)
        if self.edge.proxy_protocol:
            wrapper = aio_proxy.ProxyHeaderProtocol(protocol, self.edge, self.loop, self.report_closed)
            adopt_socket(self.loop, self.connect_tasks, sock, wrapper, lambda _wrapper: self.report_closed(protocol),
                         self.nodelay)
            return
        adopt_socket(self.loop, self.connect_tasks, sock, protocol, self.report_closed, self.nodelay,
                     self.tls_context)

    def report_closed(self, protocol) -> None:
        if protocol._pf_reported:
            return
        protocol._pf_reported = True
        self.live.discard(protocol)
        self.rt.closed()

    def _run_handler(self, reader, writer, protocol):
        task = self.loop.create_task(self._handler_task(reader, writer, protocol))
        self.handler_tasks.add(task)
        task.add_done_callback(self.handler_tasks.discard)
        return None  # not a coroutine: StreamReaderProtocol must not make a second task

    async def _handler_task(self, reader, writer, protocol) -> None:
        # The task starts after connection_made has returned, so a PROXY header's client is
        # known by now (aio_proxy sets it right after; these loops run no eager tasks).
        if protocol.client is not None:
            writer = _ProxiedWriter(writer, protocol, reader, self.loop)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.rt.log.debug("asyncio handler: client went away: %r", exc)
        except Exception:
            self.rt.log.exception("asyncio handler %r raised", self.handler)
        finally:
            if not writer.is_closing():
                writer.close()

    def idle(self) -> bool:
        return not self.live and not self.handler_tasks and not self.connect_tasks


def serve(app, rt: Runtime) -> None:
    """Serves `async def app(reader, writer)` until the worker drains and every handler ended."""
    async def main(wakeup_write_fd: int) -> None:
        loop = asyncio.get_running_loop()
        server = _StreamServer(app, rt, loop)
        driver = LoopDriver(rt, server.adopt, wakeup_write_fd=wakeup_write_fd)
        driver.start()
        try:
            await driver.drain_started.wait()
            while not server.idle():
                await asyncio.sleep(DRAIN_POLL)
        finally:
            driver.stop()

    run(main, rt)
