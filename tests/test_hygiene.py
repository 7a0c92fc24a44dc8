"""Process hygiene: --pid-file, --user/--group (as root, for real), --umask, --chdir, titles.

Real `pyfork serve` processes (tests/supervisor_harness.py). Privilege dropping is
checked from /proc (the workers' Uid/Gid lines) while the primary keeps its own uid;
the suite runs as root in CI, and the root-only tests are skipped elsewhere. The app
lives in a world-readable directory so a worker running as `nobody` can import it.
"""
import os
import pwd
import grp
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")


@pytest.fixture
def apps():
    d = Path(tempfile.mkdtemp(prefix="pyfork-hygiene-", dir="/tmp"))
    os.chmod(d, 0o755)
    H.write_apps(d)
    for f in d.iterdir():
        os.chmod(f, 0o644)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _ids(pid):
    """(real uid, real gid) of pid from /proc."""
    uid = gid = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def _cli(cwd, *args, **kw):
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYFORK_") or k == "PYFORK_BACKEND"}
    return subprocess.run([sys.executable, "-m", "pyfork", "serve", *args], cwd=str(cwd), env=e,
                          capture_output=True, text=True, timeout=60, **kw)


def test_pid_file_exists_while_running_and_is_gone_after(apps, backend):
    pid_file = apps / "run" / "pyfork.pid"
    pid_file.parent.mkdir()
    with H.Server(apps, backend.BACKEND, "--pid-file", str(pid_file)) as srv:
        srv.start(ready=2)
        assert pid_file.read_text().strip() == str(srv.proc.pid)
        # a second pyfork with the same pid file refuses to start: exit 2, nothing forked
        with H.Server(apps, backend.BACKEND, "--pid-file", str(pid_file)) as second:
            assert second.wait() == 2
            assert f"pid file {pid_file} is held by a running pyfork (pid {srv.proc.pid})" in second.log()
            assert second.events("fork") == []
        assert pid_file.read_text().strip() == str(srv.proc.pid)      # still the first one's
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    assert not pid_file.exists()


def test_stale_pid_file_is_replaced(apps, backend):
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (f"{dead.pid}\n", "not a pid\n"):
        pid_file = apps / "stale.pid"
        pid_file.write_text(stale)
        with H.Server(apps, backend.BACKEND, "--pid-file", str(pid_file)) as srv:
            srv.start(ready=2)
            assert pid_file.read_text().strip() == str(srv.proc.pid)
            srv.signal(signal.SIGTERM)
            assert srv.wait() == 0
        assert not pid_file.exists()


@root_only
def test_user_and_group_drop_privileges_in_the_workers(apps, backend):
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrnam("daemon")
    with H.Server(apps, backend.BACKEND, "--user", "nobody") as srv:
        srv.start(ready=2)
        pids = H.serving_pids(srv.port, 6)           # the workers import and serve as nobody
        assert len(pids) == 2
        assert {_ids(p) for p in pids} == {(nobody.pw_uid, nobody.pw_gid)}
        assert _ids(srv.proc.pid) == (0, 0)          # the primary keeps its uid (pid file, control socket)
        # PR_SET_PDEATHSIG survives the switch: workers die with their primary
        srv.signal(signal.SIGKILL)
        srv.wait()
        H.wait_until(lambda: not any(H.alive(p) for p in pids), what="workers to die with the primary")
    with H.Server(apps, backend.BACKEND, "--user", str(nobody.pw_uid), "--group", "daemon") as srv:
        srv.start(ready=2)
        pids = H.serving_pids(srv.port, 6)
        assert {_ids(p) for p in pids} == {(nobody.pw_uid, group.gr_gid)}
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


@root_only
def test_switching_user_needs_root():
    # As nobody (a forked child of the test: nobody cannot run this venv's interpreter),
    # asking for another user is the one-line option error.
    from pyfork import config
    nobody = pwd.getpwnam("nobody")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
            os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
            try:
                config.validate(user="root")
                msg = "accepted"
            except config.ConfigError as e:
                msg = str(e)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got == f"--user needs root: this process runs as uid {nobody.pw_uid}"


@pytest.mark.parametrize("args, msg", [
    (["--user", "no-such-user-here"], "bad --user 'no-such-user-here': no such user"),
    (["--group", "no-such-group-here"], "bad --group 'no-such-group-here': no such group"),
    (["--umask", "999"], "bad --umask: expected an octal mode"),
    (["--umask", "1777"], "bad --umask 1023: expected an octal mode 000..777"),
    (["--chdir", "/no/such/dir"], "bad --chdir '/no/such/dir': not a directory"),
    (["--pid-file", ""], "bad --pid-file '': expected a path"),
])
def test_bad_hygiene_options_exit_2(apps, args, msg):
    r = _cli(apps, "app:app", *args)
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _umask(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1], 8) for l in f if l.startswith("Umask:"))


def test_umask_and_chdir(apps, backend):
    sub = apps / "site"
    sub.mkdir()
    shutil.move(str(apps / "app.py"), str(sub / "app.py"))      # importable only from --chdir
    pid_file = apps / "p.pid"
    argv = [sys.executable, "-m", "pyfork", "serve", "app:app", "-b", "127.0.0.1:0", "--interface", "raw",
            "-w", "1", "--umask", "077", "--chdir", str(sub), "--pid-file", str(pid_file)]
    with H.Server(apps, backend.BACKEND, argv=argv) as srv:
        srv.start(ready=1)
        pid = H.pid_of(srv.port)
        assert _umask(srv.proc.pid) == _umask(pid) == 0o077
        assert os.readlink(f"/proc/{pid}/cwd") == str(sub)
        assert stat.S_IMODE(os.stat(pid_file).st_mode) == 0o600      # 0644 under the umask
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_process_titles_with_setproctitle(apps, backend):
    pytest.importorskip("setproctitle")
    with H.Server(apps, backend.BACKEND) as srv:
        srv.start(ready=2)

        def title(pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")[0].decode()

        H.wait_until(lambda: title(srv.proc.pid) == "pyfork: primary app:app", what="the primary's title")
        workers = {e["worker"]: e["pid"] for e in srv.events("fork")}
        for wid, pid in workers.items():
            H.wait_until(lambda: title(pid) == f"pyfork: worker {wid} app:app", what=f"worker {wid}'s title")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
