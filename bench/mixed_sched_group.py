"""Issue 10's mixed-load cell with each server in its own scheduling group, and in wrk's.

Theory of operation: compare.py starts every server in its own session
(benchlib.Server), as a new user does who starts the server in one terminal and
wrk in another. With autogroup scheduling on (/proc/sys/kernel/sched_autogroup_enabled:
on here, and by default in many distributions' kernels; it applies to processes in the
root cgroup, not inside a systemd unit's or a container's), each session is a
scheduling group, and the scheduler shares a core between groups before it shares it
between the processes of a group. On this 2-core machine the load generator then competes
with the server as a whole, not with each of its processes. This tool measures what
that changes for the light clients of the mixed-load scenario: pyfork (default
options) and gunicorn sync, each started both ways ("own": own session, as
compare.py; "same": own process group in this tool's session, so in wrk's group),
in interleaved rounds; one wrk connection keeps the slow request in flight and 4
light wrk connections (`Connection: close`) measure, as compare_mixed.py does.

Usage: python bench/mixed_sched_group.py [--rounds 4] [--slow /fibonacci?n=27]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from compare_mixed import wrk_percentiles  # noqa: E402


def servers(py: str) -> dict:
    return {
        "pyfork": [py, "-m", "pyfork", "serve", "hello_app:app", "--interface", "wsgi", "-w", "2",
                   "-b", "127.0.0.1:{port}"],
        "gunicorn sync": [py, "-m", "gunicorn", "-w", "2", "-k", "sync", "--log-level", "warning",
                          "-b", "127.0.0.1:{port}", "hello_app:app"],
    }


def measure(name: str, cmd: list, own_session: bool, slow: str, duration: int) -> dict:
    port = benchlib.free_port()
    server = benchlib.Server(name, [c.replace("{port}", str(port)) for c in cmd],
                             env=benchlib.python_env(), cwd=benchlib.BENCH_DIR, own_session=own_session)
    try:
        server.wait_http(port, 2)
        slow_wrk = benchlib.start_wrk(port, duration + 2, 1, 1, close=True, path=slow, timeout_s=10)
        try:
            time.sleep(0.5)   # the slow stream runs before the light clients start
            light = benchlib.run_wrk(port, duration, 4, 1, close=True, latency=True)
        finally:
            benchlib.finish_wrk(slow_wrk)
        return {"rps": light["rps"], "errors": light["errors"], **wrk_percentiles(light["out"])}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--duration", type=int, default=4, help="seconds of light load per measurement")
    ap.add_argument("--slow", default="/fibonacci?n=27", help="path kept in flight (/fibonacci?n=27)")
    args = ap.parse_args()
    if not benchlib.wrk_path():
        sys.exit(benchlib.WRK_HINT)
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            autogroup = f.read().strip()
    except OSError:
        autogroup = "absent"
    print(f"sched_autogroup_enabled: {autogroup}; load average {os.getloadavg()[0]:.2f}; "
          f"slow {args.slow}; 4 light clients, new connection per request", flush=True)
    cells = [(name, mode) for name in servers(sys.executable) for mode in ("own", "same")]
    res = {cell: [] for cell in cells}
    for r in range(args.rounds):
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        for name, mode in order:
            m = measure(name, servers(sys.executable)[name], mode == "own", args.slow, args.duration)
            res[(name, mode)].append(m)
            print(f"round {r + 1} {name:14s} {mode:4s} light req/s {m['rps']:7.0f} "
                  f"p99 {m.get('p99_ms', float('nan')):6.2f} ms errors {m['errors']}", flush=True)
    print("\n| session | pyfork light req/s | gunicorn sync | ratio per round | ratio median |")
    print("|---|---:|---:|---|---:|")
    for mode in ("own", "same"):
        ours = [m["rps"] for m in res[("pyfork", mode)]]
        ref = [m["rps"] for m in res[("gunicorn sync", mode)]]
        ratios = [a / b for a, b in zip(ours, ref) if b]
        print(f"| {mode} | {statistics.median(ours):,.0f} | {statistics.median(ref):,.0f} | "
              + " / ".join(f"{x:.2f}" for x in ratios) + f" | {statistics.median(ratios):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
