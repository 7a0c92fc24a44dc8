"""pytest-benchmark: the embedded C example's primary CPU per connection, against the floor.

Theory of operation: examples/embed_c/server.c (a primary on libpyfork's dispatcher, built
with its Makefile against the INSTALLED pyfork, as an embedder would) and bench/floor.c in
http mode (the bare-C floor: accept, sendmsg, nothing else) both run 2 forked C workers
answering hello world with Connection: close. A benchmark round is N real HTTP requests,
`conc` at a time, each on its own connection. The figure is the primary's CPU per
connection (/proc/<pid>/schedstat) in extra_info, and for the embedded server its ratio to
the floor measured just before in the same session: `primary_cpu_x_floor`. The floor runs
first (parametrize order); without it the ratio is left out.

Run: pytest bench/test_embed.py --benchmark-only
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

import benchlib

CONNS_PER_ROUND = int(os.environ.get("PYFORK_BENCH_CONNS", "200"))
ROUNDS = int(os.environ.get("PYFORK_BENCH_ROUNDS", "25"))
WORKERS = 2
EXAMPLE = os.path.join(benchlib.REPO_DIR, "examples", "embed_c")
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

FLOOR_US: dict = {}     # conc -> the floor's primary µs per connection, this session


@pytest.fixture(scope="module")
def embed_build():
    """The example server built from the installed pyfork (skip when that cannot be done)."""
    try:
        import pyfork
        if not os.path.exists(os.path.join(pyfork.get_library_dir(), "libpyfork.a")):
            pytest.skip("pyfork is not installed from a wheel (no libpyfork.a)")
    except ImportError:
        pytest.skip("pyfork is not installed")
    if not (shutil.which("make") and shutil.which("pkg-config")):
        pytest.skip("make and pkg-config are needed to build examples/embed_c")
    out = tempfile.mkdtemp(prefix="pyfork-bench-embed-")
    src = os.path.join(out, "embed_c")
    shutil.copytree(EXAMPLE, src)
    subprocess.run(["make", "-s", f"PYTHON={sys.executable}"], cwd=src, check=True)
    yield os.path.join(src, "server")
    shutil.rmtree(out, ignore_errors=True)


def _http_round(port: int, n: int, conc: int) -> None:
    """n requests, conc connections at a time; each ends at the server's close."""
    addr = ("127.0.0.1", port)
    done = 0
    while done < n:
        socks = []
        for _ in range(min(conc, n - done)):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(REQUEST)
            socks.append(s)
        for s in socks:
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            s.close()
            if not data.startswith(b"HTTP/1.1 200"):
                raise AssertionError(f"bad response {data[:80]!r}")
        done += len(socks)


@pytest.mark.parametrize("conc", [1, 16], ids=lambda c: f"conc{c}")
@pytest.mark.parametrize("target", ["floor", "embed_c"])
def test_embed_primary_cpu(benchmark, target, conc, floor_build, embed_build):
    if target == "floor":
        cmd = [floor_build[0], "-w", str(WORKERS), "-m", "http"]
    else:
        cmd = [embed_build, "0", str(WORKERS)]
    server = benchlib.Server(target, cmd, ready_line=True)
    try:
        _http_round(server.port, 20, conc)      # warm the path before measuring
        primary = benchlib.CpuMeter(server.pid).start()
        benchmark.group = f"embedded C primary: {CONNS_PER_ROUND} HTTP conns/round, concurrency {conc}"
        benchmark.pedantic(_http_round, args=(server.port, CONNS_PER_ROUND, conc),
                           rounds=ROUNDS, iterations=1, warmup_rounds=1)
        primary.stop()
    finally:
        server.stop()
    conns = CONNS_PER_ROUND * (ROUNDS + 1)
    us = round(primary.sched_ns / conns / 1e3, 2)
    benchmark.extra_info.update({"connections": conns, "primary_cpu_us_per_conn": us})
    if target == "floor":
        FLOOR_US[conc] = us
    elif FLOOR_US.get(conc):
        benchmark.extra_info["primary_cpu_x_floor"] = round(us / FLOOR_US[conc], 2)
