"""Control socket tests: mode 0600, peer uid check, line-oriented JSON, garbage refused
without changing anything, reload/scale/stop commands, the events subscription."""
import json
import os
import socket
import stat

import pytest

from pyfork.primary import control

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(120)]


def talk(path, raw: bytes, timeout=10.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        try:
            s.sendall(raw)
        except BrokenPipeError:
            pass        # refused clients get their reply and an immediate close
        buf = b""
        while b"\n" not in buf:
            c = s.recv(65536)
            if not c:
                break
            buf += c
    return json.loads(buf.split(b"\n", 1)[0]) if buf else None


@pytest.fixture
def server(tmp_path, backend):
    H.write_apps(tmp_path)
    ctl = str(tmp_path / "ctl.sock")
    srv = H.Server(tmp_path, backend.BACKEND, "--control", ctl, "--graceful-timeout", "10")
    srv.ctl = ctl
    try:
        srv.start(ready=2)
        yield srv
    finally:
        srv.close()


def pids(srv):
    st = control.request(srv.ctl, {"cmd": "status"})
    return sorted(w["pid"] for w in st["workers"] if w["state"] == "ready")


def test_socket_is_0600(server):
    assert stat.S_IMODE(os.stat(server.ctl).st_mode) == 0o600


GARBAGE = [b"hello\n", b"[1,2]\n", b'{"cmd": 5}\n', b'{"cmd": "format-disk"}\n', b"\xff\xfe\n",
           b'{"cmd": "scale", "n": "lots"}\n', b'{"cmd": "scale", "n": 0}\n', b'{"cmd": "scale", "n": true}\n',
           b'{"cmd": "stop", "graceful": "yes"}\n', b"{" * 10 + b"\n"]


def test_garbage_gets_an_error_and_changes_nothing(server):
    before = pids(server)
    for raw in GARBAGE:
        reply = talk(server.ctl, raw)
        assert reply["ok"] is False and reply["error"], raw
    # an over-long line without a newline
    reply = talk(server.ctl, b"x" * (control.MAX_LINE + 10))
    assert reply["ok"] is False
    assert pids(server) == before
    assert H.pid_of(server.port) in before
    server.signal(15)
    assert server.wait() == 0


def test_several_requests_on_one_connection(server):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(server.ctl)
        s.sendall(b'{"cmd":"status"}\n{"cmd":"nope"}\n')
        buf = b""
        while buf.count(b"\n") < 2:
            c = s.recv(65536)
            assert c
            buf += c
    a, b = [json.loads(x) for x in buf.splitlines()[:2]]
    assert a["ok"] and len(a["workers"]) == 2
    assert not b["ok"]


def test_reload_scale_stop_commands(server):
    before = set(pids(server))
    assert control.request(server.ctl, {"cmd": "reload"}) == {"ok": True}
    server.wait_event("reload_complete")
    H.wait_until(lambda: not (set(pids(server)) & before), what="old workers gone")
    assert control.request(server.ctl, {"cmd": "scale", "n": 3}) == {"ok": True}
    server.wait_event("scale", **{"from": 2, "to": 3})
    H.wait_until(lambda: len(pids(server)) == 3, what="3 workers")
    assert control.request(server.ctl, {"cmd": "stop"}) == {"ok": True}
    assert server.wait() == 0
    assert not os.path.exists(server.ctl)      # removed on exit


# Python >= 3.12 warns on fork() with threads running (here the harness's log reader). The
# child only calls setuid and talks on one socket before os._exit, taking no lock a thread may
# hold; a subprocess cannot do it, as uid 65534 cannot exec an interpreter under /root (0700).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_other_uid_is_refused(tmp_path, backend):
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another uid")
    import shutil
    import tempfile
    H.write_apps(tmp_path)
    d = tempfile.mkdtemp(prefix="pyfork-ctl-", dir="/tmp")   # pytest's tmp dirs are 0700
    os.chmod(d, 0o755)
    ctl = os.path.join(d, "ctl.sock")
    try:
        with H.Server(tmp_path, backend.BACKEND, "--control", ctl) as srv:
            srv.start(ready=2)
            srv.ctl = ctl
            os.chmod(ctl, 0o666)   # let the other uid reach the socket: SO_PEERCRED must still refuse
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    os.close(r)
                    os.setgid(65534)
                    os.setuid(65534)
                    reply = talk(ctl, b'{"cmd":"stop"}\n')
                    os.write(w, json.dumps(reply).encode())
                except BaseException as e:
                    os.write(w, json.dumps({"child error": repr(e)}).encode())
                finally:
                    os._exit(0)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            reply = json.loads(data)
            assert reply.get("ok") is False and "permission denied" in reply["error"], reply
            assert len(pids(srv)) == 2           # nothing stopped
            assert srv.events("stop") == []
            srv.signal(15)
            assert srv.wait() == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_stale_socket_file_is_replaced_and_live_one_refused(tmp_path, backend):
    H.write_apps(tmp_path)
    ctl = str(tmp_path / "ctl.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(ctl)
    stale.close()                             # file left behind, nobody listening
    with H.Server(tmp_path, backend.BACKEND, "--control", ctl) as srv:
        srv.start(ready=2)
        assert control.request(ctl, {"cmd": "status"})["ok"]
        r = H.Server(tmp_path, backend.BACKEND, "--control", ctl)
        try:
            assert r.wait(60) == 2
            assert "another primary" in r.log()        # the one-line startup error
            assert r.events() == []
        finally:
            r.close()
        srv.signal(15)
        assert srv.wait() == 0


def test_events_subscription_streams_what_happens(server):
    """{"cmd": "events"}: the status first, then one record per event, the same records
    the PYFORK_EVENTS reader gets; the subscriber is never idled out."""
    before = pids(server)
    stream = control.follow_events(server.ctl)
    first = next(stream)
    assert first["ok"] and sorted(w["pid"] for w in first["workers"]) == before
    assert control.request(server.ctl, {"cmd": "scale", "n": 3}) == {"ok": True}
    got = []
    for rec in stream:
        got.append(rec)
        if rec["kind"] == "ready":
            break
    kinds = [r["kind"] for r in got]
    assert kinds[:2] == ["scale", "fork"] and kinds[-1] == "ready", kinds
    assert got[0]["from"] == 2 and got[0]["to"] == 3
    assert got[1]["worker"] == got[-1]["worker"] and got[1]["slot"] == 2
    server.signal(15)
    rest = [rec["kind"] for rec in stream]      # until the primary closes the connection
    stream.close()
    assert rest[-1] == "shutdown" and rest.count("exit") == 3, rest
    assert server.wait() == 0
