"""The PROXY header on an asyncio (or uvloop) transport, before the real protocol sees a byte.

Theory of operation. With --proxy-protocol the interface adopts each connection with a
`ProxyHeaderProtocol` wrapped around the protocol that will serve it (uvicorn's for ASGI).
The wrapper owns the transport first: it refuses a peer outside --proxy-allow-from, arms a
--proxy-timeout timer, and feeds what arrives to edge.ProxyState. A malformed header, an EOF
or the timer closes the transport: the inner protocol never starts, so the application never
sees the connection, and `on_abandoned(inner)` lets the interface account for it (the
runtime's closed()). Once the header is complete the wrapper steps aside:
`transport.set_protocol(inner)`, `inner.connection_made(transport)`, the client address from
the header replaces the one `connection_made` found (`inner.client`, what uvicorn's protocol
puts in the scope), and the bytes after the header go to `inner.data_received`.
"""
from __future__ import annotations

import asyncio
import logging

from . import edge
from .proxyproto import ProxyHeaderError

log = logging.getLogger("pyfork.serve")


class ProxyHeaderProtocol(asyncio.Protocol):
    """Reads the PROXY header, then hands the transport to `inner` (see the module docstring)."""

    def __init__(self, inner, cfg: edge.EdgeConfig, loop, on_abandoned):
        self.inner = inner
        self.cfg = cfg
        self.loop = loop
        self.on_abandoned = on_abandoned
        self.state = edge.ProxyState()
        self.transport = None
        self.timer = None
        self.handed_over = False

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else ""
        if not edge.peer_allowed(self.cfg, host):
            log.warning("closing a connection from %s: not in --proxy-allow-from", host or "a unix socket")
            transport.close()
            return
        self.timer = self.loop.call_later(self.cfg.proxy_timeout, self._expired)

    def _expired(self):
        self.timer = None
        if not self.handed_over and self.transport is not None:
            log.info("closing a connection: no complete PROXY header in %.3g s", self.cfg.proxy_timeout)
            self.transport.close()

    def data_received(self, data):
        if self.handed_over:            # only if a loop delivers once more after set_protocol
            self.inner.data_received(data)
            return
        if self.transport.is_closing():
            return
        try:
            rest = self.state.feed(data)
        except ProxyHeaderError as exc:
            log.info("closing a connection: %s", exc)
            self._cancel_timer()
            self.transport.close()
            return
        if rest is None:
            return
        self._cancel_timer()
        self.handed_over = True
        inner, transport, client = self.inner, self.transport, self.state.client
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if client is not None:
            inner.client = client
        if rest:
            inner.data_received(rest)

    def eof_received(self):
        if self.handed_over:
            return self.inner.eof_received()
        return False                     # a header cut short: close

    def connection_lost(self, exc):
        self._cancel_timer()
        if self.handed_over:
            self.inner.connection_lost(exc)
        else:
            self.on_abandoned(self.inner)

    def _cancel_timer(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
