"""PROXY protocol on the raw and asyncio interfaces, end to end: `pyfork serve --interface
raw|asyncio --proxy-protocol` in a subprocess, a TCP client that writes the header a load
balancer would.

The handler must get the client the header names (raw: `addr`; asyncio:
`writer.get_extra_info("peername")`) and read the request from its first byte (the header taken exactly, however it was split); a missing, malformed, truncated
or late header, or a peer outside --proxy-allow-from, closes the connection and the handler
never runs (it counts its calls)."""
import json

import pytest

from pyfork.serve.proxyproto import encode_v1, encode_v2
from net_harness import exchange, installed_backend
from supervisor_harness import Server

APP = r'''
import json
CALLS = [0]

def handler(sock, addr):
    CALLS[0] += 1
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
    body = json.dumps({"addr": list(addr) if addr else None, "first": buf[:4].decode("latin-1"),
                       "calls": CALLS[0]}).encode()
    sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
handler.pyfork_interface = "raw"

async def aio(reader, writer):
    CALLS[0] += 1
    buf = await reader.readuntil(b"\r\n\r\n")
    addr = writer.get_extra_info("peername")
    body = json.dumps({"addr": list(addr[:2]) if addr else None, "first": buf[:4].decode("latin-1"),
                       "calls": CALLS[0]}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
'''
APPS = {"raw": "rawapp:handler", "asyncio": "rawapp:aio"}
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
TIMEOUT = 20.0


def answer(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    return json.loads(body)


def serve(tmp_path, interface, *args):
    (tmp_path / "rawapp.py").write_text(APP)
    return Server(tmp_path, installed_backend(), "--proxy-protocol", "--interface", interface,
                  *args, app=APPS[interface], workers=1).start()


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", APPS)
def test_handler_gets_the_client_of_the_proxy_header(tmp_path, interface):
    with serve(tmp_path, interface, "--proxy-timeout", "0.5") as srv:
        got = answer(exchange(srv.port, encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 80)) + GET))
        assert got["addr"] == ["192.0.2.7", 51000] and got["first"] == "GET "
        header = encode_v2(("2001:db8::5", 40000), ("2001:db8::1", 80))
        got = answer(exchange(srv.port, header[:5], header[5:20], header[20:] + GET[:2], GET[2:]))
        assert got["addr"] == ["2001:db8::5", 40000] and got["first"] == "GET "
        # LOCAL (a balancer's health check): the connection's own address.
        got = answer(exchange(srv.port, encode_v2(None) + GET, source="127.0.0.4"))
        assert got["addr"][0] == "127.0.0.4"
        calls = got["calls"]
        # Refused before the handler: no header, a bad one, one cut short, one never finished.
        assert exchange(srv.port, GET) == b""
        assert exchange(srv.port, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n" + GET) == b""
        assert exchange(srv.port, encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))[:20], then_close=True) == b""
        assert exchange(srv.port, b"PROXY TCP4 1.2.3.4") == b""                    # silent: timeout
        got = answer(exchange(srv.port, encode_v1(("192.0.2.9", 9), ("10.0.0.1", 80)) + GET))
        assert got["addr"] == ["192.0.2.9", 9] and got["calls"] == calls + 1


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", APPS)
def test_proxy_header_from_a_peer_not_allowed_is_refused(tmp_path, interface):
    with serve(tmp_path, interface, "--proxy-allow-from", "127.0.0.2/32") as srv:
        header = encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 80))
        assert exchange(srv.port, header + GET, source="127.0.0.1") == b""
        got = answer(exchange(srv.port, header + GET, source="127.0.0.2"))
        assert got["addr"] == ["192.0.2.7", 51000] and got["calls"] == 1
