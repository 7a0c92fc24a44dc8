"""Raw interface: `handler(sock, addr)` is called once per connection, inline.

Theory of operation. A selectors loop in the worker's main thread watches rt.fileno() and
rt.wakeup_fd(). Each socket from rt.take() is switched to blocking mode and handed to the
handler, which owns the conversation; when it returns (or raises, which is logged) the
server closes the socket and reports it with rt.closed(). One connection at a time, like a
gunicorn sync worker: a handler that never returns stalls the worker's heartbeat, and the
arbiter's --timeout replaces it.

Draining: the loop stops taking connections; sockets already taken are still handled (the
kernel accepted them before the stop), then serve() returns.

With --certfile (pyfork.serve.tls) the handler gets a blocking TLS socket: the handshake runs
first, in `_handle`, bounded by tls.HANDSHAKE_TIMEOUT; a failed one closes the connection and
the handler is not called.

With --proxy-protocol (pyfork.serve.edge) the PROXY header is read first, exactly (the handler
reads the request from its first byte), from a peer in --proxy-allow-from and within
--proxy-timeout; `addr` is then the client it names. A bad, missing or late header closes
the connection and the handler is not called.

Raw is never auto-detected from a signature (any 2-argument callable looks like WSGI);
choose it with --interface raw, or mark the handler with `handler.pyfork_interface = "raw"`.
"""

import selectors
import time

from . import edge, tls
from .proxyproto import ProxyHeaderError
from .runtime import Runtime

NAME = "raw"
# One connection at a time (see the module docstring): the dispatcher sends one only when idle.
CAPACITY = 1


def detect(app):
    """True only for a handler explicitly marked `pyfork_interface = "raw"`."""
    return getattr(app, "pyfork_interface", None) == "raw"


def serve(app, rt: Runtime):
    """Call `app(sock, addr)` for every connection until rt.draining."""
    sel = selectors.DefaultSelector()
    listen_fd = rt.fileno()
    sel.register(listen_fd, selectors.EVENT_READ, "take")
    sel.register(rt.wakeup_fd(), selectors.EVENT_READ, "wakeup")
    edge_config = edge.for_worker()
    tls_context = tls.server_context(edge_config.tls)     # None: plain TCP
    proxy = edge_config if edge_config.proxy_protocol else None
    tick_every = min(rt.tick_interval, 1.0) / 2
    next_tick = time.monotonic() + tick_every
    listening = True
    try:
        while True:
            if rt.draining:
                if listening:
                    sel.unregister(listen_fd)   # stop watching: a readable listener would spin
                    listening = False
                return
            for key, _ in sel.select(max(0.0, next_tick - time.monotonic())):
                if key.data == "wakeup":
                    rt.tick()
                elif not rt.draining:
                    for sock in rt.take():
                        _handle(app, rt, sock, tls_context, proxy)
                        if time.monotonic() >= next_tick:   # a burst must not starve ticks
                            rt.tick()
                            next_tick = time.monotonic() + tick_every
            if time.monotonic() >= next_tick:
                rt.tick()
                next_tick = time.monotonic() + tick_every
    finally:
        sel.close()


def _handle(app, rt: Runtime, sock, tls_context=None, proxy=None):
    rt.request_started()
    try:
        sock.setblocking(True)
        client = None
        if proxy is not None:
            client = _read_proxy_header(rt, sock, proxy)
            if client is False:
                return
        if tls_context is not None:
            try:
                sock = tls.handshake_blocking(tls_context, sock)
            except OSError as exc:          # ssl.SSLError, a timeout: that connection only
                rt.log.debug("TLS handshake failed: %s", exc)
                return
        addr = client
        if addr is None:
            try:
                addr = sock.getpeername()
            except OSError:
                addr = None
        app(sock, addr)
    except Exception:
        rt.log.exception("error in raw handler")
    finally:
        try:
            sock.close()
        finally:
            rt.request_finished()
            rt.closed()


def _read_proxy_header(rt: Runtime, sock, cfg):
    """--proxy-protocol: the client the header names (None: the connection's own), or False
    when the connection must be closed unanswered."""
    try:
        peer = sock.getpeername()
    except OSError:
        return False
    host = peer[0] if isinstance(peer, tuple) else ""
    if not edge.peer_allowed(cfg, host):
        rt.log.warning("closing a connection from %s: not in --proxy-allow-from", host or "a unix socket")
        return False
    try:
        return edge.read_header_blocking(sock, cfg.proxy_timeout).client
    except (ProxyHeaderError, OSError) as exc:
        rt.log.info("closing a connection from %s: %s", host or "-", exc)
        return False
