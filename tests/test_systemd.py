"""systemd without systemd: the sd_notify protocol and socket activation, driven directly.

The test binds the AF_UNIX datagram socket that $NOTIFY_SOCKET names and reads what the
primary sends (READY=1 only once the workers answer; RELOADING=1 + MONOTONIC_USEC then
READY=1 around a HUP; STOPPING=1 at TERM; STATUS=; WATCHDOG=1 while the loop runs). For
socket activation it opens a listener, puts it on fd 3 of the process it starts with
$LISTEN_PID/$LISTEN_FDS/$LISTEN_FDNAMES set (as systemd does, through a tiny exec shim),
and checks that pyfork serves there and nowhere else. Workers must not see any of these
variables. Real processes, both backends, open-fd count unchanged.
"""
import json
import os
import signal
import socket
import sys
import time

import pytest

from pyfork.primary import systemd

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]

ENV_APP = H.READ_HEAD + r'''
import json, os

def app(sock, addr):
    if read_head(sock) is None:
        return
    env = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_PID", "LISTEN_FDS",
                                          "LISTEN_FDNAMES")}
    body = json.dumps({"pid": os.getpid(), "env": env}).encode()
    sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

app.pyfork_interface = "raw"
'''

# What systemd does before exec: the listener on fd 3, LISTEN_PID = the pid that runs pyfork.
ACTIVATE_SHIM = r'''
import os, sys
lfd = int(sys.argv[1])
if os.environ.get("PYFORK_EVENTS") == "fd://3":
    os.environ["PYFORK_EVENTS"] = "fd://%d" % os.dup(3)
if lfd != 3:
    os.dup2(lfd, 3)
    os.close(lfd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="web")
os.execv(sys.executable, [sys.executable, "-m", "pyfork", "serve", *sys.argv[2:]])
'''


class NotifySocket:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def recv(self, timeout=30.0):
        """The next datagram as a dict of KEY=VALUE fields."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)

    def wait_for(self, key, timeout=30.0, skip=("STATUS", "WATCHDOG")):
        """Datagrams until one has ``key``; the others must only carry ``skip`` keys."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.recv(max(0.1, deadline - time.monotonic()))
            if key in msg:
                return msg
            assert set(msg) <= set(skip), f"unexpected {msg} while waiting for {key}"

    def close(self):
        self.sock.close()


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "envapp.py").write_text(ENV_APP)
    (tmp_path / "activate.py").write_text(ACTIVATE_SHIM)
    return tmp_path


def _state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _env_of_worker(port):
    status, body = H.http_get(port)
    assert status == 200
    return json.loads(body)


def test_notify_ready_reload_stop_sequence(app_dir, backend):
    ns = NotifySocket(app_dir / "notify.sock")
    try:
        with H.Server(app_dir, backend.BACKEND, app="envapp:app", env={"NOTIFY_SOCKET": ns.path}) as srv:
            msg = ns.wait_for("READY")
            # READY=1 only once every worker is READY: both answer now
            assert msg["READY"] == "1" and msg["MAINPID"] == str(srv.proc.pid)
            assert msg["STATUS"] == "2 of 2 workers ready"
            srv.start(ready=2)
            assert len({_env_of_worker(srv.port)["pid"] for _ in range(6)}) == 2
            assert srv.count_events("ready") == 2
            seen = _env_of_worker(srv.port)["env"]
            assert seen == dict.fromkeys(seen)            # workers inherit none of the variables
            srv.signal(signal.SIGHUP)
            msg = ns.wait_for("RELOADING")
            assert msg["RELOADING"] == "1"
            usec = int(msg["MONOTONIC_USEC"])
            assert 0 < usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            msg = ns.wait_for("READY")                    # the reload finished
            srv.wait_event("reload_complete")
            assert srv.count_events("ready") == 4
            srv.signal(signal.SIGTERM)
            msg = ns.wait_for("STOPPING")
            assert msg["STOPPING"] == "1"
            assert srv.wait() == 0
    finally:
        ns.close()


def test_watchdog_pings_only_while_the_loop_runs(app_dir, backend):
    ns = NotifySocket(app_dir / "notify.sock")
    try:
        env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "400000"}     # ping every 0.2 s
        with H.Server(app_dir, backend.BACKEND, app="envapp:app", env=env) as srv:
            ns.wait_for("READY")
            srv.start(ready=2)
            for _ in range(3):
                ns.wait_for("WATCHDOG", timeout=10)
            assert _env_of_worker(srv.port)["env"]["WATCHDOG_USEC"] is None
            os.kill(srv.proc.pid, signal.SIGSTOP)         # a stuck primary sends nothing
            try:
                # once it is stopped, whatever it sent is already queued here (AF_UNIX datagrams)
                H.wait_until(lambda: _state(srv.proc.pid) == "T", what="the primary stopped")
                ns.sock.setblocking(False)
                while True:
                    try:
                        ns.sock.recv(4096)
                    except BlockingIOError:
                        break
                with pytest.raises(socket.timeout):
                    ns.recv(timeout=1.0)
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            ns.wait_for("WATCHDOG", timeout=10)           # and resumes with the loop
            srv.signal(signal.SIGTERM)
            assert srv.wait() == 0
    finally:
        ns.close()


def test_socket_activation_serves_on_the_inherited_listener(app_dir, backend):
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    try:
        argv = [sys.executable, str(app_dir / "activate.py"), str(lsock.fileno()), "envapp:app",
                "--interface", "raw", "-w", "2"]
        with H.Server(app_dir, backend.BACKEND, argv=argv, pass_fds=(lsock.fileno(),)) as srv:
            srv.start(ready=2)
            # served on systemd's socket, and no default address bound
            assert srv.started["urls"] == [f"http://127.0.0.1:{port}"]
            got = _env_of_worker(port)
            assert set(got["env"].values()) == {None}
            assert "socket activation: fd 3 (web)" in srv.log()
            srv.signal(signal.SIGTERM)
            assert srv.wait() == 0
        # the listener stays ours (systemd's): still open and listening
        assert lsock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    finally:
        lsock.close()


def test_listen_fds_only_for_our_pid():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert systemd.listen_fds(env) == [] and env == {}        # not ours; the variables are gone anyway
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}
    with pytest.raises(ValueError):
        systemd.listen_fds(env)
    assert systemd.listen_fds({}) == []
