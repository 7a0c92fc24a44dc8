"""TLS in the worker, end to end: `pyfork serve --certfile ...` in a subprocess (WSGI, ASGI on
uvloop, ASGI on asyncio's loop) and real clients that verify the server's certificate
(http.client/ssl with the test's CA, and curl when installed).

The certificates are made here, per test session, with the `openssl` command: a throwaway CA,
a server certificate for localhost/127.0.0.1 and a client certificate, all signed by it.
What must hold: the app sees https; a plain-HTTP client, a silent client and a failed
handshake close only their own connection while TLS clients are served (with one WSGI
worker too: the handshake never blocks its loop); --cert-reqs required refuses a client
without a certificate and serves one with; a rolling restart (HUP) loads a renewed
certificate; bad options exit 2 with one line before any fork; no fd is left open, in this
process or in the worker.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest

from net_harness import installed_backend
from supervisor_harness import Server, wait_until

APP = r'''
import json
import time

def wsgi(environ, start_response):
    if environ["PATH_INFO"] == "/slow":
        time.sleep(0.3)       # far past the WSGI worker's park threshold (2 ms)
    body = json.dumps({"scheme": environ["wsgi.url_scheme"], "path": environ["PATH_INFO"]}).encode()
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
    body = json.dumps({"scheme": scope["scheme"], "path": scope["path"]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

def _reply(scheme):
    body = json.dumps({"scheme": scheme, "path": "/"}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body

def raw(sock, addr):
    import ssl
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
    sock.sendall(_reply("https" if isinstance(sock, ssl.SSLSocket) else "http"))
raw.pyfork_interface = "raw"

async def aio(reader, writer):
    await reader.readuntil(b"\r\n\r\n")
    writer.write(_reply("https" if writer.get_extra_info("sslcontext") is not None else "http"))
    await writer.drain()
'''

# (interface option, app, extra environment)
INTERFACES = {
    "wsgi": ("wsgi", "tlsapp:wsgi", {}),
    "asgi": ("asgi", "tlsapp:asgi", {}),
    "asgi-asyncio": ("asgi", "tlsapp:asgi", {"PYFORK_UVLOOP": "0"}),
}
OTHER_INTERFACES = {"raw": ("raw", "tlsapp:raw", {}), "asyncio": ("asyncio", "tlsapp:aio", {})}
TIMEOUT = 20.0


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d, name, ca, ext, cn="localhost"):
    """A key and a certificate `name`.pem signed by `ca` (a CA made by _make_ca)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def _make_ca(d, name):
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=pyfork test {name}",
             # What a strict verifier (Python >= 3.13's default VERIFY_X509_STRICT) wants of a CA.
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-addext", "subjectKeyIdentifier=hash", cwd=d)


# keyUsage and the key identifiers: a strict verifier (Python >= 3.13) requires them.
_LEAF_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
             "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n")
SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n" + _LEAF_EXT
CLIENT_EXT = "extendedKeyUsage=clientAuth\n" + _LEAF_EXT


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _issue(d, "server", "ca", SERVER_EXT)
    _issue(d, "server2", "ca", SERVER_EXT)             # the "renewed" certificate
    _issue(d, "client", "ca", CLIENT_EXT, cn="a client")
    _make_ca(d, "rogue")                               # a CA the server does not trust
    _issue(d, "rogueclient", "rogue", CLIENT_EXT, cn="a stranger")
    _openssl("pkey", "-in", "server.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key", cwd=d)
    return d


@pytest.fixture
def app_dir(tmp_path, pki):
    (tmp_path / "tlsapp.py").write_text(APP)
    for name in ("server.pem", "server.key"):       # a copy: the HUP test replaces them
        shutil.copy(pki / name, tmp_path / name)
    return tmp_path


def serve(app_dir, kind, *args, workers=1):
    interface, app, env = INTERFACES.get(kind) or OTHER_INTERFACES[kind]
    return Server(app_dir, installed_backend(), "--interface", interface,
                  "--certfile", "server.pem", "--keyfile", "server.key", *args,
                  app=app, env=env, workers=workers).start()


def client_context(pki, cert=None):
    """A client context that verifies the server against the test CA (and hostname)."""
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def https_get(port, ctx, path="/", host="localhost"):
    """GET over a verified TLS connection; returns (status, json body, the server's certificate)."""
    conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        cert = conn.sock.getpeercert()           # (the socket is dropped after a close response)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body), cert
    finally:
        conn.close()


def worker_sockets(srv):
    """The sockets the (single) worker has open (other fds, such as one a library opens
    lazily on the first request, are not connections)."""
    pid = srv.events("ready")[-1]["pid"]
    fds = os.listdir(f"/proc/{pid}/fd")
    return sum(1 for fd in fds if _readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"))


def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:          # closed meanwhile
        return ""


def _read_all(sock):
    out = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        out += chunk
    return out


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("kind", INTERFACES)
def test_verified_client_sees_https(app_dir, pki, kind):
    with serve(app_dir, kind) as srv:
        assert "Listening at https://" in srv.log()      # the URL a user would copy
        ctx = client_context(pki)
        for path in ("/", "/two"):
            status, body, cert = https_get(srv.port, ctx, path)
            assert status == 200 and body == {"scheme": "https", "path": path}
            assert dict(x[0] for x in cert["subject"])["commonName"] == "localhost"
        # Keep-alive: several requests on one TLS connection.
        conn = http.client.HTTPSConnection("localhost", srv.port, context=ctx, timeout=TIMEOUT)
        try:
            for i in range(3):
                conn.request("GET", f"/k{i}")
                resp = conn.getresponse()
                assert resp.status == 200 and json.loads(resp.read())["path"] == f"/k{i}"
        finally:
            conn.close()
        # A client that trusts nothing of ours refuses the server: the certificate is checked.
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(srv.port, ssl.create_default_context(cafile=str(pki / "rogue.pem")))
        if shutil.which("curl"):
            out = subprocess.run(["curl", "-sS", "--max-time", "20", "--cacert", str(pki / "ca.pem"),
                                  f"https://localhost:{srv.port}/curl"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout) == {"scheme": "https", "path": "/curl"}


@pytest.mark.usefixtures("fd_guard")
def test_a_kept_alive_tls_connection_survives_a_slow_request_beside_it(app_dir, pki):
    # A WSGI worker running a long request hands its idle connections back to the primary
    # (parking); a TLS connection's session state lives in the worker, so it must stay.
    with serve(app_dir, "wsgi") as srv:
        ctx = client_context(pki)
        kept = http.client.HTTPSConnection("localhost", srv.port, context=ctx, timeout=TIMEOUT)
        try:
            kept.request("GET", "/first")
            resp = kept.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["path"] == "/first"
            status, body, _ = https_get(srv.port, ctx, "/slow")    # beside it, same worker
            assert status == 200 and body["path"] == "/slow"
            kept.request("GET", "/again")
            resp = kept.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["path"] == "/again"
        finally:
            kept.close()


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("kind", INTERFACES)
def test_plain_http_and_bad_handshakes_close_only_their_connection(app_dir, pki, kind):
    with serve(app_dir, kind) as srv:
        sockets_before = worker_sockets(srv)            # before any connection
        ctx = client_context(pki)
        assert https_get(srv.port, ctx)[0] == 200
        # Held open while a TLS client is served by the same (single) worker: a silent
        # client, a plain-HTTP one, and one that stopped halfway through its ClientHello.
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
        plain = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
        half = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
        try:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
            for i in range(3):
                status, body, _ = https_get(srv.port, ctx, f"/while{i}")
                assert status == 200 and body["path"] == f"/while{i}"
            # The plain-HTTP client gets no HTTP answer: its connection is closed.
            assert not _read_all(plain).startswith(b"HTTP/")
        finally:
            for s in (silent, plain, half):
                s.close()
        # A TLS client whose certificate check fails aborts the handshake itself.
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as raw:
            with pytest.raises(ssl.SSLError):
                ssl.create_default_context().wrap_socket(raw, server_hostname="localhost")
        assert https_get(srv.port, ctx)[0] == 200
        # Every connection is closed in the worker too.
        wait_until(lambda: worker_sockets(srv) == sockets_before, timeout=TIMEOUT, what="the worker's sockets back")


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("kind", OTHER_INTERFACES)
def test_raw_and_asyncio_handlers_get_tls(app_dir, pki, kind):
    """The raw handler gets a TLS socket (handshake done), the asyncio one TLS streams."""
    with serve(app_dir, kind) as srv:
        ctx = client_context(pki)
        assert https_get(srv.port, ctx)[:2] == (200, {"scheme": "https", "path": "/"})
        with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not _read_all(plain).startswith(b"HTTP/")
        # A client that keeps its end open after the answer does not hold the (single)
        # worker: closing our end says close_notify without waiting for the client's.
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT),
                             server_hostname="localhost") as lingering:
            lingering.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert lingering.recv(65536).startswith(b"HTTP/1.1 200")
            assert https_get(srv.port, ctx)[1]["scheme"] == "https"
        assert https_get(srv.port, ctx)[1]["scheme"] == "https"


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("kind", INTERFACES)
def test_client_certificate_required(app_dir, pki, kind):
    with serve(app_dir, kind, "--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "required") as srv:
        status, body, _ = https_get(srv.port, client_context(pki, cert="client"))
        assert status == 200 and body["scheme"] == "https"
        for refused in (client_context(pki), client_context(pki, cert="rogueclient")):
            # TLS 1.3: the client's side of the handshake ends before the server has checked
            # its certificate, so the refusal shows on the first read.
            with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
                https_get(srv.port, refused)
        if shutil.which("curl"):
            base = ["curl", "-sS", "--max-time", "20", "--cacert", str(pki / "ca.pem")]
            url = f"https://localhost:{srv.port}/curl"
            out = subprocess.run(base + ["--cert", str(pki / "client.pem"), "--key", str(pki / "client.key"), url],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and json.loads(out.stdout)["path"] == "/curl", out.stderr
            out = subprocess.run(base + [url], capture_output=True, text=True, timeout=60)
            assert out.returncode != 0
        assert https_get(srv.port, client_context(pki, cert="client"))[0] == 200


@pytest.mark.usefixtures("fd_guard")
def test_optional_client_certificate(app_dir, pki):
    with serve(app_dir, "wsgi", "--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "optional") as srv:
        assert https_get(srv.port, client_context(pki))[0] == 200
        assert https_get(srv.port, client_context(pki, cert="client"))[0] == 200
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            https_get(srv.port, client_context(pki, cert="rogueclient"))


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_rolling_restart_loads_a_renewed_certificate(app_dir, pki, kind):
    """Each worker builds its context from the files when it starts: HUP renews the certificate."""
    with serve(app_dir, kind) as srv:
        ctx = client_context(pki)
        serial = https_get(srv.port, ctx)[2]["serialNumber"]
        for name in ("server.pem", "server.key"):
            shutil.copy(pki / name.replace("server", "server2"), app_dir / (name + ".new"))
            os.replace(app_dir / (name + ".new"), app_dir / name)
        srv.signal(signal.SIGHUP)
        srv.wait_event("reload_complete", timeout=60)
        renewed = https_get(srv.port, ctx)[2]["serialNumber"]
        assert renewed != serial
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def _serve_exit(cwd, *args, env=None):
    proc = subprocess.run([sys.executable, "-m", "pyfork", "serve", "-b", "127.0.0.1:0", "-w", "1", *args],
                          capture_output=True, text=True, timeout=60, cwd=str(cwd),
                          env=dict(os.environ, **(env or {})))
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("args,needle", [
    (["--certfile", "missing.pem"], "--certfile"),
    (["--certfile", "server.pem"], "--certfile"),                            # no key anywhere
    (["--certfile", "server.pem", "--keyfile", "client.key"], "mismatch"),
    (["--certfile", "server.pem", "--keyfile", "encrypted.key"], "encrypted"),
    (["--certfile", "server.pem", "--keyfile", "server.key", "--ssl-ciphers", "NO-SUCH-CIPHER"],
     "--ssl-ciphers"),
    (["--certfile", "server.pem", "--keyfile", "server.key", "--cert-reqs", "required"], "--ca-certs"),
    (["--certfile", "server.pem", "--keyfile", "server.key", "--cert-reqs", "sometimes"], "--cert-reqs"),
    (["--certfile", "server.pem", "--keyfile", "server.key", "--ca-certs", "server.key",
      "--cert-reqs", "required"], "--ca-certs"),
    (["--keyfile", "server.key"], "--certfile"),
    (["--certfile", "server.pem", "--keyfile", "server.key", "--proxy-protocol"], "--proxy-protocol"),
])
def test_bad_tls_options_exit_2_before_any_fork(pki, args, needle):
    code, lines = _serve_exit(pki, *args)
    assert code == 2
    assert len(lines) == 1 and needle in lines[0], lines


def test_tls_options_from_the_environment_and_config_file(pki, tmp_path):
    code, lines = _serve_exit(pki, "--print-config",
                              env={"PYFORK_CERTFILE": "server.pem", "PYFORK_KEYFILE": "server.key",
                                   "PYFORK_CERT_REQS": "2", "PYFORK_CA_CERTS": "ca.pem"})
    assert code == 0, lines
    (tmp_path / "conf.py").write_text(f"certfile = {str(pki / 'server.pem')!r}\n"
                                      f"keyfile = {str(pki / 'client.key')!r}\n")
    code, lines = _serve_exit(pki, "-c", str(tmp_path / "conf.py"))
    assert code == 2 and len(lines) == 1 and "mismatch" in lines[0], lines


def test_cluster_api_checks_tls_at_construction(pki):
    import pyfork
    with pytest.raises(ValueError, match="--ssl-ciphers"):
        pyfork.Cluster("pyfork.demo:app", bind="127.0.0.1:0", workers=1, certfile=str(pki / "server.pem"),
                       keyfile=str(pki / "server.key"), ssl_ciphers="NO-SUCH-CIPHER")
    c = pyfork.Cluster("pyfork.demo:app", bind="127.0.0.1:0", workers=1, certfile=str(pki / "server.pem"),
                       keyfile=str(pki / "server.key"), cert_reqs="optional", ca_certs=str(pki / "ca.pem"))
    assert (c.settings.cert_reqs, c.settings.ca_certs) == ("optional", str(pki / "ca.pem"))
