"""What pyfork changes in uvicorn's HTTP protocol class for the ASGI interface
(pyfork/serve/asgi.py builds the class once per worker).

Theory of operation: these changes keep uvicorn's protocol and only cut per-connection
and per-request cost. `connection_made(base)` sets up a connection the way uvicorn's does,
minus a socket object and two syscalls, and with its two idle queues made small
(`lean_queues`: ~1.4 kB less per open connection); `head_with_body(base)` writes a
response's head together with its first body part, one write instead of two;
`corked(base, tcp_cork)` serves a response that ends with a close on a corked socket. Each
says why, and what it refuses to hold back, in its docstring.
Only uvicorn's public modules and the protocol's documented attributes are used; the
supported uvicorn range is pinned in pyproject.toml and both ends are tested
(.ci/uvicorn-versions).
"""
from __future__ import annotations

from collections import deque

# What uvicorn's connection_made reads (its code object's names), the same for
# HttpToolsProtocol and H11Protocol from uvicorn 0.30 to 0.55 at least. Ours stands in
# for it only while it reads exactly these: a uvicorn whose connection_made does more
# keeps its own (correct, just without the saving).
_UVICORN_CONNECTION_MADE_NAMES = frozenset({
    "connections", "add", "transport", "FlowControl", "flow", "get_local_addr", "server",
    "get_remote_addr", "client", "is_ssl", "scheme", "logger", "level", "TRACE_LOG_LEVEL", "log",
})


def connection_made(base):
    """A `connection_made` for uvicorn's protocol class `base` that skips the socket
    object, or None when `base`'s is not the one it was written against (see above).

    Why: uvicorn's reads the local and remote address through
    `transport.get_extra_info("socket")`, which on uvloop builds a pseudo socket plus a
    socket object per call, then asks the kernel with getsockname() and getpeername(),
    answers the transport already has: uvloop and asyncio both save "sockname" and
    "peername" when the connection is adopted. Ours does the same steps as uvicorn's
    (register the connection, keep the transport and its FlowControl, set `server`,
    `client` and `scheme`) with the saved addresses; anything but a (host, port, ...)
    tuple, i.e. a Unix socket, goes to uvicorn's public helpers as before. `scheme` is
    "http": the connections pyfork hands over are plain TCP. With uvicorn's trace logging
    on, uvicorn's own runs (it logs the connection). Measured on uvloop with uvicorn 0.55,
    in a loop over one transport: ~1.25 µs against uvicorn's ~1.4 µs per connection."""
    uvicorn_made = base.connection_made
    if frozenset(uvicorn_made.__code__.co_names) != _UVICORN_CONNECTION_MADE_NAMES:
        return None
    from uvicorn.logging import TRACE_LOG_LEVEL
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.utils import get_local_addr, get_remote_addr

    def connection_made(self, transport):
        if self.logger.level <= TRACE_LOG_LEVEL:
            uvicorn_made(self, transport)
            return
        self.connections.add(self)
        self.transport = transport
        self.flow = FlowControl(transport)
        info = transport.get_extra_info("sockname")
        self.server = ((str(info[0]), int(info[1])) if type(info) is tuple and len(info) >= 2
                       else get_local_addr(transport))
        info = transport.get_extra_info("peername")
        self.client = ((str(info[0]), int(info[1])) if type(info) is tuple and len(info) >= 2
                       else get_remote_addr(transport))
        self.scheme = "http"
        lean_queues(self)

    connection_made.__qualname__ = f"{base.__qualname__}.connection_made"
    return connection_made


class _Pipeline:
    """uvicorn's queue of pipelined requests (`protocol.pipeline`), first in first out as
    uvicorn uses its deque (appendleft() in, pop() out, tested for emptiness; iterated by
    pyfork's drain), O(1) each:
    a client can pipeline thousands of requests in one read. 104 bytes empty."""
    __slots__ = ("_items", "_head")

    def __init__(self):
        self._items = []
        self._head = 0          # _items[_head] is the oldest

    def appendleft(self, item):
        self._items.append(item)

    def pop(self):
        items, head = self._items, self._head
        if head >= len(items):
            raise IndexError("pop from an empty pipeline")
        item = items[head]
        items[head] = None
        if head + 1 == len(items):
            items.clear()
            self._head = 0
        else:
            self._head = head + 1
        return item

    def __len__(self):
        return len(self._items) - self._head

    def __iter__(self):
        """Newest first, as a deque filled with appendleft() iterates (pyfork.serve.asgi
        walks the queue at a drain)."""
        return reversed(self._items[self._head:])


def lean_queues(protocol) -> None:
    """Swaps the two empty deques every connection of uvicorn's protocol holds for small
    queues (a list, a _Pipeline).

    Why: an empty deque is 760 bytes, an empty list 56 (a _Pipeline 104), and a kept-alive
    connection holds two that are almost never used: its `pipeline` (httptools) and the
    waiters of its FlowControl's writable Event (asyncio appends, removes and iterates them,
    no more, in Python 3.9 to 3.13). Measured at 10,000 open connections: 8.7 -> 7.3 kB of
    RSS per connection, uvicorn 8.7 (README.md "Many connections"). Each is swapped only
    while it is an empty deque, so a uvicorn or Python that changes them keeps its own."""
    pipeline = getattr(protocol, "pipeline", None)
    if type(pipeline) is deque and not pipeline:
        protocol.pipeline = _Pipeline()
    event = getattr(protocol.flow, "_is_writable_event", None)
    waiters = getattr(event, "_waiters", None)
    if type(waiters) is deque and not waiters:
        event._waiters = []


def head_with_body(base):
    """`base` (HttpToolsProtocol or a subclass) whose kept-alive responses leave with their
    head and first body part in one write.

    Why: uvicorn writes a response's head (at `http.response.start`) and its body (at
    `http.response.body`) with two transport writes, so a kept-alive hello world costs two
    `send` calls, two TCP segments and two wake-ups of the client. Each such request's
    cycle gets a `_HeadWithBody` as its transport: it holds the head, and the body part that
    follows goes out with it in one write. Measured (wrk -c32, keep-alive, 2 workers,
    bench/README.md "One write per response"): ~1.2-1.3 x the requests per second, on
    asyncio's loop and on uvloop. Only for a request that keeps the connection alive: a
    response that ends with a close is corked (below), so it leaves as one segment anyway,
    and there the holder only cost time (asyncio's loop, wrk `Connection: close`: 0.96 x).
    What it refuses to hold back: the head waits at most for the end of the current loop
    iteration (a response whose body comes later, a stream, gets its head at once, by a
    call_soon), a close or a 400 uvicorn writes itself sends it first, and a request that
    expects `100 Continue` keeps uvicorn's transport (its interim response goes out as it
    is written)."""
    base_headers_complete = base.on_headers_complete
    base_send_400 = base.send_400_response

    class HeadWithBodyProtocol(base):
        def on_headers_complete(self):
            before = self.cycle
            base_headers_complete(self)
            cycle = self.cycle
            if cycle is not before and cycle.keep_alive and not self.expect_100_continue:
                cycle.transport = _HeadWithBody(self.transport, self.loop)

        def send_400_response(self, msg):
            # A malformed request behind this one: its 400 goes to the transport itself,
            # so the head a running cycle holds goes first, as it would have under uvicorn.
            holder = getattr(self.cycle, "transport", None)
            if type(holder) is _HeadWithBody:
                holder.flush()
            base_send_400(self, msg)

    HeadWithBodyProtocol.__name__ = HeadWithBodyProtocol.__qualname__ = base.__name__
    return HeadWithBodyProtocol


# A first body part longer than this is written after the head, not joined to it: joining
# copies it, and a large part fills segments of its own anyway.
_JOIN_MAX = 16384


class _HeadWithBody:
    """One response's transport, as uvicorn's request cycle uses it (`write`, `close`,
    `is_closing`; anything else is the transport's): the first write (the head) is held
    until the second (the first body part), and both go out as one write; later writes
    pass through. A head still held at the end of the loop iteration goes out alone
    (`flush`), and `close()` sends a held head before it closes (a HEAD request's response
    writes no body). It holds no reference to the cycle, so a response that never writes
    (its client left first) leaves no reference cycle for the garbage collector."""

    __slots__ = ("_transport", "_loop", "_head", "is_closing")

    def __init__(self, transport, loop):
        self._transport = transport
        self._loop = loop
        self._head = None          # bytes while held; b"" once written
        self.is_closing = transport.is_closing

    def write(self, data) -> None:
        head = self._head
        if head is None:                    # the head: hold it
            self._head = data
            self._loop.call_soon(self.flush)
        elif head:                          # the first body part: with the head
            self._head = b""
            if len(data) <= _JOIN_MAX:
                self._transport.write(head + data)
            else:
                self._transport.write(head)
                self._transport.write(data)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        head = self._head
        if head:
            self._head = b""
            if not self._transport.is_closing():
                self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._transport, name)


def corked(base, tcp_cork):
    """`base` (HttpToolsProtocol's subclass) for connections that arrive corked.

    Why: with `Connection: close` uvicorn writes the head, then the body, then closes:
    three segments (head, body, FIN), each a send, a trip through the network stack
    and a wake-up of the client. A socket that is corked (TCP_CORK, csrc/tcp.c) when
    that happens sends one segment with all of it, FIN included: measured here, ~15 %
    less worker CPU per request (bench/README.md). The cork is kept only while it can
    hold nothing back that a client waits for; once the request head is parsed:
      * a request that keeps the connection alive (the response is not followed by a
        close), an `Expect: 100-continue` (the client waits for the interim
        response), or an upgrade: uncorked at once, for the connection's life;
      * otherwise kept; a streaming response (a body part with more_body) uncorks
        before its first part goes out.
    The kernel also sends corked data by itself after 200 ms. The fd is only touched
    while the transport is open (it is closed by the transport, synchronously).
    """
    base_headers_complete = base.on_headers_complete

    class CorkedHTTPProtocol(base):
        _pf_cork_fd = -1     # the fd while corked

        def on_headers_complete(self):
            before = self.cycle
            base_headers_complete(self)
            fd = self._pf_cork_fd
            if fd < 0:
                return
            cycle = self.cycle
            if cycle is not before and not cycle.keep_alive and not self.expect_100_continue:
                cycle.send = _uncork_when_streaming(cycle.send, self, tcp_cork)
                return
            self._pf_cork_fd = -1
            if not self.transport.is_closing():
                tcp_cork(fd, False)

    CorkedHTTPProtocol.__name__ = CorkedHTTPProtocol.__qualname__ = "Corked" + base.__name__
    return CorkedHTTPProtocol


def _uncork_when_streaming(send, protocol, tcp_cork):
    """uvicorn's `send` of one response on a corked connection: uncorks before the
    first body part that has more to follow (a plain function: no extra coroutine).
    It is stored on the cycle as `cycle.send`, and it refers to the cycle: that
    reference cycle is undone at the last body part, so the connection's objects are
    freed by reference counting, as under uvicorn, not by the cyclic GC."""
    def corked_send(message):
        if message["type"] == "http.response.body":
            if not message.get("more_body"):
                vars(send.__self__).pop("send", None)
            elif protocol._pf_cork_fd >= 0:
                fd, protocol._pf_cork_fd = protocol._pf_cork_fd, -1
                if not protocol.transport.is_closing():
                    tcp_cork(fd, False)
        return send(message)

    return corked_send
