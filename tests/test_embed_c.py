"""The C embedding example (examples/embed_c/) built against the INSTALLED package.

Theory of operation: the example's sources are copied to a temporary directory and built
with the system cc, taking pyfork.h, libpyfork.a and pyfork.pc from the pyfork that this
interpreter imports (pyfork.get_library_dir(): site-packages, not the source tree) through
pkg-config (the example's Makefile) or CMake's find_package (its CMakeLists.txt). The
server then runs as a real prefork server: real HTTP from several client threads, the
primary's open-fd count before and after the load, a worker SIGKILLed and replaced, and a
graceful SIGTERM that exits 0 with every worker gone. A header that disagrees with the
library (PF_VERSION edited) makes the program refuse to start (PF_ABI_CHECK).
"""
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import pyfork

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "embed_c")
BODY = re.compile(rb"hello world from worker (\d+)\n")
TIMEOUT = 30.0

pytestmark = pytest.mark.usefixtures("fd_guard")


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed to build the C embedding example")
    return path


def _copy_example(tmp_path):
    src = tmp_path / "embed_c"
    shutil.copytree(EXAMPLE, src)
    return src


def build_with_make(tmp_path):
    _tool("cc")
    _tool("pkg-config")
    _tool("make")
    src = _copy_example(tmp_path)
    subprocess.run(["make", "-s", f"PYTHON={sys.executable}"], cwd=src, check=True,
                   capture_output=True, timeout=120)
    return src / "server"


def get(port, path="/"):
    """One HTTP/1.1 request with Connection: close; returns (status line, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


class Server:
    """The example server as a child process: `port`, `get()`, `fds()`, `stop()`."""

    def __init__(self, exe, workers=2):
        self.proc = subprocess.Popen([str(exe), "0", str(workers)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        line = self._line()                               # "READY <port>": every worker READY
        assert line.startswith("READY "), line
        self.port = int(line.split()[1])

    def _line(self):
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        assert ready, "the C server printed nothing in time"
        return self.proc.stdout.readline().decode().strip()

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return code


def _gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_installed_files_are_the_wheels():
    """The header and library come from the installed package, with only pf_* exported."""
    lib = os.path.join(pyfork.get_library_dir(), "libpyfork.a")
    assert os.path.isfile(os.path.join(pyfork.get_include(), "pyfork.h"))
    assert os.path.isfile(lib)
    assert os.path.isfile(os.path.join(pyfork.get_library_dir(), "pkgconfig", "pyfork.pc"))
    assert os.path.isfile(os.path.join(pyfork.get_cmake_dir(), "pyforkConfig.cmake"))
    assert not pyfork.get_include().startswith(os.path.dirname(EXAMPLE)), "not the source tree"
    out = subprocess.run([_tool("nm"), "-g", "--defined-only", lib], check=True, capture_output=True,
                         text=True).stdout
    names = [line.split()[-1] for line in out.splitlines() if re.match(r"^[0-9a-f]+ \w ", line)]
    assert "pf_dispatcher_new" in names and "pf_abi_check" in names
    assert [n for n in names if not n.startswith("pf_") or n.startswith("pf__")] == []


def test_c_server_answers_http_from_forked_workers(tmp_path):
    server = Server(build_with_make(tmp_path), workers=2)
    try:
        fds_before = server.fds()
        results, errors = [], []

        def client():
            try:
                for _ in range(10):
                    results.append(get(server.port))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        assert errors == []
        assert len(results) == 60
        pids = set()
        for status, body in results:
            assert status == b"HTTP/1.1 200 OK"
            m = BODY.fullmatch(body)
            assert m, body
            pids.add(int(m.group(1)))
        assert len(pids) == 2                 # round robin over both workers
        assert server.proc.pid not in pids
        assert server.fds() == fds_before     # the primary holds no connection afterwards

        # A worker that dies is replaced; clients keep being answered.
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + TIMEOUT
        seen = set()
        while time.monotonic() < deadline and not (seen - pids):
            status, body = get(server.port)
            assert status == b"HTTP/1.1 200 OK"
            seen.add(int(BODY.fullmatch(body).group(1)))
        assert seen - pids, "no replacement worker answered"
        assert victim not in seen
        workers = (pids | seen) - {victim}
    finally:
        code = server.stop()
    assert code == 0
    deadline = time.monotonic() + TIMEOUT
    while not all(_gone(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(p) for p in workers)


def test_c_server_builds_with_cmake_find_package(tmp_path):
    cmake = _tool("cmake")
    src = _copy_example(tmp_path)
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(src), "-B", str(build), f"-Dpyfork_DIR={pyfork.get_cmake_dir()}"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([cmake, "--build", str(build)], check=True, capture_output=True, timeout=120)
    server = Server(build / "server", workers=1)
    try:
        status, body = get(server.port)
        assert status == b"HTTP/1.1 200 OK" and BODY.fullmatch(body)
    finally:
        assert server.stop() == 0


def test_mismatched_header_refuses_to_start(tmp_path):
    """pyfork.h from "another version" (PF_VERSION changed) with this libpyfork.a: exit 2."""
    cc = _tool("cc")
    inc = tmp_path / "include"
    inc.mkdir()
    header = open(os.path.join(pyfork.get_include(), "pyfork.h")).read()
    header, n = re.subn(r"#define PF_VERSION (\d+)", lambda m: f"#define PF_VERSION {int(m.group(1)) + 1}",
                        header)
    assert n == 1
    (inc / "pyfork.h").write_text(header)
    exe = tmp_path / "server"
    subprocess.run([cc, "-O1", f"-I{inc}", "-o", str(exe), os.path.join(EXAMPLE, "server.c"),
                    f"-L{pyfork.get_library_dir()}", "-lpyfork"], check=True, capture_output=True, timeout=120)
    done = subprocess.run([str(exe), "0", "1"], capture_output=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert b"pyfork.h does not match libpyfork.a" in done.stderr
