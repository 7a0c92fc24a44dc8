"""examples/deploy/: the systemd units, the Dockerfile and the Kubernetes manifest are the
files checked here (the HAProxy and nginx templates are tests/test_multihost.py's).

systemd: both units parse as INI, `systemd-analyze verify` accepts them (when installed; the
ExecStart binary is pointed at this environment's pyfork, nothing else changes), and
pyfork.service's ExecStart runs the way systemd would run it with pyfork.socket: the socket
passed as fd 3 with $LISTEN_FDS/$LISTEN_PID, a $NOTIFY_SOCKET that must get READY=1 only once
it serves, RELOADING=1 on ExecReload's HUP, STOPPING=1 and exit 0 on TERM within
TimeoutStopSec.
Docker cannot run here: the Dockerfile's first stage is checked by building pyfork's wheel
from exactly the files it copies, the second stage by its references to the first, and CMD's
options by `pyfork serve --check-config`.
Kubernetes: the probes ask --health-path, and terminationGracePeriodSeconds covers preStop
plus --graceful-timeout. PyYAML is not a dependency: lists are JSON arrays in the manifest,
which the stdlib reads (the whole file is also loaded when PyYAML happens to be installed).
"""
import configparser
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from supervisor_harness import wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "examples" / "deploy"
APP = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]
'''


def _pyfork_script():
    """The `pyfork` console script of the running interpreter's environment."""
    path = Path(sys.executable).parent / "pyfork"
    if not path.exists():
        pytest.skip("no pyfork console script next to the interpreter")
    return str(path)


def _unit(name):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str                       # systemd keys are case-sensitive
    cp.read_string((DEPLOY / name).read_text())
    return cp


def _option(argv, flag):
    return argv[argv.index(flag) + 1]


def _check_config(argv, cwd):
    """`pyfork serve ARGS --check-config` from `cwd`: exit code and output."""
    proc = subprocess.run([sys.executable, "-m", "pyfork", "serve", *argv, "--check-config"],
                          cwd=str(cwd), capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------- systemd

def test_systemd_units_are_valid():
    service, sock = _unit("pyfork.service"), _unit("pyfork.socket")
    svc = service["Service"]
    assert svc["Type"] in ("notify", "notify-reload")
    assert svc["KillMode"] == "mixed"              # TERM to the primary only; it drains the workers
    argv = shlex.split(svc["ExecStart"])
    assert argv[1] == "serve" and "-b" not in argv and "--bind" not in argv   # the socket's address
    assert float(svc["TimeoutStopSec"]) > float(_option(argv, "--graceful-timeout"))
    assert "pyfork.socket" in service["Unit"]["Requires"]
    assert sock["Socket"]["ListenStream"]
    if shutil.which("systemd-analyze") is None:
        return
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"pyfork-units-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        text = (DEPLOY / "pyfork.service").read_text().replace(argv[0], _pyfork_script())
        (tmp / "pyfork.service").write_text(text)
        shutil.copy(DEPLOY / "pyfork.socket", tmp / "pyfork.socket")
        proc = subprocess.run(["systemd-analyze", "verify", str(tmp / "pyfork.socket"), str(tmp / "pyfork.service")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class NotifySocket:
    """What systemd listens on for sd_notify: datagrams of KEY=VALUE lines."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.seen = []

    def wait_for(self, line, timeout=60.0):
        deadline = time.monotonic() + timeout
        while line not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line} from pyfork; got {self.seen}")
            self.sock.settimeout(left)
            try:
                self.seen.extend(self.sock.recv(4096).decode().splitlines())
            except socket.timeout:
                continue

    def close(self):
        self.sock.close()


def _get(port, path):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return int(out.split(b" ", 2)[1]), out.partition(b"\r\n\r\n")[2]


@pytest.mark.usefixtures("fd_guard")
def test_systemd_service_under_socket_activation(tmp_path):
    """pyfork.service's ExecStart, run as systemd runs it with pyfork.socket and Type=notify."""
    svc = _unit("pyfork.service")["Service"]
    argv = shlex.split(svc["ExecStart"])
    (tmp_path / "app.py").write_text(APP)                  # WorkingDirectory holds the app
    run_dir = tmp_path / "run"                             # RuntimeDirectory=pyfork
    run_dir.mkdir()
    args = [a.replace("/run/pyfork", str(run_dir)) for a in argv[1:]]
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    notify = NotifySocket(tmp_path / "notify")
    proc = None
    try:
        listener.bind(("127.0.0.1", 0))                    # ListenStream, on a free port
        listener.listen(int(_unit("pyfork.socket")["Socket"]["Backlog"]))
        port = listener.getsockname()[1]
        fd = listener.fileno()
        # The socket as fd 3 and LISTEN_PID = the pid that execs pyfork, as systemd does.
        shell = f'exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=pyfork.socket exec "$@"'
        env = dict(os.environ, NOTIFY_SOCKET=notify.path, PYTHONUNBUFFERED="1")
        for key in [k for k in env if k.startswith("PYFORK_") and k != "PYFORK_BACKEND"]:
            del env[key]
        proc = subprocess.Popen(["bash", "-c", shell, "bash", sys.executable, "-m", "pyfork", *args],
                                cwd=str(tmp_path), env=env, pass_fds=(fd,), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        listener.close()                                   # pyfork holds it now, as systemd would
        notify.wait_for("READY=1")
        assert _get(port, "/") == (200, b"hello")
        assert _get(port, _option(argv, "--health-path"))[0] == 200
        # ExecReload: a rolling restart says RELOADING=1, then READY=1 again.
        notify.seen.clear()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1")
        notify.wait_for("READY=1")
        assert _get(port, "/") == (200, b"hello")
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(float(svc["TimeoutStopSec"])) == 0, proc.stderr.read().decode()
    finally:
        if proc is not None:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
            proc.stderr.close()
        listener.close()
        notify.close()


# ---------------------------------------------------------------------------------- Docker

def _dockerfile_stages():
    """[(name, [instruction lines])] of examples/deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?$", line, re.I)
            assert m, line
            stages.append((m.group(1), []))
        else:
            assert stages, f"instruction before FROM: {line}"
            stages[-1][1].append(line)
    return stages


def test_dockerfile_stages_reference_what_exists(tmp_path):
    stages = _dockerfile_stages()
    assert len(stages) == 2 and stages[0][0], "multi-stage: a named build stage, then the image"
    build_name, build = stages[0]
    _, image = stages[1]
    copied = []
    for line in build:
        if line.upper().startswith("COPY "):
            parts = shlex.split(line)[1:]
            assert not parts[0].startswith("--from"), line
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"the build stage copies {src}, which is not in the repository"
                copied.append(src)
    assert any("pip wheel" in line for line in build)
    assert any(re.match(rf"COPY --from={build_name} ", line) for line in image), \
        "the image stage takes the wheels from the build stage"
    # CMD's options are valid pyfork options (ENTRYPOINT is `pyfork serve`).
    entry = json.loads(next(line for line in image if line.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    cmd = json.loads(next(line for line in image if line.startswith("CMD "))[len("CMD "):])
    assert entry == ["pyfork", "serve"]
    code, out = _check_config(cmd, tmp_path)
    assert code == 0, out
    # The HEALTHCHECK asks the --health-path CMD turns on, on CMD's port.
    health = next(line for line in image if line.startswith("HEALTHCHECK "))
    port = _option(cmd, "--bind").rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}{_option(cmd, '--health-path')}'" in health
    # The first stage builds pyfork's wheel from exactly the files it copies.
    src = tmp_path / "src"
    src.mkdir()
    for rel in copied:
        path = ROOT / rel
        if path.is_dir():
            shutil.copytree(path, src / rel, ignore=shutil.ignore_patterns("__pycache__", "*.so", "build"))
        else:
            shutil.copy(path, src / rel)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                           str(tmp_path / "wheels"), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheels = list((tmp_path / "wheels").glob("pyfork-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "pyfork/cli.py" in names and any(n.startswith("pyfork/_pyfork_cffi") for n in names), names


# ---------------------------------------------------------------------------------- Kubernetes

def _k8s_json_list(text, key, after=None):
    """The JSON-array value of the first `key: [...]` line (after the line matching `after`)."""
    start = text.index(after) if after else 0
    m = re.compile(rf"^\s*{key}:\s*(\[.*\])\s*$", re.M).search(text, start)
    assert m, f"no {key}: [...] line"
    return json.loads(m.group(1))


def test_kubernetes_deployment_matches_pyfork_options(tmp_path):
    text = (DEPLOY / "k8s.yaml").read_text()
    assert "\t" not in text
    args = _k8s_json_list(text, "args")
    grace = int(re.search(r"^\s*terminationGracePeriodSeconds:\s*(\d+)\s*$", text, re.M).group(1))
    pre_stop = _k8s_json_list(text, "command", after="preStop:")
    assert pre_stop[0] == "sleep"
    graceful = float(_option(args, "--graceful-timeout"))
    drain_delay = float(_option(args, "--drain-delay")) if "--drain-delay" in args else 0.0
    # The kubelet's SIGKILL comes after preStop plus everything pyfork may take to stop.
    assert grace >= float(pre_stop[1]) + drain_delay + graceful
    assert grace <= float(pre_stop[1]) + drain_delay + graceful + 15, "a grace period far beyond the stop"
    health = _option(args, "--health-path")
    port = _option(args, "--bind").rsplit(":", 1)[1]
    probes = re.findall(r"^\s*(\w+Probe):\s*\n\s*httpGet:\s*\n\s*path:\s*(\S+)\s*\n\s*port:\s*(\d+)\s*$",
                        text, re.M)
    assert sorted(p[0] for p in probes) == ["livenessProbe", "readinessProbe"]
    assert all((path, p) == (health, port) for _, path, p in probes), probes
    assert re.search(rf"^\s*containerPort:\s*{port}\s*$", text, re.M)
    code, out = _check_config(args, tmp_path)
    assert code == 0, out
    try:
        import yaml
    except ImportError:
        return
    docs = list(yaml.safe_load_all(text))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["terminationGracePeriodSeconds"] == grace and container["args"] == args
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == health
    assert container["lifecycle"]["preStop"]["exec"]["command"] == pre_stop
