"""Forwarded headers from trusted proxies: X-Forwarded-For, X-Forwarded-Proto and Forwarded
(RFC 7239). Sans-IO: header values in, a client address and scheme out.

Theory of operation. Any client can send these headers, so they mean something only when
the connection's peer (the address the application would see otherwise: the socket's, or the
PROXY header's) is in --forwarded-allow-ips; from any other peer they are left alone and
the address and scheme are the connection's. A proxy appends the address it received the
request from, so the list reads left (farthest) to right (nearest). The client is found by
walking it from the right, skipping addresses that are themselves trusted proxies: the first
untrusted one is the client (an untrusted hop could have written everything left of it); if
every hop is trusted, the leftmost. An entry that is not an IP address ("unknown", an
obfuscated "_node", garbage) ends the walk and the peer's address stands.

When a trusted peer sent `Forwarded`, it wins over the X-Forwarded-* pair. Its element that
names the client also gives the scheme (its proto=). With X-Forwarded-For, X-Forwarded-Proto's
entry at the same position is the scheme when both lists have the same length, else its last
entry. Only http and https are taken (ws/wss follow). The port of a client taken from these
headers is 0 unless Forwarded gives one (`for="[2001:db8::1]:4711"`).
"""
from __future__ import annotations

import ipaddress
from typing import List, Optional, Tuple

__all__ = ["resolve", "wrap_wsgi", "wrap_asgi"]

_SCHEMES = {"http": "http", "https": "https"}


def _ip(text: str) -> Optional[str]:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _split_list(value: str) -> List[str]:
    """A comma-separated header value, commas inside quoted strings kept."""
    out, cur, quoted, escape = [], [], False, False
    for ch in value:
        if escape:
            cur.append(ch)
            escape = False
        elif quoted and ch == "\\":
            escape = True
        elif ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return out


def _forwarded_elements(value: str) -> List[Tuple[Optional[str], Optional[int], Optional[str]]]:
    """Forwarded: a list of (for-host or None, for-port or None, proto or None), one per element."""
    elements = []
    for element in _split_list(value):
        host = port = proto = None
        for pair in element.split(";"):
            name, sep, val = pair.partition("=")
            if not sep:
                continue
            name, val = name.strip().lower(), val.strip()
            if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
                val = val[1:-1].replace('\\"', '"')
            if name == "for":
                host, port = _node(val)
            elif name == "proto":
                proto = val.lower()
        elements.append((host, port, proto))
    return elements


def _node(val: str) -> Tuple[Optional[str], Optional[int]]:
    """RFC 7239 node: 1.2.3.4, 1.2.3.4:80, [v6], [v6]:80; anything else -> (None, None)."""
    port = None
    if val.startswith("["):
        end = val.find("]")
        if end < 0:
            return None, None
        host, rest = val[1:end], val[end + 1:]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
        elif rest:
            return None, None
        ip = _ip(host)
        return (ip, port) if ip and ":" in ip else (None, None)
    host, sep, p = val.partition(":")
    if sep:
        if not (p.isdigit() and p.isascii()):
            return None, None
        port = int(p)
    ip = _ip(host)
    return (ip, port) if ip and ":" not in ip else (None, None)


def _pick(hosts: List[Optional[str]], trusted) -> int:
    """The index of the client in a list of hops (see the module docstring), or -1."""
    for i in range(len(hosts) - 1, -1, -1):
        host = hosts[i]
        if host is None:
            return -1
        if host not in trusted:
            return i
    return 0 if hosts else -1


def resolve(peer: str, trusted, forwarded: Optional[str], xff: Optional[str], xfp: Optional[str]):
    """(client host or None, client port or None, scheme or None) from a request's headers;
    all None when `peer` is not trusted. None means: keep the connection's value."""
    if peer not in trusted:
        return None, None, None
    if forwarded:
        elements = _forwarded_elements(forwarded)
        i = _pick([e[0] for e in elements], trusted)
        if i < 0:
            return None, None, None
        host, port, proto = elements[i]
        return host, (port if port is not None else 0), _SCHEMES.get(proto)
    host = port = scheme = None
    if xff:
        hops = [_ip(h) for h in _split_list(xff)]
        i = _pick(hops, trusted)
        if i >= 0:
            host, port = hops[i], 0
    if xfp:
        protos = [p.lower() for p in _split_list(xfp)]
        if xff and host is not None and len(protos) == len(_split_list(xff)):
            scheme = _SCHEMES.get(protos[i])
        else:
            scheme = _SCHEMES.get(protos[-1])
    return host, port, scheme


def wrap_wsgi(app, trusted):
    """`app` behind a WSGI layer that applies trusted forwarded headers to the environ
    (`app` itself when nothing is trusted)."""
    if not trusted:
        return app
    def pyfork_forwarded(environ, start_response):
        forwarded = environ.get("HTTP_FORWARDED")
        xff = environ.get("HTTP_X_FORWARDED_FOR")
        xfp = environ.get("HTTP_X_FORWARDED_PROTO")
        if forwarded or xff or xfp:
            host, port, scheme = resolve(environ.get("REMOTE_ADDR", ""), trusted, forwarded, xff, xfp)
            if host is not None:
                environ["REMOTE_ADDR"] = host
                environ["REMOTE_PORT"] = str(port)
            if scheme is not None:
                environ["wsgi.url_scheme"] = scheme
        return app(environ, start_response)
    return pyfork_forwarded


def wrap_asgi(app, trusted):
    """`app` behind an ASGI layer that applies trusted forwarded headers to the scope
    (`app` itself when nothing is trusted)."""
    if not trusted:
        return app
    async def pyfork_forwarded(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            forwarded = xff = xfp = None
            for name, value in scope["headers"]:
                if name == b"forwarded":
                    forwarded = value.decode("latin-1") if forwarded is None else \
                        forwarded + "," + value.decode("latin-1")
                elif name == b"x-forwarded-for":
                    xff = value.decode("latin-1") if xff is None else xff + "," + value.decode("latin-1")
                elif name == b"x-forwarded-proto":
                    xfp = value.decode("latin-1") if xfp is None else xfp + "," + value.decode("latin-1")
            if forwarded or xff or xfp:
                client = scope.get("client")
                host, port, scheme = resolve(client[0] if client else "", trusted, forwarded, xff, xfp)
                if host is not None or scheme is not None:
                    scope = dict(scope)
                    if host is not None:
                        scope["client"] = (host, port)
                    if scheme is not None:
                        if scope["type"] == "websocket":
                            scheme = "wss" if scheme == "https" else "ws"
                        scope["scheme"] = scheme
        return await app(scope, receive, send)
    return pyfork_forwarded
