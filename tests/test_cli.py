"""CLI contract tests: `pyfork --version`, `pyfork serve` option errors (exit 2, one line,
nothing forked), environment variables, `pyfork status`."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from pyfork import cli, config

import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(120)]


def run_cli(tmp_path, *args, env=None, backend=None):
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("PYFORK_") and k != "PYFORK_BACKEND":
            del e[k]
    if backend:
        e["PYFORK_BACKEND"] = backend
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "pyfork", *args], cwd=str(tmp_path), env=e,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)


def test_version(tmp_path, backend):
    r = run_cli(tmp_path, "--version", backend=backend.BACKEND)
    assert r.returncode == 0
    assert r.stdout.decode().strip() == f"pyfork 0.1.0 (backend: {backend.BACKEND})"


BAD = [
    (["-w", "0"], "--workers"),
    (["-w", "many"], "integer"),
    (["--policy", "random"], "--policy"),
    (["--interface", "cgi"], "--interface"),
    (["--backend", "rust"], "--backend"),
    (["--timeout", "-1"], "--timeout"),
    (["--graceful-timeout", "soon"], "seconds"),
    (["--max-restarts", "1.5"], "integer"),
    (["-b", "localhost"], "bind address"),
    (["-b", "127.0.0.1:70000"], "port"),
    (["-b", "unix:"], "path"),
    (["--policy", "reuseport", "-b", "unix:/tmp/x.sock"], "reuseport"),
    (["--no-such-option"], "unrecognized"),
]


@pytest.mark.parametrize("args,word", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_exits_2_with_one_line_and_forks_nothing(tmp_path, args, word):
    H.write_apps(tmp_path)
    r = run_cli(tmp_path, "serve", "markapp:app", "--interface", "raw", *args, backend="python")
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("pyfork: error:") and word in err
    assert not (tmp_path / "forked.marker").exists()


@pytest.mark.parametrize("var,value", [("PYFORK_WORKERS", "zero"), ("PYFORK_TIMEOUT", "x"),
                                       ("PYFORK_POLICY", "nope"), ("PYFORK_BIND", "nohost")])
def test_bad_environment_variable_exits_2(tmp_path, var, value):
    H.write_apps(tmp_path)
    r = run_cli(tmp_path, "serve", "markapp:app", "--interface", "raw", env={var: value}, backend="python")
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and err.startswith("pyfork: error:"), err
    assert not (tmp_path / "forked.marker").exists()


@pytest.mark.parametrize("app,word", [("nosuchmodule:app", "no module named 'nosuchmodule'"),
                                      ("app:nosuchattr", "no attribute"),
                                      ("broken:app", "ZeroDivisionError"),
                                      ("not a spec", "module:attribute")])
def test_app_that_cannot_be_imported_exits_2(tmp_path, app, word):
    H.write_apps(tmp_path)
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    r = run_cli(tmp_path, "serve", app, "--interface", "raw", backend="python")
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err
    assert len(err.splitlines()) == 1 and word in err, err


def test_unbindable_address_exits_2_and_forks_nothing(tmp_path, backend):
    H.write_apps(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_cli(tmp_path, "serve", "markapp:app", "--interface", "raw", "-b", f"127.0.0.1:{port}",
                    backend=backend.BACKEND)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err
    assert len(err.splitlines()) == 1 and f"cannot bind 127.0.0.1:{port}" in err, err
    assert not (tmp_path / "forked.marker").exists()


def test_c_backend_unavailable_is_a_startup_error(tmp_path):
    """--backend c without the compiled module: one line, exit 2, no fork. The child hides the
    extension (sys.modules[...] = None makes its import fail), so this runs where C is built too."""
    H.write_apps(tmp_path)
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYFORK_")}
    code = ("import sys; sys.modules['pyfork._pyfork_cffi'] = None; "
            "from pyfork.cli import main; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "serve", "markapp:app", "--interface", "raw",
                        "--backend", "c", "-b", "127.0.0.1:0"], cwd=str(tmp_path), env=e,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    err = r.stderr.decode().strip()
    assert r.returncode == 2, err
    assert len(err.splitlines()) == 1 and "backend" in err, err
    assert not (tmp_path / "forked.marker").exists()


def test_environment_configures_serve(tmp_path, backend):
    H.write_apps(tmp_path)
    env = {"PYFORK_APP": "app:app", "PYFORK_INTERFACE": "raw", "PYFORK_WORKERS": "1",
           "PYFORK_BIND": "127.0.0.1:0", "PYFORK_GRACEFUL_TIMEOUT": "5"}
    with H.Server(tmp_path, backend.BACKEND, env=env,
                  argv=[sys.executable, "-m", "pyfork", "serve"]) as srv:
        srv.start(ready=1)
        assert srv.started["workers"] == 1
        H.pid_of(srv.port)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_command_line_beats_environment():
    args = cli.build_parser().parse_args(["serve", "-w", "3"])
    s = cli.settings_from(args, environ={"PYFORK_WORKERS": "5", "PYFORK_POLICY": "least",
                                         "PYFORK_BIND": "127.0.0.1:1,[::1]:2"})
    assert s.workers == 3 and s.policy == "least"
    assert [b.text for b in s.bind] == ["127.0.0.1:1", "[::1]:2"]
    assert s.app == config.DEFAULT_APP


def test_default_workers_is_cpu_count():
    s = cli.settings_from(cli.build_parser().parse_args(["serve"]), environ={})
    assert s.workers == (os.cpu_count() or 1)
    assert [b.text for b in s.bind] == ["127.0.0.1:8000"]


@pytest.mark.parametrize("text,kind,host,port", [
    ("127.0.0.1:8000", "tcp", "127.0.0.1", 8000), ("[::1]:80", "tcp", "::1", 80),
    (":9000", "tcp", "", 9000), ("unix:/tmp/a.sock", "unix", "", 0), ("fd://3", "fd", "", 0)])
def test_parse_bind(text, kind, host, port):
    b = config.parse_bind(text)
    assert (b.kind, b.host, b.port) == (kind, host, port)


def test_no_command_is_a_usage_error(tmp_path):
    r = run_cli(tmp_path)
    assert r.returncode == 2


def test_default_app_is_the_demo(tmp_path, backend):
    with H.Server(tmp_path, backend.BACKEND,
                  argv=[sys.executable, "-m", "pyfork", "serve", "-w", "1", "-b", "127.0.0.1:0"]) as srv:
        srv.start(ready=1)
        status, body = H.http_get(srv.port, "/health")
        assert status == 200 and b"healthy" in body
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0


def test_status_command_prints_one_row_per_worker(tmp_path, backend):
    H.write_apps(tmp_path)
    ctl = str(tmp_path / "ctl.sock")
    with H.Server(tmp_path, backend.BACKEND, "--control", ctl) as srv:
        srv.start(ready=2)
        r = run_cli(tmp_path, "status", "--control", ctl)
        out = r.stdout.decode().splitlines()
        assert r.returncode == 0, r.stderr
        assert out[1].split() == ["ID", "PID", "STATE", "UPTIME", "HANDLED", "RESTARTS"]
        assert len(out) == 5 and all(" ready " in l for l in out[2:4])
        assert out[4].startswith("limits: concurrency off per worker")
        r = run_cli(tmp_path, "status", "--control", ctl, "--json")
        import json
        data = json.loads(r.stdout)
        assert len(data["workers"]) == 2 and data["ok"] is True
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    r = run_cli(tmp_path, "status", "--control", ctl)
    assert r.returncode == 1 and "cannot query" in r.stderr.decode()
