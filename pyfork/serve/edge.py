"""What a worker needs to sit behind a load balancer: PROXY protocol and forwarded-header trust.

Theory of operation. The options (--proxy-protocol, --proxy-allow-from, --proxy-timeout,
--forwarded-allow-ips) are checked by pyfork/config.py before any fork; the primary then calls
`configure()` once, and every worker, forked from it, reads the same `EdgeConfig` with
`for_worker()` (the access log does the same, pyfork.serve.accesslog). With --certfile it
also carries the TLS files (`tls`, a pyfork.serve.tls.TLSConfig) each worker builds its context from. The interfaces use it
through two small hooks: the PROXY header is read before the first request byte
(`ProxyState`, fed by the interface's own read loop), and forwarded headers are applied per
request (pyfork.serve.forwarded).

`Networks` is a set of CIDRs ("127.0.0.0/8,::1", "*" for any). A Unix-socket peer has no
address; it is a process on this host, so it counts as trusted exactly when loopback is
(the default).
"""
from __future__ import annotations

import ipaddress
import mmap
import socket
import time
from typing import Optional, Tuple

from pyfork.config import LOOPBACK

from . import proxyproto
PROXY_TIMEOUT = 5.0      # seconds for the PROXY header; a balancer sends it with the connection


class Networks:
    """A set of IP networks to test addresses against; `*` matches everything. Built with
    allow_empty=True, "" is the empty set (--forwarded-allow-ips '': trust no one)."""

    __slots__ = ("text", "any", "nets", "unix")

    def __init__(self, text: str, allow_empty: bool = False):
        self.text = text
        parts = [p for p in text.replace(" ", ",").split(",") if p]
        if not parts and not allow_empty:
            raise ValueError(f"{text!r}: expected CIDRs such as 127.0.0.0/8,::1 or *")
        self.any = "*" in parts
        nets = []
        for p in parts:
            if p == "*":
                continue
            try:
                nets.append(ipaddress.ip_network(p, strict=False))
            except ValueError:
                raise ValueError(f"{p!r} is not an IP address or CIDR (expected e.g. 10.0.0.0/8)") from None
        self.nets = tuple(nets)
        self.unix = self.any or any(n.is_loopback for n in nets)

    def __contains__(self, host) -> bool:
        if self.any:
            return True
        if not host:                                  # a Unix-socket peer
            return self.unix
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0] if isinstance(host, str) else host)
        except ValueError:
            return False
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        for net in self.nets:
            if addr.version == net.version and addr in net:
                return True
        return False

    def __bool__(self) -> bool:
        """False for the empty set (nothing is trusted)."""
        return self.any or bool(self.nets)

    def __repr__(self):
        return f"Networks({self.text!r})"


class EdgeConfig:
    """The edge options of this server, as the workers use them."""

    __slots__ = ("proxy_protocol", "proxy_allow_from", "proxy_timeout", "forwarded_allow_ips",
                 "health_path", "stopping", "tls")

    def __init__(self, proxy_protocol=False, proxy_allow_from=LOOPBACK, proxy_timeout=PROXY_TIMEOUT,
                 forwarded_allow_ips=LOOPBACK, health_path=None, tls=None):
        self.proxy_protocol = bool(proxy_protocol)
        self.proxy_allow_from = _networks(proxy_allow_from)
        self.proxy_timeout = float(proxy_timeout)
        self.forwarded_allow_ips = _networks(forwarded_allow_ips, allow_empty=True)
        self.health_path = health_path or None
        self.stopping = StopFlag()
        self.tls = tls                   # a pyfork.serve.tls.TLSConfig, or None (plain TCP)

    @classmethod
    def from_settings(cls, s) -> "EdgeConfig":
        return cls(getattr(s, "proxy_protocol", False), getattr(s, "proxy_allow_from", LOOPBACK),
                   getattr(s, "proxy_timeout", PROXY_TIMEOUT), getattr(s, "forwarded_allow_ips", LOOPBACK),
                   getattr(s, "health_path", None), _tls_config(s))


def _tls_config(s):
    """--certfile & co. as the workers need them (None: TLS is off)."""
    if getattr(s, "certfile", None) is None:
        return None
    from .tls import TLSConfig
    return TLSConfig(s.certfile, s.keyfile, s.ca_certs, s.ssl_ciphers, s.cert_reqs)


def _networks(value, allow_empty=False) -> Networks:
    return value if isinstance(value, Networks) else Networks(value, allow_empty)


class StopFlag:
    """One byte of anonymous shared memory, made before the first fork: the primary sets it
    when a stop begins (--drain-delay), every worker reads it (the --health-path answer)."""

    __slots__ = ("mem",)

    def __init__(self):
        self.mem = mmap.mmap(-1, 1)          # MAP_SHARED|MAP_ANONYMOUS: children see writes

    def set(self) -> None:
        self.mem[0] = 1

    def is_set(self) -> bool:
        return self.mem[0] == 1


_config = EdgeConfig()


def configure(cfg: EdgeConfig) -> None:
    """Called by the primary before forking (and by tests): what for_worker() returns."""
    global _config
    _config = cfg


def for_worker() -> EdgeConfig:
    return _config


class ProxyState:
    """The PROXY header of one connection, as its bytes arrive.

    `feed(data)` returns None while the header is incomplete, or the bytes that follow it (the
    first request's, possibly b""); raises proxyproto.ProxyHeaderError for anything that is not
    a header, and for a peer outside --proxy-allow-from (its first read ends it). `client` and
    `server` are then the addresses the application must see (None: the connection's own)."""

    __slots__ = ("buf", "client", "server")

    def __init__(self):
        self.buf = b""
        self.client: Optional[Tuple[str, int]] = None
        self.server: Optional[Tuple[str, int]] = None

    def feed(self, data: bytes) -> Optional[bytes]:
        buf = self.buf + data if self.buf else data
        header = proxyproto.parse(buf)
        if header is None:
            self.buf = buf
            return None
        self.buf = b""
        self.client, self.server = header.client, header.server
        return buf[header.length:]


def peer_allowed(cfg: EdgeConfig, peer_host) -> bool:
    """May this peer (the balancer) send a PROXY header? `peer_host` is "" for a Unix socket."""
    return peer_host in cfg.proxy_allow_from


def read_header_blocking(sock, timeout: float) -> proxyproto.ProxyHeader:
    """The PROXY header at the start of a blocking socket (the raw interface), taking exactly
    its bytes: what arrived is peeked at, and only what parse() says belongs to the header is
    read, so the handler reads the request from its first byte. Raises ProxyHeaderError (not
    a header, or EOF inside it) or OSError (socket.timeout after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no complete PROXY header in {timeout:g} s")
            sock.settimeout(left)
            peek = sock.recv(proxyproto.V2_HEADER + 0xFFFF, socket.MSG_PEEK)
            if not peek:
                raise proxyproto.ProxyHeaderError("the connection ended inside the PROXY header")
            header = proxyproto.parse(buf + peek)
            if header is None:            # all of it is header: take it, wait for the rest
                buf += _recv_exactly(sock, len(peek))
                continue
            _recv_exactly(sock, header.length - len(buf))
            return header
    finally:
        sock.settimeout(None)


def _recv_exactly(sock, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise proxyproto.ProxyHeaderError("the connection ended inside the PROXY header")
        out += chunk
    return out
