"""PROXY protocol and forwarded headers end to end: `pyfork serve` in a subprocess (WSGI and
ASGI), a real TCP client that writes the header a load balancer would, and an app that
echoes the client address and scheme it was given.

A connection whose header is missing, malformed, truncated (then cut or silent past
--proxy-timeout) or that comes from a peer outside --proxy-allow-from must be closed without
a response, and the app must never see it (the app counts its requests)."""
import json
import socket
import subprocess
import sys

import pytest

from pyfork.serve.proxyproto import encode_v1, encode_v2
from net_harness import exchange, installed_backend
from supervisor_harness import Server

APP = r'''
import json

def _answer(addr, port, scheme):
    return json.dumps({"addr": addr, "port": port, "scheme": scheme}).encode()

def wsgi(environ, start_response):
    body = _answer(environ["REMOTE_ADDR"], int(environ.get("REMOTE_PORT") or 0), environ["wsgi.url_scheme"])
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]

async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    client = scope.get("client") or ("", 0)
    body = _answer(client[0], client[1], scope["scheme"])
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
'''

INTERFACES = ["wsgi", "asgi"]
GET = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
TIMEOUT = 20.0


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "edgeapp.py").write_text(APP)
    return tmp_path


def serve(app_dir, interface, *args):
    return Server(app_dir, installed_backend(), "--interface", interface, *args,
                  app=f"edgeapp:{interface}", workers=1).start()


def answer(raw):
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), raw
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = body.partition(b"\r\n")
        body = rest[:int(size, 16)]
    return json.loads(body)


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", INTERFACES)
def test_proxy_protocol_gives_the_app_the_real_client(app_dir, interface):
    with serve(app_dir, interface, "--proxy-protocol", "--proxy-timeout", "1") as srv:
        v1 = answer(exchange(srv.port, encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 80)) + GET))
        assert (v1["addr"], v1["port"], v1["scheme"]) == ("192.0.2.7", 51000, "http")
        v2 = answer(exchange(srv.port, encode_v2(("2001:db8::5", 40000), ("2001:db8::1", 80)) + GET))
        assert (v2["addr"], v2["port"]) == ("2001:db8::5", 40000)
        # Header and request in separate writes, the header itself split too.
        header = encode_v2(("198.51.100.1", 7), ("10.0.0.1", 80))
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as s:
            s.sendall(header[:5])
            s.sendall(header[5:])
            s.sendall(GET)
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        assert answer(raw)["addr"] == "198.51.100.1"
        # LOCAL (a balancer's health check): the connection's own address stands.
        local = answer(exchange(srv.port, encode_v2(None) + GET, source="127.0.0.4"))
        assert local["addr"] == "127.0.0.4"
        unknown = answer(exchange(srv.port, b"PROXY UNKNOWN\r\n" + GET, source="127.0.0.6"))
        assert unknown["addr"] == "127.0.0.6"


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", INTERFACES)
def test_bad_or_missing_proxy_header_never_reaches_the_app(app_dir, interface):
    with serve(app_dir, interface, "--proxy-protocol", "--proxy-timeout", "0.5") as srv:
        assert exchange(srv.port, GET) == b""                                   # no header
        assert exchange(srv.port, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n" + GET) == b""
        assert exchange(srv.port, encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2))[:20], then_close=True) == b""
        assert exchange(srv.port, b"PROXY TCP4 1.2.3.4", then_close=False) == b""   # silent: timeout
        assert exchange(srv.port, b"\x16\x03\x01\x00\x05hello") == b""           # TLS on a plain port
        # The server is fine and still checks every connection.
        assert answer(exchange(srv.port, encode_v1(("192.0.2.9", 9), ("10.0.0.1", 80)) + GET))["addr"] == "192.0.2.9"


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", INTERFACES)
def test_proxy_header_from_a_peer_not_allowed_is_refused(app_dir, interface):
    with serve(app_dir, interface, "--proxy-protocol", "--proxy-allow-from", "127.0.0.2/32") as srv:
        header = encode_v1(("192.0.2.7", 51000), ("10.0.0.1", 80))
        assert exchange(srv.port, header + GET, source="127.0.0.1") == b""
        assert answer(exchange(srv.port, header + GET, source="127.0.0.2"))["addr"] == "192.0.2.7"


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", INTERFACES)
def test_forwarded_headers_only_from_trusted_peers(app_dir, interface):
    xff = b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.8\r\n" \
          b"X-Forwarded-Proto: https\r\nConnection: close\r\n\r\n"
    fwd = b"GET / HTTP/1.1\r\nHost: x\r\nForwarded: for=\"[2001:db8::7]:4711\";proto=https\r\n" \
          b"Connection: close\r\n\r\n"
    with serve(app_dir, interface, "--forwarded-allow-ips", "127.0.0.1/32,127.0.0.3") as srv:
        got = answer(exchange(srv.port, xff, source="127.0.0.1"))
        assert (got["addr"], got["port"], got["scheme"]) == ("203.0.113.8", 0, "https")
        got = answer(exchange(srv.port, fwd, source="127.0.0.3"))
        assert (got["addr"], got["port"], got["scheme"]) == ("2001:db8::7", 4711, "https")
        got = answer(exchange(srv.port, xff, source="127.0.0.2"))          # not trusted
        assert (got["addr"], got["scheme"]) == ("127.0.0.2", "http")
    # With PROXY protocol, trust is judged on the client the header names.
    with serve(app_dir, interface, "--proxy-protocol", "--forwarded-allow-ips", "192.0.2.0/24") as srv:
        got = answer(exchange(srv.port, encode_v1(("192.0.2.1", 5), ("10.0.0.1", 80)) + xff))
        assert (got["addr"], got["scheme"]) == ("203.0.113.8", "https")
        got = answer(exchange(srv.port, encode_v1(("198.51.100.1", 5), ("10.0.0.1", 80)) + xff))
        assert (got["addr"], got["scheme"]) == ("198.51.100.1", "http")


@pytest.mark.parametrize("args,needle", [
    (["--proxy-allow-from", "10.0.0.0/33"], "--proxy-allow-from"),
    (["--proxy-allow-from", ""], "--proxy-allow-from"),
    (["--forwarded-allow-ips", "nope"], "--forwarded-allow-ips"),
    (["--proxy-timeout", "0"], "--proxy-timeout"),
])
def test_bad_edge_options_exit_2_before_any_fork(args, needle):
    proc = subprocess.run([sys.executable, "-m", "pyfork", "serve", "-b", "127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_edge_options_from_the_environment():
    import os
    env = dict(os.environ, PYFORK_PROXY_ALLOW_FROM="junk")
    proc = subprocess.run([sys.executable, "-m", "pyfork", "serve", "--print-config"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "proxy-allow-from" in proc.stderr
    env = dict(os.environ, PYFORK_PROXY_PROTOCOL="1", PYFORK_FORWARDED_ALLOW_IPS="10.0.0.0/8")
    proc = subprocess.run([sys.executable, "-m", "pyfork", "serve", "--print-config"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0
    assert "proxy_protocol = True" in proc.stdout and "forwarded_allow_ips = '10.0.0.0/8'" in proc.stdout


def test_cluster_keywords_are_validated():
    import pyfork
    from pyfork.config import ConfigError
    with pytest.raises(ConfigError):
        pyfork.Cluster("edgeapp:wsgi", proxy_allow_from="300.1.1.1")
    c = pyfork.Cluster("edgeapp:wsgi", proxy_protocol=True, forwarded_allow_ips="*")
    assert c.settings.proxy_protocol and c.settings.forwarded_allow_ips == "*"


def _get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("interface", INTERFACES)
def test_health_path_turns_503_during_the_drain_delay_while_serving(app_dir, interface):
    import signal
    from supervisor_harness import wait_until
    with serve(app_dir, interface, "--health-path", "/healthz", "--drain-delay", "30") as srv:
        status, body = _get(srv.port, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        assert _get(srv.port, "/")[0] == 200                        # the app's own paths
        srv.signal(signal.SIGTERM)
        wait_until(lambda: _get(srv.port, "/healthz")[0] == 503, timeout=TIMEOUT, what="503 on /healthz")
        assert json.loads(_get(srv.port, "/healthz")[1])["status"] == "draining"
        for _ in range(5):
            assert _get(srv.port, "/")[0] == 200                    # still serving during the delay
        assert srv.proc.poll() is None
        srv.signal(signal.SIGTERM)                                  # a second TERM: stop now
        assert srv.wait(timeout=60) == 0


@pytest.mark.parametrize("args", [["--health-path", "healthz"], ["--health-path", "/a b"],
                                  ["--drain-delay", "-1"]])
def test_bad_health_options_exit_2(args):
    proc = subprocess.run([sys.executable, "-m", "pyfork", "serve", "-b", "127.0.0.1:0", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
