"""pytest-benchmark suites for the dispatch path: C backend, pure-Python backend
and the bare-C floor side by side in one session.

Theory of operation:
- test_dispatch: a real primary (bench/dispatch_primary.py running the
  backend's Dispatcher, or bench/floor.c) is started as a child process with 2
  workers that receive each fd and close it. The benchmark round is a client
  loop opening N TCP connections and waiting for EOF on each, so one round
  covers accept -> choose -> sendmsg -> the worker receives -> close. The
  timing is the client's wall time; the figure that matters for the primary is
  `primary_cpu_us_per_conn` in extra_info: the primary's CPU time
  (/proc/<pid>/schedstat, all threads) over the benchmark divided by the
  connections it dispatched (`primary_cpu_us_per_conn_ticks` is the same from
  /proc/<pid>/stat utime+stime, 10 ms resolution). Groups are per client
  concurrency, so the table's relative columns compare floor, c and python.
- test_channel: one send_msg + recv_msg of one fd over a SEQPACKET socketpair,
  in process, per backend: the binding's own overhead.

Run: pytest bench/ --benchmark-only [--benchmark-columns=min,median,mean,rounds]
"""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile

import pytest

import benchlib

CONNS_PER_ROUND = int(os.environ.get("PYFORK_BENCH_CONNS", "200"))
ROUNDS = int(os.environ.get("PYFORK_BENCH_ROUNDS", "25"))
WORKERS = 2


def _backend_or_skip(name: str):
    why = benchlib.backend_available(name)
    if why:
        pytest.skip(f"pyfork backend {name!r} unavailable: {why}")


def _start(target: str, floor_build, stats_file: str) -> benchlib.Server:
    if target == "floor":
        exe = floor_build[0]
        return benchlib.Server("floor", [exe, "-w", str(WORKERS), "-m", "close"], ready_line=True)
    _backend_or_skip(target)
    cmd = [sys.executable, os.path.join(benchlib.BENCH_DIR, "dispatch_primary.py"),
           "--backend", target, "--workers", str(WORKERS), "--worker", "py-close",
           "--stats-file", stats_file]
    return benchlib.Server(f"pyfork-{target}", cmd, env=benchlib.python_env(),
                           cwd=benchlib.BENCH_DIR, ready_line=True)


def _client_round(port: int, n: int, conc: int) -> None:
    """n connections, conc at a time; each ends when the worker's close reaches us."""
    addr = ("127.0.0.1", port)
    done = 0
    while done < n:
        socks = []
        for _ in range(min(conc, n - done)):
            s = socket.socket()
            s.settimeout(10)
            s.connect(addr)
            socks.append(s)
        for s in socks:
            if s.recv(1) != b"":
                raise AssertionError("the worker should close without answering")
            s.close()
        done += len(socks)


@pytest.mark.parametrize("conc", [1, 16], ids=lambda c: f"conc{c}")
@pytest.mark.parametrize("target", ["floor", "c", "python"])
def test_dispatch(benchmark, target, conc, floor_build):
    stats_file = tempfile.mktemp(prefix="pyfork-bench-", suffix=".json")
    server = _start(target, floor_build, stats_file)
    try:
        port = server.port
        _client_round(port, 20, conc)  # warm the path before measuring
        primary = benchlib.CpuMeter(server.pid).start()
        workers = [benchlib.CpuMeter(p).start() for p in benchlib.worker_pids(server.pid)]
        benchmark.group = f"dispatch: {CONNS_PER_ROUND} conns/round, client concurrency {conc}"
        benchmark.pedantic(_client_round, args=(port, CONNS_PER_ROUND, conc),
                           rounds=ROUNDS, iterations=1, warmup_rounds=1)
        primary.stop()
        for w in workers:
            w.stop()
        conns = CONNS_PER_ROUND * (ROUNDS + 1)
        benchmark.extra_info.update({
            "connections": conns,
            "primary_cpu_us_per_conn": round(primary.sched_ns / conns / 1e3, 2),
            "primary_cpu_us_per_conn_ticks": round(primary.tick_ns / conns / 1e3, 2),
            "workers_cpu_us_per_conn": round(sum(w.sched_ns for w in workers) / conns / 1e3, 2),
        })
    finally:
        server.stop()
    if os.path.exists(stats_file):
        with open(stats_file) as f:
            stats = json.load(f)
        os.unlink(stats_file)
        if stats.get("accepted"):
            benchmark.extra_info["wakeups_per_conn"] = round(stats["wakeups"] / stats["accepted"], 3)
    benchlib.DISPATCH_SUMMARY[(conc, target)] = benchmark.extra_info["primary_cpu_us_per_conn"]


@pytest.mark.parametrize("target", ["c", "python"])
def test_channel(benchmark, target):
    _backend_or_skip(target)
    import pyfork.backend
    be = pyfork.backend.load(target)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    payload_sock = socket.socket()
    fd = payload_sock.fileno()
    before = len(os.listdir("/proc/self/fd"))

    def one():
        be.send_msg(a.fileno(), be.MSG_CONN, 0, b"", [fd])
        msg = be.recv_msg(b.fileno())
        for got in msg.fds:
            os.close(got)

    try:
        benchmark.group = "channel: send_msg + recv_msg of 1 fd (in process)"
        benchmark(one)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        a.close()
        b.close()
        payload_sock.close()
