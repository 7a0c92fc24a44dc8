"""System calls, sleeps and CPU per connection in each process of `pyfork serve`.

Theory of operation: wake-ups are most of what a connection costs at low concurrency (a
process that sleeps and is woken pays the scheduler twice), and they are invisible in req/s,
which this 2-core machine moves by ±15 % from one minute to the next. Counts are not so
noisy. This starts `pyfork serve hello_app:app -w 2` (WSGI) with each given interpreter,
runs wrk with `Connection: close` at --conns clients, optionally while one more wrk keeps a
slow request in flight (--slow, as the mixed-load scenario does), and counts with
`perf stat`, per process (the primary and each worker): the syscall tracepoints below,
epoll waits that timed out, and context switches. Each count is divided by the connections
wrk completed; CPU per connection is from /proc. Builds are interleaved round by round.

Needs `perf` with tracepoint access (root, or kernel.perf_event_paranoid <= -1).

Usage: python bench/syscalls_per_conn.py [--python A --python B] [--conns 4] [--rounds 2]
                                         [--slow /fibonacci?n=27] [--duration 4]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

SYSCALLS = ("epoll_pwait2", "epoll_wait", "accept4", "sendmsg", "recvmsg", "recvfrom", "close")
TIMEOUTS = "epoll_pwait2 timeouts"


def perf_stat(pid: int, out: str) -> subprocess.Popen:
    events = [f"syscalls:sys_enter_{s}" for s in SYSCALLS] + ["context-switches"]
    return subprocess.Popen(
        ["perf", "stat", "-x,", "-o", out, "-e", ",".join(events),
         "-e", "syscalls:sys_exit_epoll_pwait2", "--filter", "ret == 0", "-p", str(pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_stat(path: str) -> dict:
    """{event: count} from perf stat -x, output."""
    res = {}
    with open(path) as f:
        for line in f:
            cols = line.strip().split(",")
            if len(cols) > 3 and cols[0].replace(".", "").isdigit():
                name = cols[2].replace("syscalls:sys_enter_", "")
                res[TIMEOUTS if name == "syscalls:sys_exit_epoll_pwait2" else name] = float(cols[0])
    return res


def measure(py: str, args, tmp: str) -> dict:
    port = benchlib.free_port()
    srv = benchlib.Server(py, [py, "-m", "pyfork", "serve", "hello_app:app", "--interface", "wsgi",
                               "-w", "2", "-b", f"127.0.0.1:{port}"],
                          env=benchlib.python_env({"PYFORK_BACKEND": "c"}), cwd=benchlib.BENCH_DIR)
    slow = None
    try:
        srv.wait_http(port, 2)
        pids = [srv.pid] + benchlib.worker_pids(srv.pid)
        if args.slow:
            slow = benchlib.start_wrk(port, args.duration + 2, 1, 1, close=True, path=args.slow,
                                      timeout_s=10)
            time.sleep(0.5)
        stats = [perf_stat(p, os.path.join(tmp, f"{i}.stat")) for i, p in enumerate(pids)]
        time.sleep(0.3)     # perf attached before the load starts
        cpu0 = {p: benchlib.cpu_ns(p) for p in pids}
        res = benchlib.run_wrk(port, args.duration, args.conns, 1, close=True)
        cpu1 = {p: benchlib.cpu_ns(p) for p in pids}
        for s in stats:
            s.send_signal(signal.SIGINT)
        for s in stats:
            s.wait()
        n = res["requests"]
        rows = []
        for i, p in enumerate(pids):
            counts = read_stat(os.path.join(tmp, f"{i}.stat"))
            rows.append({"process": "primary" if i == 0 else f"worker {i}",
                         "cpu_us": (cpu1[p] - cpu0[p]) / 1e3 / n,
                         **{k: v / n for k, v in counts.items()}})
        return {"rps": res["rps"], "rows": rows}
    finally:
        if slow is not None:
            benchlib.finish_wrk(slow)
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", action="append", help="interpreter with pyfork installed "
                    "(repeat to compare builds; default: this one)")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--slow", default="", help="path kept in flight by one more client, "
                    "e.g. /fibonacci?n=27 (default: none)")
    args = ap.parse_args()
    if not shutil.which("perf") or not benchlib.wrk_path():
        print("needs perf and wrk (apt-get install -y linux-perf wrk)", file=sys.stderr)
        return 2
    pys = args.python or [sys.executable]
    cols = ["cpu_us", "context-switches", *SYSCALLS, TIMEOUTS]
    print(f"per connection; wrk -c{args.conns} Connection: close"
          + (f", slow {args.slow} in flight" if args.slow else "") + f"; {args.rounds} round(s)\n")
    print("| build | round | req/s | process | µs CPU | " + " | ".join(cols[1:]) + " |")
    print("|---|---:|---:|---|---:|" + "---:|" * (len(cols) - 1))
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for py in (pys if r % 2 == 0 else pys[::-1]):
                m = measure(py, args, tmp)
                for row in m["rows"]:
                    vals = " | ".join(f"{row.get(c, 0):.2f}" for c in cols[1:])
                    print(f"| {py} | {r + 1} | {m['rps']:,.0f} | {row['process']} | "
                          f"{row['cpu_us']:.1f} | {vals} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
