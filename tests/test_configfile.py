"""-c/--config FILE.py: settings, precedence, server hooks, --check-config, --print-config.

Real `pyfork serve` processes (tests/supervisor_harness.py): hooks append a line to a
file in the test's tmp dir (the primary and the workers write to it with O_APPEND), and
the test reads the order back; what the primary did is read from its event stream.
Precedence is read from --print-config, which prints the effective settings as a config
file would set them.
"""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from pyfork import configfile
from pyfork.config import ConfigError

import supervisor_harness as H

HOOKS_FILE = r'''
import os
workers = 2

def _log(*words):
    with open("hooks.log", "a") as f:
        f.write(" ".join(str(w) for w in words) + "\n")

def on_starting(server):
    _log("on_starting", server.pid, server.settings.workers)

def when_ready(server):
    _log("when_ready", len(server.urls), server.status()["workers_wanted"])

def pre_fork(server, worker):
    _log("pre_fork", worker.id, worker.pid)

def post_fork(worker):
    _log("post_fork", worker.id, os.getpid())

def child_exit(server, worker, code, signal):
    _log("child_exit", worker.id, code, signal)

def worker_abort(worker):
    _log("worker_abort", worker.id)

def on_reload(server):
    _log("on_reload")

def on_exit(server, code):
    _log("on_exit", code)
'''


@pytest.fixture
def apps(tmp_path):
    H.write_apps(tmp_path)
    return tmp_path


def _serve(tmp_path, backend, *args, env=None):
    argv = [sys.executable, "-m", "pyfork", "serve", "app:app", "-b", "127.0.0.1:0", "--interface", "raw", *args]
    return H.Server(tmp_path, backend.BACKEND, argv=argv, env=env)


def _cli(tmp_path, *args, env=None):
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("PYFORK_") and k != "PYFORK_BACKEND":
            del e[k]
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pyfork", "serve", *args], cwd=str(tmp_path), env=e,
                          capture_output=True, text=True, timeout=60)


def _hook_lines(tmp_path):
    return [line.split() for line in (tmp_path / "hooks.log").read_text().splitlines()]


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.timeout(180)
def test_hooks_run_in_the_documented_order(apps, backend):
    (apps / "conf.py").write_text(HOOKS_FILE)
    with _serve(apps, backend, "-c", "conf.py") as srv:
        srv.start(ready=2)
        srv.signal(signal.SIGHUP)
        srv.wait_event("reload_complete")
        srv.wait_event("exit", n=2, cause="drained")
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        pid = srv.proc.pid
    lines = _hook_lines(apps)
    names = [l[0] for l in lines]
    assert names[0] == "on_starting" and lines[0][1:] == [str(pid), "2"]
    assert names[-1] == "on_exit" and lines[-1][1:] == ["0"]
    # start: every worker's pre_fork (in the primary, pid not yet known) before its post_fork
    # (in the worker); when_ready once both are READY, before the reload
    for wid in ("1", "2", "3", "4"):
        pre = [i for i, l in enumerate(lines) if l[:2] == ["pre_fork", wid]]
        post = [i for i, l in enumerate(lines) if l[:2] == ["post_fork", wid]]
        assert pre and post and pre[0] < post[0], (wid, lines)
        assert lines[pre[0]][2] == "None"
    ready = names.index("when_ready")
    assert names.count("when_ready") == 1 and lines[ready][1:] == ["1", "2"]
    assert ready > max(i for i, l in enumerate(lines) if l[:2] in (["post_fork", "1"], ["post_fork", "2"]))
    reload_at = names.index("on_reload")
    assert ready < reload_at < min(i for i, l in enumerate(lines) if l[:2] in (["pre_fork", "3"], ["pre_fork", "4"]))
    # every worker's exit reaches child_exit, with its exit code, before on_exit
    exits = sorted(l[1] for l in lines if l[0] == "child_exit")
    assert exits == ["1", "2", "3", "4"]
    assert all(l[2:] == ["0", "None"] for l in lines if l[0] == "child_exit")
    assert "worker_abort" not in names


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.timeout(180)
def test_a_raising_hook_is_logged_and_the_primary_carries_on(apps, backend):
    (apps / "conf.py").write_text("workers = 2\n"
                                  "def when_ready(server):\n    raise RuntimeError('when_ready says no')\n"
                                  "def child_exit(server, worker, code, signal):\n    1 / 0\n")
    with _serve(apps, backend, "-c", "conf.py") as srv:
        srv.start(ready=2)
        H.wait_until(lambda: "when_ready says no" in srv.log(), what="the hook's traceback")
        assert "Traceback" in srv.log()
        assert len(H.serving_pids(srv.port, 6)) == 2          # still serving
        srv.signal(signal.SIGHUP)                             # child_exit raises for each old worker
        srv.wait_event("reload_complete")
        srv.wait_event("exit", n=2, cause="drained")
        assert len(H.serving_pids(srv.port, 6)) == 2
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        assert "ZeroDivisionError" in srv.log()


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.timeout(120)
def test_raising_on_starting_exits_2_before_any_fork(apps, backend):
    (apps / "conf.py").write_text("def on_starting(server):\n    raise ValueError('not today')\n")
    with _serve(apps, backend, "-c", "conf.py") as srv:
        assert srv.wait() == 2
        assert "on_starting hook failed: ValueError: not today" in srv.log()
        assert "Traceback" in srv.log()
        assert srv.events("fork") == [] and srv.events("start") == []


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path):
    (tmp_path / "conf.py").write_text("workers = 3\nmax_requests = 7\ntimeout = 11\nbind = '127.0.0.1:9001'\n"
                                      "_helper = 'ignored'\nimport os\nBASE = os.getcwd()\n")
    r = _cli(tmp_path, "-c", "conf.py", "--timeout", "13", "--print-config",
             env={"PYFORK_MAX_REQUESTS": "8", "PYFORK_TIMEOUT": "12"})
    assert r.returncode == 0, r.stderr
    got = dict(line.split(" = ", 1) for line in r.stdout.splitlines() if not line.startswith("#"))
    assert got["workers"] == "3"                  # file
    assert got["max_requests"] == "8"             # env over file
    assert got["timeout"] == "13.0"               # command line over env and file
    assert got["bind"] == "['127.0.0.1:9001']"    # file over the default
    assert got["graceful_timeout"] == "30.0"      # default
    # PYFORK_CONFIG names the file too, and the command line's -w wins over it
    r = _cli(tmp_path, "-w", "1", "--print-config", env={"PYFORK_CONFIG": "conf.py"})
    got = dict(line.split(" = ", 1) for line in r.stdout.splitlines() if not line.startswith("#"))
    assert r.returncode == 0 and got["workers"] == "1" and got["max_requests"] == "7"


@pytest.mark.usefixtures("fd_guard")
@pytest.mark.timeout(120)
def test_file_settings_are_served(apps, backend):
    (apps / "conf.py").write_text("workers = 3\nmax_requests = 1000\n")
    with _serve(apps, backend, "-c", "conf.py") as srv:
        srv.start(ready=3)
        assert srv.started["workers"] == 3
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_check_config_good_file_exits_0_without_binding(apps):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        (apps / "conf.py").write_text(f"workers = 2\nbind = ['127.0.0.1:{port}']\n")
        r = _cli(apps, "app:app", "-c", "conf.py", "--check-config")
        assert r.returncode == 0, r.stderr       # the port is taken: it did not bind
        assert "config OK" in r.stdout and "app:app" in r.stdout
    finally:
        busy.close()


@pytest.mark.parametrize("text, msg", [
    ("workers = (\n", "SyntaxError"),
    ("workers = 2\nraise RuntimeError('broken config')\n", "RuntimeError: broken config (line 2)"),
    ("wokers = 2\n", "unknown setting 'wokers'"),
    ("workers = 0\n", "bad --workers 0"),
    ("policy = 'fastest'\n", "bad --policy 'fastest'"),
    ("timeout = 'soon'\n", "expected a number of seconds"),
    ("when_ready = 3\n", "hook when_ready must be a function"),
    ("config = 'other.py'\n", "config cannot be set in a config file"),
])
def test_check_config_broken_file_exits_2(apps, text, msg):
    (apps / "conf.py").write_text(text)
    r = _cli(apps, "app:app", "-c", "conf.py", "--check-config")
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_check_config_broken_app_or_missing_file_exits_2(apps):
    (apps / "conf.py").write_text("workers = 2\n")
    r = _cli(apps, "no_such_module:app", "-c", "conf.py", "--check-config")
    assert r.returncode == 2 and "no_such_module" in r.stderr
    r = _cli(apps, "app:app", "-c", "missing.py", "--check-config")
    assert r.returncode == 2 and "not found" in r.stderr


def test_load_reads_settings_and_hooks(tmp_path):
    p = tmp_path / "c.py"
    p.write_text("import os\nworkers = 4\nbind = ['unix:/tmp/x.sock']\n"
                 "def on_exit(server, code):\n    pass\ndef _mine():\n    pass\ndef helper():\n    pass\n")
    cf = configfile.load(str(p))
    assert cf.values == {"workers": 4, "bind": ["unix:/tmp/x.sock"]}
    assert list(cf.hooks) == ["on_exit"]
    with pytest.raises(ConfigError):
        configfile.parse_value("workers", "four")
    assert configfile.parse_value("bind", "127.0.0.1:1") == ["127.0.0.1:1"]
