"""The PROXY protocol, versions 1 and 2: the header a load balancer sends before a connection's
first byte to say who the client is. Sans-IO: bytes in, a result out; no sockets.

Theory of operation. HAProxy's specification (doc/proxy-protocol.txt in its source) defines two
encodings. Version 1 is one text line, at most 107 bytes with its CRLF:
`PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n` (TCP6 likewise; `PROXY UNKNOWN ...\\r\\n` means
"use the connection's own addresses"). Version 2 is binary: a 12-byte signature, a
version/command byte (0x20 LOCAL, 0x21 PROXY), a family/transport byte, a 16-bit big-endian
length, then the addresses and optional TLVs, which we skip. LOCAL is what a balancer sends on
its own connections (HAProxy's health checks): the connection's own addresses stand.

`parse(buf)` is called with everything received so far. It returns None while `buf` is still a
valid prefix of a header (read more), a `ProxyHeader` once one is complete (its `length` says
how many bytes it took; the rest is the first request's bytes), and raises ProxyHeaderError as
soon as `buf` can no longer become a header: anything that is not a header is refused at its
first wrong byte, so a client that speaks HTTP directly to a PROXY port is closed at once and
never reaches the application. The caller bounds the wait with a read timeout (a truncated
header never completes).
"""
from __future__ import annotations

import ipaddress
import struct
from typing import Optional, Tuple

__all__ = ["ProxyHeader", "ProxyHeaderError", "parse", "V1_MAX", "V2_SIGNATURE"]

V1_PREFIX = b"PROXY "
V1_MAX = 107                 # the spec's worst case: "PROXY TCP6 " + 2 x 39 + 2 x 5 + spaces + CRLF
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16               # signature, version/command, family/transport, length
# Address block sizes per v2 family (high nibble): INET 4+4+2+2, INET6 16+16+2+2, UNIX 108+108.
_V2_ADDR_LEN = {0x1: 12, 0x2: 36, 0x3: 216}


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header (the message says what is wrong)."""


class ProxyHeader:
    """A parsed header. `client` and `server` are (host, port) or None when the header says to
    use the connection's own addresses (v1 UNKNOWN, v2 LOCAL or an unspecified family)."""

    __slots__ = ("version", "client", "server", "length")

    def __init__(self, version: int, client: Optional[Tuple[str, int]],
                 server: Optional[Tuple[str, int]], length: int):
        self.version = version
        self.client = client
        self.server = server
        self.length = length

    def __repr__(self):
        return f"ProxyHeader(v{self.version}, client={self.client}, server={self.server}, length={self.length})"


def parse(buf: bytes) -> Optional[ProxyHeader]:
    """A header from the start of `buf`, None when more bytes are needed, or ProxyHeaderError."""
    n = len(buf)
    if n == 0:
        return None
    if buf[0] == 0x50:           # 'P'
        return _parse_v1(buf)
    if buf[0] == 0x0D:
        return _parse_v2(buf)
    raise ProxyHeaderError("the connection did not start with a PROXY protocol header")


# ---- version 1 ------------------------------------------------------------------------------
def _parse_v1(buf: bytes) -> Optional[ProxyHeader]:
    head = buf[:len(V1_PREFIX)]
    if not V1_PREFIX.startswith(head):
        raise ProxyHeaderError("the connection did not start with a PROXY protocol header")
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 line longer than {V1_MAX} bytes")
        bad = buf.find(b"\n")
        if bad >= 0 or b"\r" in buf[:-1]:
            raise ProxyHeaderError("PROXY v1 line has a bare CR or LF")
        return None
    line = buf[:end]
    if b"\n" in line or b"\r" in line:
        raise ProxyHeaderError("PROXY v1 line has a bare CR or LF")
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    parts = text.split(" ")
    length = end + 2
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1, None, None, length)     # the rest of the line is to be ignored
    if len(parts) != 6:
        raise ProxyHeaderError("PROXY v1 line must be: PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    _, proto, src, dst, sport, dport = parts
    if proto == "TCP4":
        version = 4
    elif proto == "TCP6":
        version = 6
    else:
        raise ProxyHeaderError(f"PROXY v1 protocol {proto!r}: expected TCP4, TCP6 or UNKNOWN")
    return ProxyHeader(1, (_v1_addr(src, version), _v1_port(sport)),
                       (_v1_addr(dst, version), _v1_port(dport)), length)


def _v1_addr(text: str, version: int) -> str:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not an IP address") from None
    if addr.version != version:
        raise ProxyHeaderError(f"PROXY v1 address {text!r} is not IPv{version}")
    return str(addr)


def _v1_port(text: str) -> int:
    # The spec: a decimal 0..65535 without leading zeros.
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not a number in 0..65535")
    port = int(text)
    if port > 65535:
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not a number in 0..65535")
    return port


# ---- version 2 ------------------------------------------------------------------------------
def _parse_v2(buf: bytes) -> Optional[ProxyHeader]:
    n = len(buf)
    if not V2_SIGNATURE.startswith(buf[:len(V2_SIGNATURE)]):
        raise ProxyHeaderError("the connection did not start with a PROXY protocol header")
    if n < V2_HEADER:
        if n > 12 and buf[12] & 0xF0 != 0x20:
            raise ProxyHeaderError("PROXY v2 header with a version other than 2")
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
    if ver_cmd & 0xF0 != 0x20:
        raise ProxyHeaderError("PROXY v2 header with a version other than 2")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise ProxyHeaderError(f"PROXY v2 family/transport byte 0x{fam:02x} is not defined")
    need = _V2_ADDR_LEN.get(family, 0)
    if length < need:
        raise ProxyHeaderError(f"PROXY v2 length {length} is shorter than its address block ({need})")
    total = V2_HEADER + length
    if n < total:
        return None
    if command == 0 or family == 0:
        # LOCAL (the balancer's own connection, e.g. a health check) or UNSPEC: the
        # connection's own addresses stand; the block is skipped.
        return ProxyHeader(2, None, None, total)
    if transport != 1:
        raise ProxyHeaderError("PROXY v2 header for a datagram or unspecified transport on a stream")
    if family == 1:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", buf, V2_HEADER)
        return ProxyHeader(2, (str(ipaddress.IPv4Address(src)), sport),
                           (str(ipaddress.IPv4Address(dst)), dport), total)
    if family == 2:
        src, dst, sport, dport = struct.unpack_from("!16s16sHH", buf, V2_HEADER)
        return ProxyHeader(2, (str(ipaddress.IPv6Address(src)), sport),
                           (str(ipaddress.IPv6Address(dst)), dport), total)
    # AF_UNIX: a path has no port; the application sees the connection's own addresses.
    return ProxyHeader(2, None, None, total)


# ---- encoding (for tests and tools) ------------------------------------------------------
def encode_v1(client: Tuple[str, int], server: Tuple[str, int]) -> bytes:
    """A v1 header for a TCP connection from `client` to `server`."""
    proto = "TCP6" if ipaddress.ip_address(client[0]).version == 6 else "TCP4"
    return f"PROXY {proto} {client[0]} {server[0]} {client[1]} {server[1]}\r\n".encode("ascii")


def encode_v2(client: Optional[Tuple[str, int]], server: Optional[Tuple[str, int]] = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY for `client` -> `server`, or LOCAL when `client` is None."""
    if client is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    a, b = ipaddress.ip_address(client[0]), ipaddress.ip_address(server[0])
    fam = 0x11 if a.version == 4 else 0x21
    block = a.packed + b.packed + struct.pack("!HH", client[1], server[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(block)) + block
