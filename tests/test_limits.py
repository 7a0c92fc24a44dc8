"""Limits (issue 18): --limit-concurrency, --backlog, --keep-alive, the RLIMIT_NOFILE raise,
and WebSockets counted as open connections, not running requests. Both backends.

Real forks, real HTTP and WebSocket clients (the `websockets` package), the listener's
backlog read back from the kernel with `ss`, /proc/<pid>/limits of a worker. Order is waited
for through the protocol itself (a `100 Continue`, the head of a streaming response), the
event stream and the control socket, never slept for.
"""
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

import pytest

import supervisor_harness as H
from pyfork import config
from pyfork.primary import control

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(240)]

WSGI_APP = r'''
import json, os

def app(environ, start_response):
    body = environ["wsgi.input"].read()
    out = json.dumps({"pid": os.getpid(), "len": len(body)}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]
'''

ASGI_APP = r'''
import json, os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()                                  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            m = await receive()
            if m["type"] == "websocket.disconnect":
                return
            await send({"type": "websocket.send", "text": "echo:" + (m.get("text") or "")})
    if scope["path"] == "/hold":
        # a slow request: the head and a first part at once, then nothing until the client goes
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"holding\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        return
    while (await receive()).get("more_body"):
        pass
    out = json.dumps({"pid": os.getpid()}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
    await send({"type": "http.response.body", "body": out})
'''


@pytest.fixture
def apps(tmp_path):
    (tmp_path / "lwapp.py").write_text(WSGI_APP)
    (tmp_path / "laapp.py").write_text(ASGI_APP)
    return tmp_path


def _serve(apps, backend, interface, *args, workers=1, ctl=True, **kw):
    extra = ("--control", str(apps / "ctl.sock")) if ctl else ()
    app = "lwapp:app" if interface == "wsgi" else "laapp:app"
    return H.Server(apps, backend.BACKEND, "--interface", interface, *extra, *args, app=app,
                    workers=workers, **kw)


def _status(srv):
    return control.request(str(srv.tmp / "ctl.sock"), {"cmd": "status"})


def _read_response(sock):
    """One response with a Content-Length body from `sock`: (status, headers dict, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:n]


def _get11(port, path="/", timeout=30.0):
    """HTTP/1.1 GET without a Connection header (keep-alive by default): the open socket and
    the response; the caller closes the socket."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return s, _read_response(s)


def _eof(sock):
    """True when the server closed `sock` (after whatever it still sends)."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True


# ---- validation -----------------------------------------------------------------------
BAD = [
    (["--limit-concurrency", "-1"], "--limit-concurrency"),
    (["--limit-concurrency", "many"], "integer"),
    (["--backlog", "0"], "--backlog"),
    (["--backlog", "65536"], "--backlog"),
    (["--keep-alive", "-1"], "--keep-alive"),
    (["--keep-alive", "inf"], "seconds"),
]


@pytest.mark.parametrize("args,word", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_limit_exits_2_with_one_line_and_forks_nothing(tmp_path, args, word):
    H.write_apps(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pyfork", "serve", "markapp:app", "--interface", "raw", *args],
                       cwd=str(tmp_path), env={**os.environ, "PYFORK_BACKEND": "python"},
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("pyfork: error:") and word in err, err
    assert not (tmp_path / "forked.marker").exists()


@pytest.mark.parametrize("var,value,word", [("PYFORK_LIMIT_CONCURRENCY", "x", "PYFORK_LIMIT_CONCURRENCY"),
                                            ("PYFORK_BACKLOG", "70000", "--backlog"),
                                            ("PYFORK_KEEP_ALIVE", "-2", "--keep-alive")])
def test_bad_limit_environment_variable_exits_2(tmp_path, var, value, word):
    H.write_apps(tmp_path)
    r = subprocess.run([sys.executable, "-m", "pyfork", "serve", "markapp:app", "--interface", "raw"],
                       cwd=str(tmp_path), env={**os.environ, "PYFORK_BACKEND": "python", var: value},
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and word in err, err
    assert not (tmp_path / "forked.marker").exists()


def test_limits_validate_like_the_cli():
    s = config.validate(limit_concurrency=10, backlog=100, keep_alive=0)
    assert (s.limit_concurrency, s.backlog, s.keep_alive) == (10, 100, 0.0)
    assert config.validate().backlog == config.somaxconn()
    with open(config.SOMAXCONN_PATH) as f:
        assert config.somaxconn() == min(int(f.read()), 65535)
    for bad in ({"limit_concurrency": True}, {"limit_concurrency": 1.5}, {"backlog": 0}, {"backlog": "5"},
                {"keep_alive": float("nan")}, {"keep_alive": -0.1}):
        with pytest.raises(config.ConfigError):
            config.validate(**bad)
    from pyfork import Cluster
    with pytest.raises(ValueError):
        Cluster("app:app", limit_concurrency=-3)
    c = Cluster("app:app", limit_concurrency=4, backlog=64, keep_alive=2.5)
    assert (c.settings.limit_concurrency, c.settings.backlog, c.settings.keep_alive) == (4, 64, 2.5)


# ---- --limit-concurrency -----------------------------------------------------------------
def _hold_wsgi(port):
    """A slow upload holding a WSGI worker's slot: the head is admitted (the worker says
    `100 Continue`), the body never completes. Returns the socket (the caller finishes it)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 100"), got
    return s


def _hold_asgi(port):
    """A slow request holding an ASGI worker: its response started and goes on."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
    got = b""
    while b"holding" not in got:
        chunk = s.recv(4096)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got
    return s


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_limit_concurrency_answers_503_while_a_slow_request_holds_the_slot(apps, backend, interface):
    # WSGI counts requests in progress: limit 1 is the slow one. ASGI is uvicorn's own
    # count (open connections or tasks >= N, the new connection included): limit 2.
    limit = "1" if interface == "wsgi" else "2"
    with _serve(apps, backend, interface, "--limit-concurrency", limit) as srv:
        srv.start()
        assert srv.started["limit_concurrency"] == int(limit)
        assert H.http_get(srv.port)[0] == 200                # below the limit: served
        slow = _hold_wsgi(srv.port) if interface == "wsgi" else _hold_asgi(srv.port)
        try:
            probe, (status, headers, body) = _get11(srv.port)
            with probe:
                assert status == 503, (status, body)
                assert headers.get("connection", "").lower() == "close"
                assert _eof(probe)                           # and it closes: no silent hang
            if interface == "wsgi":
                slow.sendall(b"0123456789")                  # the slow upload completes: served
                st, _, body = _read_response(slow)
                assert st == 200 and json.loads(body)["len"] == 10
        finally:
            slow.close()
        # the slot is free again (a closed /hold ends its task once the worker sees the EOF)
        H.wait_until(lambda: H.http_get(srv.port)[0] == 200, what="a request served after the slow one")
        ev = srv.wait_event("limit_rejected")
        assert ev["count"] >= 1 and ev["worker"] is not None
        st = _status(srv)
        assert st["totals"]["limit_concurrency_rejections"] >= 1
        assert st["limits"]["limit_concurrency"] == int(limit)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_limits_in_status_metrics_and_the_start_event(apps, backend, tmp_path):
    pytest.importorskip("prometheus_client")
    import obs_harness as O
    with _serve(apps, backend, "wsgi", "--limit-concurrency", "7", "--backlog", "77", "--keep-alive", "3",
                "--metrics", "127.0.0.1:0") as srv:
        srv.start()
        ev = srv.started
        assert (ev["limit_concurrency"], ev["backlog"], ev["keep_alive"]) == (7, 77, 3.0)
        st = _status(srv)
        assert st["limits"]["limit_concurrency"] == 7 and st["limits"]["backlog"] == 77
        assert st["limits"]["keep_alive"] == 3.0 and st["limits"]["nofile"] == ev["nofile"]
        m = O.scrape(ev["metrics"])
        assert O.total(m, "pyfork_limit_concurrency") == 7
        assert O.total(m, "pyfork_listen_backlog") == 77
        assert O.total(m, "pyfork_keep_alive_seconds") == 3
        assert O.total(m, "pyfork_open_files_limit") == ev["nofile"]["soft"]
        assert O.total(m, "pyfork_limit_concurrency_rejections_total") == 0
        r = subprocess.run([sys.executable, "-m", "pyfork", "status", "--control", str(srv.tmp / "ctl.sock")],
                           capture_output=True, timeout=60)
        out = r.stdout.decode()
        assert r.returncode == 0 and "limits: concurrency 7 per worker" in out and "backlog 77" in out, out
        assert "keep-alive 3s" in out, out
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


# ---- --backlog ------------------------------------------------------------------------------
def _listen_backlog(port):
    """The backlog of the socket listening on `port`, as the kernel reports it (ss: Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, timeout=30).stdout.decode()
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert rows, out
    return {int(r[2]) for r in rows}


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read the backlog back")
@pytest.mark.parametrize("policy", ["rr", "reuseport"])
def test_backlog_reaches_the_listeners(apps, backend, policy):
    with _serve(apps, backend, "wsgi", "--backlog", "37", "--policy", policy, workers=2, ctl=False) as srv:
        srv.start(ready=2)
        assert srv.started["backlog"] == 37
        assert _listen_backlog(srv.port) == {37}
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    with _serve(apps, backend, "wsgi", ctl=False) as srv:      # the default: net.core.somaxconn
        srv.start()
        assert srv.started["backlog"] == config.somaxconn()
        assert _listen_backlog(srv.port) == {config.somaxconn()}
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


# ---- --keep-alive ---------------------------------------------------------------------------
@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_keep_alive_0_closes_after_every_response(apps, backend, interface):
    with _serve(apps, backend, interface, "--keep-alive", "0", ctl=False) as srv:
        srv.start()
        assert srv.started["keep_alive"] == 0
        s, (status, headers, _) = _get11(srv.port)
        with s:
            assert status == 200 and headers.get("connection", "").lower() == "close"
            assert _eof(s)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
def test_keep_alive_keeps_then_closes_an_idle_connection(apps, backend, interface):
    with _serve(apps, backend, interface, "--keep-alive", "0.5", ctl=False) as srv:
        srv.start()
        s, (status, headers, _) = _get11(srv.port)
        with s:
            assert status == 200 and headers.get("connection", "").lower() != "close"
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")     # kept alive: a second request
            assert _read_response(s)[0] == 200
            assert _eof(s)                                       # then the idle timeout closes it
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


# ---- RLIMIT_NOFILE ------------------------------------------------------------------------
def test_primary_raises_the_open_file_limit_and_workers_inherit_it(apps, backend):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            hard_n = int(f.read())
    else:
        hard_n = hard
    low = min(512, hard_n)
    # start the server with a low soft limit, as a service manager might
    launcher = ("import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({low}, resource.getrlimit(resource.RLIMIT_NOFILE)[1])); "
                "os.execv(sys.executable, [sys.executable, '-m', 'pyfork'] + sys.argv[1:])")
    argv = [sys.executable, "-c", launcher, "serve", "lwapp:app", "-b", "127.0.0.1:0", "--interface", "wsgi",
            "-w", "1"]
    with H.Server(apps, backend.BACKEND, argv=argv) as srv:
        srv.start()
        assert srv.started["nofile"] == {"before": low, "soft": hard_n, "hard": hard_n}
        worker = srv.wait_event("ready")["pid"]
        with open(f"/proc/{worker}/limits") as f:
            row = next(line for line in f if line.startswith("Max open files"))
        assert row.split()[3:5] == [str(hard_n), str(hard_n)], row
        assert "RLIMIT_NOFILE" in srv.log()
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


# ---- WebSockets ---------------------------------------------------------------------------------
@pytest.fixture
def many_fds():
    """Raises this process's soft RLIMIT_NOFILE for a thousand client sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    if want < 2200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for 1,000 WebSockets and their servers")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


N_WEBSOCKETS = 1000


def _fd_total(pids):
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def test_open_websockets_do_not_count_as_running_requests(apps, backend, many_fds):
    pytest.importorskip("uvicorn")
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect
    with _serve(apps, backend, "asgi", workers=2) as srv:
        srv.start(ready=2)
        url = f"ws://127.0.0.1:{srv.port}/ws"
        result = {}
        pids = [w["pid"] for w in _status(srv)["workers"]]

        async def warm_up():     # each worker's loop opens a few fds on its first WebSocket
            for _ in range(4):
                async with connect(url, open_timeout=60, ping_interval=None) as ws:
                    await ws.send("hi")
                    await ws.recv()

        asyncio.run(warm_up())
        fds_before = _fd_total(pids)

        async def main():
            socks = []
            try:
                for i in range(0, N_WEBSOCKETS, 50):         # open in batches: a connect storm is not the point
                    socks += await asyncio.gather(*(connect(url, open_timeout=60, ping_interval=None)
                                                    for _ in range(50)))
                await socks[0].send("first")
                result["echo_first"] = await socks[0].recv()
                loop = asyncio.get_running_loop()
                # while all are open: plain HTTP is answered, and no worker looks busy
                result["plain"] = [await loop.run_in_executor(None, H.http_get, srv.port) for _ in range(20)]
                result["status"] = await loop.run_in_executor(None, _status, srv)
                result["fds"] = _fd_total(pids)
                await socks[-1].send("last")
                result["echo_last"] = await socks[-1].recv()
            finally:
                await asyncio.gather(*(s.close() for s in socks), return_exceptions=True)
            result["opened"] = len(socks)

        asyncio.run(main())
        assert result["opened"] == N_WEBSOCKETS
        assert result["echo_first"] == "echo:first" and result["echo_last"] == "echo:last"
        assert [st for st, _ in result["plain"]] == [200] * 20
        workers = result["status"]["workers"]
        assert len(workers) == 2
        assert sum(w["active"] for w in workers) == 0, workers          # WebSockets are not requests
        assert result["fds"] - fds_before >= N_WEBSOCKETS       # ... but open connections, in the workers
        # every WebSocket closed: the workers closed their sockets
        H.wait_until(lambda: _fd_total(pids) <= fds_before, what="every WebSocket closed in the workers")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
