"""PROXY protocol v1/v2 parsing (pyfork.serve.proxyproto) and forwarded-header trust
(pyfork.serve.forwarded, pyfork.serve.edge.Networks): sans-IO, no sockets.

The parser is fed every prefix of valid headers (a truncated header must ask for more, never
fail or succeed early), a table of malformed ones, and a few thousand seeded random mutations
(it may only return None, a header, or raise ProxyHeaderError)."""
import random
import struct

import pytest

from pyfork.serve import forwarded, proxyproto
from pyfork.serve.edge import Networks, ProxyState
from pyfork.serve.proxyproto import ProxyHeaderError, encode_v1, encode_v2, parse

REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

VALID = [
    (encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 80)), ("192.0.2.7", 51000)),
    (encode_v1(("2001:db8::1", 1), ("2001:db8::2", 443)), ("2001:db8::1", 1)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (encode_v2(("198.51.100.9", 40000), ("10.0.0.1", 8000)), ("198.51.100.9", 40000)),
    (encode_v2(("2001:db8::9", 65535), ("2001:db8::1", 8000)), ("2001:db8::9", 65535)),
    (encode_v2(("203.0.113.5", 1234), ("10.0.0.1", 80), tlvs=b"\x04\x00\x03abc"), ("203.0.113.5", 1234)),
    (encode_v2(None), None),                                      # LOCAL: a health check
    (encode_v2(None, tlvs=b"\x01\x00\x02h2"), None),
]


@pytest.mark.parametrize("header,client", VALID)
def test_valid_headers_parse_and_leave_the_request(header, client):
    got = parse(header + REQUEST)
    assert got is not None
    assert got.client == client
    assert got.length == len(header)
    assert (header + REQUEST)[got.length:] == REQUEST


@pytest.mark.parametrize("header,client", VALID)
def test_every_truncation_asks_for_more(header, client):
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, (cut, header[:cut])


@pytest.mark.parametrize("header,client", VALID)
def test_state_reassembles_byte_by_byte(header, client):
    state = ProxyState()
    data = header + REQUEST
    for i in range(len(data)):
        rest = state.feed(data[i:i + 1])
        if rest is not None:
            assert i == len(header) - 1
            assert rest == b""
            assert state.client == client
            return
    raise AssertionError("header never completed")


BAD = [
    b"GET / HTTP/1.1\r\n\r\n",                                  # plain HTTP on a PROXY port
    b"\x16\x03\x01\x02\x00\x01",                                # a TLS ClientHello
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                        # bare LF
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n",                   # bare CR
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",                     # two spaces
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",                          # v6 address in TCP4
    b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",                     # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY " + b"A" * 120,                                     # longer than 107 bytes, no CRLF
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 \xff 2\r\n",
    proxyproto.V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\x00" * 12,          # version 1 in a v2 header
    proxyproto.V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,          # command 2
    proxyproto.V2_SIGNATURE + b"\x21\x41\x00\x0c" + b"\x00" * 12,          # family 4
    proxyproto.V2_SIGNATURE + b"\x21\x13\x00\x0c" + b"\x00" * 12,          # transport 3
    proxyproto.V2_SIGNATURE + b"\x21\x11\x00\x08" + b"\x00" * 8,           # INET block too short
    proxyproto.V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,          # INET6 block too short
    proxyproto.V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,          # DGRAM on a stream
    b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\x00" * 12,         # bad signature
]


@pytest.mark.parametrize("data", BAD)
def test_malformed_headers_are_refused(data):
    with pytest.raises(ProxyHeaderError):
        parse(data)


def test_junk_is_refused_at_its_first_wrong_byte():
    # A client speaking HTTP directly is refused on its first byte, not after a timeout.
    with pytest.raises(ProxyHeaderError):
        parse(b"G")
    with pytest.raises(ProxyHeaderError):
        parse(b"PROXI")
    with pytest.raises(ProxyHeaderError):
        parse(b"\r\n\r\n\x01")


def test_random_mutations_only_ever_parse_ask_or_refuse():
    rng = random.Random(1414)
    seeds = [h for h, _ in VALID]
    for _ in range(4000):
        data = bytearray(rng.choice(seeds) + REQUEST)
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data))
            if op == 0:
                data[pos] = rng.randrange(256)
            elif op == 1:
                del data[pos]
            elif op == 2:
                data.insert(pos, rng.randrange(256))
            else:
                del data[pos:]
            if not data:
                data = bytearray(b"P")
        try:
            got = parse(bytes(data))
        except ProxyHeaderError:
            continue
        if got is not None:
            assert 0 < got.length <= len(data)
            if got.client is not None:
                assert 0 <= got.client[1] <= 65535
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        try:
            parse(data)
        except ProxyHeaderError:
            pass


def test_v2_length_covers_the_tlvs():
    header = encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=b"\x05\x00\x10" + b"u" * 16)
    assert parse(header[:-1]) is None
    assert parse(header).length == len(header)
    (length,) = struct.unpack_from("!H", header, 14)
    assert length == 12 + 19


# ---- trust ----------------------------------------------------------------------------------
def test_networks():
    n = Networks("127.0.0.0/8,::1")
    assert "127.0.0.5" in n and "::1" in n and "::ffff:127.0.0.1" in n
    assert "10.0.0.1" not in n and "junk" not in n
    assert "" in n                          # a Unix-socket peer counts as loopback
    assert "" not in Networks("10.0.0.0/8")
    assert "8.8.8.8" in Networks("*")
    assert not Networks("", allow_empty=True)
    with pytest.raises(ValueError):
        Networks("10.0.0.0/33")
    with pytest.raises(ValueError):
        Networks("")


LOOP = Networks("127.0.0.0/8,::1")


def test_forwarded_headers_from_an_untrusted_peer_are_ignored():
    assert forwarded.resolve("10.9.9.9", LOOP, None, "1.2.3.4", "https") == (None, None, None)
    assert forwarded.resolve("10.9.9.9", LOOP, "for=1.2.3.4;proto=https", None, None) == (None, None, None)


def test_x_forwarded_for_walks_from_the_right_past_trusted_proxies():
    # client spoofs 6.6.6.6; the real client 1.2.3.4 reached proxy 127.0.0.9, then our peer.
    host, port, scheme = forwarded.resolve("127.0.0.1", LOOP, None, "6.6.6.6, 1.2.3.4, 127.0.0.9", None)
    assert (host, port, scheme) == ("1.2.3.4", 0, None)
    assert forwarded.resolve("127.0.0.1", LOOP, None, "127.0.0.3, 127.0.0.2", "https")[:1] == ("127.0.0.3",)
    assert forwarded.resolve("127.0.0.1", LOOP, None, "unknown, 1.2.3.4", "http")[0] == "1.2.3.4"
    assert forwarded.resolve("127.0.0.1", LOOP, None, "1.2.3.4, unknown", None) == (None, None, None)
    assert forwarded.resolve("127.0.0.1", LOOP, None, None, "https") == (None, None, "https")
    assert forwarded.resolve("127.0.0.1", LOOP, None, None, "gopher")[2] is None
    assert forwarded.resolve("127.0.0.1", LOOP, None, "1.2.3.4, 5.6.7.8", "https, http")[2] == "http"


def test_rfc7239_forwarded():
    h = 'for=6.6.6.6, for="[2001:db8:cafe::17]:4711";proto=https;by=127.0.0.1'
    assert forwarded.resolve("127.0.0.1", LOOP, h, "9.9.9.9", "http") == ("2001:db8:cafe::17", 4711, "https")
    assert forwarded.resolve("::1", LOOP, "For=192.0.2.60;Proto=HTTP", None, None) == ("192.0.2.60", 0, "http")
    assert forwarded.resolve("127.0.0.1", LOOP, "for=_hidden", None, None) == (None, None, None)
    assert forwarded.resolve("127.0.0.1", LOOP, 'for="[::1"', None, None) == (None, None, None)
