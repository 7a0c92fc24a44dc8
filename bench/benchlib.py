"""Shared helpers for pyfork's benchmarks (bench/ only; not part of the package).

Theory of operation: every benchmark here starts real servers as child
processes on loopback, loads them with a bounded client (wrk or a small Python
client) and reads cost from /proc: CPU time of the primary from
/proc/<pid>/schedstat (nanoseconds, all threads) with /proc/<pid>/stat
utime+stime (clock ticks) as a cross-check, RSS from /proc/<pid>/status and
unique memory (USS = Private_Clean + Private_Dirty) from smaps_rollup. The
bare-C floor (floor.c) is compiled here with gcc on first use into bench/.build.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(BENCH_DIR)
BUILD_DIR = os.path.join(BENCH_DIR, ".build")
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (client concurrency, target) -> primary CPU µs per connection, filled by
# test_dispatch and printed by conftest's terminal summary.
DISPATCH_SUMMARY: dict = {}


# ---------------------------------------------------------------- the floor

class Unavailable(RuntimeError):
    """A benchmark participant (gcc, a backend, wrk, node, a peer) is missing."""


def build_floor() -> tuple[str, str]:
    """Returns (floor executable, floor shared library), compiled once per source hash."""
    src = os.path.join(BENCH_DIR, "floor.c")
    with open(src, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()[:12]
    exe = os.path.join(BUILD_DIR, f"floor-{digest}")
    lib = os.path.join(BUILD_DIR, f"floor-{digest}.so")
    if os.path.exists(exe) and os.path.exists(lib):
        return exe, lib
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if not cc:
        raise Unavailable("no C compiler (gcc) to build bench/floor.c")
    os.makedirs(BUILD_DIR, exist_ok=True)
    # Build to temp names and rename, so concurrent sessions never see half a file.
    for out, extra in ((exe, []), (lib, ["-shared", "-fPIC", "-DFLOOR_LIB"])):
        tmp = f"{out}.{os.getpid()}.tmp"
        subprocess.run([cc, "-O2", "-Wall", *extra, "-o", tmp, src], check=True)
        os.replace(tmp, out)
    return exe, lib


# ---------------------------------------------------------------- pyfork availability

def python_env(extra: dict | None = None) -> dict:
    """Environment for Python children: the checkout on PYTHONPATH unless pyfork is installed."""
    env = dict(os.environ)
    env.pop("PYFORK_BACKEND", None)
    paths = [BENCH_DIR]
    if not pyfork_installed():
        paths.append(REPO_DIR)
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra or {})
    return env


_installed_cache: dict[str, bool] = {}


def pyfork_installed() -> bool:
    """True when `import pyfork` works from a directory outside the checkout."""
    if "x" not in _installed_cache:
        r = subprocess.run([sys.executable, "-c", "import pyfork"], cwd="/",
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                           capture_output=True)
        _installed_cache["x"] = r.returncode == 0
    return _installed_cache["x"]


def backend_available(name: str) -> str | None:
    """Returns None when pyfork's backend `name` loads in a child, else the reason."""
    code = ("import pyfork.backend as b; m = b.load(%r); "
            "assert m.BACKEND == %r, m.BACKEND; m.Dispatcher" % (name, name))
    r = subprocess.run([sys.executable, "-c", code], env=python_env(), cwd=BENCH_DIR,
                       capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


def pyfork_cli_available() -> str | None:
    """Returns None when `python -m pyfork serve --help` works, else the reason."""
    r = subprocess.run([sys.executable, "-m", "pyfork", "serve", "--help"], env=python_env(),
                       cwd=BENCH_DIR, capture_output=True, text=True, timeout=60)
    if r.returncode == 0:
        return None
    lines = (r.stderr or r.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {r.returncode}"


# ---------------------------------------------------------------- /proc readers

def cpu_ns(pid: int) -> int:
    """On-CPU time of every thread of pid in ns (schedstat: exact, not tick-sampled)."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread ended between listdir and open
    return total


def cpu_ticks_ns(pid: int) -> int:
    """utime+stime of pid from /proc/<pid>/stat, in ns (10 ms resolution at 100 Hz)."""
    with open(f"/proc/{pid}/stat") as f:
        # comm may contain spaces: split after the closing parenthesis.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // CLK_TCK


class CpuMeter:
    """CPU of one process between start() and stop(), both ways of reading it."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sched0 = self.tick0 = 0
        self.sched_ns = self.tick_ns = 0

    def start(self):
        self.sched0, self.tick0 = cpu_ns(self.pid), cpu_ticks_ns(self.pid)
        return self

    def stop(self):
        self.sched_ns = cpu_ns(self.pid) - self.sched0
        self.tick_ns = cpu_ticks_ns(self.pid) - self.tick0
        return self


def status_kb(pid: int, key: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def smaps_rollup(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    return out


def memory_kb(pid: int) -> dict:
    """rss, pss, uss (Private_Clean + Private_Dirty) of pid in kB."""
    s = smaps_rollup(pid)
    return {"rss": s.get("Rss", 0), "pss": s.get("Pss", 0),
            "uss": s.get("Private_Clean", 0) + s.get("Private_Dirty", 0)}


def children(pid: int) -> list[int]:
    """Direct children of pid (every thread's list)."""
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    kids.extend(int(x) for x in f.read().split())
            except FileNotFoundError:
                pass
    except FileNotFoundError:
        pass
    return kids


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except FileNotFoundError:
        return ""


def worker_pids(primary: int) -> list[int]:
    """Children of the primary that serve: leaves out multiprocessing's resource tracker."""
    return sorted(p for p in children(primary)
                  if "resource_tracker" not in cmdline(p) and "semaphore_tracker" not in cmdline(p))


# ---------------------------------------------------------------- statistics

def nearest_rank(values, p: float) -> float:
    """The p-th percentile by nearest rank: the smallest value with at least p % of them
    at or below it (NaN when there are none)."""
    s = sorted(values)
    if not s:
        return math.nan
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def rank_from_worst(count: int, p: float) -> str:
    """Which value of `count` nearest_rank(.., p) is, counted from the worst: "5th-worst"."""
    k = count - max(0, math.ceil(p / 100 * count) - 1)
    if k == 1:
        return "worst"
    suffix = "th" if k % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}-worst"


# ---------------------------------------------------------------- sockets and HTTP

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recv_all(s: socket.socket) -> bytes:
    """Everything the peer sends until it closes."""
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET with Connection: close; returns (status, body). Raises OSError on failure."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = recv_all(s)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise OSError(f"not an HTTP response: {data[:60]!r}")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = dechunk(body)
    return status, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return out


PID_RE = re.compile(rb"pid=(\d+)")


def body_pid(body: bytes) -> int | None:
    m = PID_RE.search(body)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- wrk

def wrk_path() -> str | None:
    return shutil.which("wrk")


WRK_HINT = "wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu)"


def _to_us(val: str, unit: str) -> float:
    return float(val) * {"us": 1, "ms": 1e3, "s": 1e6, "m": 6e7, "h": 3.6e9}[unit]


def wrk_cmd(port: int, duration: float, conns: int, threads: int = 2, close: bool = True,
            path: str = "/", script: str | None = None, timeout_s: int = 5,
            latency: bool = False) -> list[str]:
    exe = wrk_path()
    if not exe:
        raise Unavailable(WRK_HINT)
    threads = max(1, min(threads, conns))
    cmd = [exe, f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
           f"--timeout={timeout_s}s"]
    if close:
        cmd += ["-H", "Connection: close"]
    if latency:
        cmd.append("--latency")
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    return cmd


def start_wrk(*args, **kw) -> subprocess.Popen:
    """wrk in the background (for scenarios that act on the server while it runs)."""
    return subprocess.Popen(wrk_cmd(*args, **kw), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_wrk(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    return parse_wrk(out)


def run_wrk(port: int, duration: float, conns: int, threads: int = 2, close: bool = True,
            path: str = "/", script: str | None = None, timeout_s: int = 5,
            latency: bool = False) -> dict:
    """Runs wrk against 127.0.0.1:port and returns parse_wrk() of its output."""
    cmd = wrk_cmd(port, duration, conns, threads, close, path, script, timeout_s, latency)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    return parse_wrk(r.stdout + r.stderr)


def parse_wrk(out: str) -> dict:
    """Keys: requests, rps, errors (socket errors + non-2xx/3xx), socket_errors, non2xx,
    lat_avg_us, p50_us/p90_us/p99_us (with --latency), pids ({pid: count} from pidcount.lua), out."""
    res = {"requests": 0, "rps": 0.0, "errors": 0, "non2xx": 0, "out": out}
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        res["rps"] = float(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                        map(int, m.groups())))
        res["errors"] += sum(map(int, m.groups()))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        res["non2xx"] = int(m.group(1))
        res["errors"] += int(m.group(1))
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out)
    if m:
        res["lat_avg_us"] = _to_us(*m.groups())
    for pct, key in (("50", "p50_us"), ("90", "p90_us"), ("99", "p99_us")):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            res[key] = _to_us(*m.groups())
    pids = {int(a): int(b) for a, b in re.findall(r"^PIDCOUNT (\d+) (\d+)$", out, re.M)}
    if pids:
        res["pids"] = pids
    return res


# ---------------------------------------------------------------- server processes

class Server:
    """A server started as a child process in its own session, and so its own process
    group (stop() signals the group: every process it forked). `pid` is the
    primary/arbiter/supervisor.

    own_session=False: its own process group only, in the caller's session. Where
    autogroup scheduling is on (/proc/sys/kernel/sched_autogroup_enabled; it applies to
    processes in the root cgroup), a session is a scheduling group: the CPU is shared
    between groups first, so a server in its own session and a load generator in the
    caller's share it unlike processes of one group (mixed_sched_group.py measures
    what that changes)."""

    def __init__(self, name: str, cmd: list[str], env: dict | None = None, cwd: str | None = None,
                 log_path: str | None = None, ready_line: bool = False, own_session: bool = True):
        self.name, self.cmd = name, cmd
        self.log_path = log_path or os.devnull
        self._log = open(self.log_path, "ab")
        group = {"start_new_session": True} if own_session else {"process_group": 0}
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, **group,
            stdout=subprocess.PIPE if ready_line else self._log, stderr=self._log)
        self.pid = self.proc.pid
        self.port: int | None = None
        if ready_line:
            self.port = self._read_ready()

    def _read_ready(self, timeout: float = 30.0) -> int:
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        buf = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sel.select(max(0.0, deadline - time.monotonic())):
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            m = re.search(rb"READY (\d+)", buf)
            if m:
                sel.close()
                return int(m.group(1))
        sel.close()
        self.stop()
        raise RuntimeError(f"{self.name}: no READY line within {timeout} s: {buf[-500:]!r} "
                           f"(log: {self.log_path})")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_http(self, port: int, workers: int, timeout: float = 30.0) -> None:
        """Waits until the port answers 200 and the primary has `workers` serving children."""
        self.port = port
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; "
                                   f"log: {self.log_path}\n{tail(self.log_path)}")
            try:
                status, _ = http_get(port, "/", timeout=2)
                if status == 200 and len(worker_pids(self.pid)) >= workers:
                    return
                last = f"status {status}, {len(worker_pids(self.pid))} workers"
            except OSError as e:
                last = repr(e)
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout} s ({last}); log: "
                           f"{self.log_path}\n{tail(self.log_path)}")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the primary, wait, then SIGKILL the whole session if anything is left."""
        if self.alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.pid, signal.SIGKILL)  # our process group: only what we started
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()


def tail(path: str, n: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "python": sys.version.split()[0],
            "kernel": os.uname().release}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["mem_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return info
