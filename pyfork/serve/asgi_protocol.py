"""What pyfork changes in uvicorn's HTTP protocol class for the ASGI interface
(pyfork/serve/asgi.py builds the class once per worker).

Theory of operation: both changes keep uvicorn's own code and only cut per-connection
cost. `connection_made(base)` runs uvicorn's connection_made with cheaper address
helpers; `corked(base, tcp_cork)` serves a response that ends with a close on a
corked socket. Each says why, and what it refuses to hold back, in its docstring.
"""
from __future__ import annotations

import types


def connection_made(base):
    """uvicorn's own `base.connection_made`, with the three helpers it calls resolved
    to cheaper ones that give the same answers here. Its get_local_addr and
    get_remote_addr ask `get_extra_info("socket")`, which on uvloop builds a pseudo
    socket plus a socket object per call, for a getsockname() and a getpeername() the
    transport already made; ours read the results the transport saved (uvloop and
    asyncio both keep "sockname"/"peername") and leave anything but an (host, port,
    ...) tuple, i.e. a Unix socket, to uvicorn's helper. `is_ssl` is False: pyfork
    serves plain HTTP. Same code, same attributes set; None when the method does not
    call these helpers (then the base's own is used)."""
    func = base.connection_made
    helpers = dict(func.__globals__)
    uv_local, uv_remote = helpers.get("get_local_addr"), helpers.get("get_remote_addr")
    if uv_local is None or uv_remote is None or "is_ssl" not in helpers:
        return None

    def get_local_addr(transport):
        info = transport.get_extra_info("sockname")
        return (str(info[0]), int(info[1])) if type(info) is tuple and len(info) >= 2 else uv_local(transport)

    def get_remote_addr(transport):
        info = transport.get_extra_info("peername")
        return (str(info[0]), int(info[1])) if type(info) is tuple and len(info) >= 2 else uv_remote(transport)

    def is_ssl(transport):
        return False

    helpers.update(get_local_addr=get_local_addr, get_remote_addr=get_remote_addr, is_ssl=is_ssl)
    made = types.FunctionType(func.__code__, helpers, func.__name__, func.__defaults__, func.__closure__)
    made.__qualname__, made.__doc__ = func.__qualname__, func.__doc__
    return made


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
