"""Primary CPU per connection under wrk load: bare-C floor, pyfork C backend,
pyfork pure-Python backend, Node cluster round robin -- in one run.

Theory of operation: every target is a "primary accepts, 2 workers serve"
server answering a hello-world response with Connection: close. The floor and
both pyfork backends use byte-for-byte the same C worker (floor.c's
floor_worker; for pyfork it runs inside workers forked by
bench/dispatch_primary.py around the backend's Dispatcher), so the only thing
that differs is the primary. All servers are started first and then measured
in interleaved rounds (floor, c, python, node, floor, c, ...) so drift from
other load on the machine hits every target alike. Per round: the primary's
CPU from /proc/<pid>/schedstat (and /proc/<pid>/stat ticks) before and after
`wrk -H "Connection: close"`, divided by the requests wrk completed (one
connection each). The table reports the median over rounds and the min-max.

With --full (default when `pyfork serve` works) two more rows run the real
CLI (`pyfork serve hello_app:raw --interface raw`, Python workers), whose
primary is the whole supervisor.

The targets (bench/README.md): C <= 0.5 x pure and C <= 1.25 x floor.

Usage: python bench/primary_cpu.py [--duration 4] [--rounds 3] [--conns 32]
       [--workers 2] [--no-node] [--no-full] [--out bench/results/primary_cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402


def stats_path(log_dir, be):
    """Where dispatch_primary.py writes its Dispatcher.stats() on exit."""
    return os.path.join(log_dir, f"primary_cpu-pyfork-{be}.stats.json")


def start_targets(args, log_dir) -> tuple[dict, list[str]]:
    """Starts every available target; returns ({name: Server}, [skip lines])."""
    servers, skipped = {}, []
    exe, _ = benchlib.build_floor()
    py = sys.executable
    prim = os.path.join(benchlib.BENCH_DIR, "dispatch_primary.py")

    def log(name):
        return os.path.join(log_dir, f"primary_cpu-{name}.log")

    servers["floor"] = benchlib.Server("floor", [exe, "-w", str(args.workers), "-m", "http"],
                                       log_path=log("floor"), ready_line=True)
    if args.nodelay_floor:
        servers["floor+nodelay"] = benchlib.Server(
            "floor+nodelay", [exe, "-w", str(args.workers), "-m", "http", "-n"],
            log_path=log("floor-nodelay"), ready_line=True)
    for be in ("c", "python"):
        why = benchlib.backend_available(be)
        if why:
            skipped.append(f"pyfork-{be}: skipped, backend unavailable ({why})")
            continue
        servers[f"pyfork-{be}"] = benchlib.Server(
            f"pyfork-{be}", [py, prim, "--backend", be, "--workers", str(args.workers),
                             "--worker", "c-http", "--stats-file", stats_path(log_dir, be)],
            env=benchlib.python_env(), cwd=benchlib.BENCH_DIR, log_path=log(f"pyfork-{be}"),
            ready_line=True)
    if args.node:
        import shutil
        if not shutil.which("node"):
            skipped.append("node-rr: skipped, `node` not installed")
        else:
            port = benchlib.free_port()
            s = benchlib.Server("node-rr", ["node", os.path.join(benchlib.BENCH_DIR, "node_cluster.js")],
                                env={**os.environ, "PORT": str(port), "WORKERS": str(args.workers),
                                     "NODE_CLUSTER_SCHED_POLICY": "rr"},
                                log_path=log("node-rr"))
            s.wait_http(port, args.workers)
            servers["node-rr"] = s
    if args.full:
        why = benchlib.pyfork_cli_available()
        if why:
            skipped.append(f"pyfork serve rows: skipped, CLI unavailable ({why})")
        else:
            for be in ("c", "python"):
                if f"pyfork-{be}" not in servers:
                    continue
                port = benchlib.free_port()
                name = f"pyfork-serve-{be}"
                s = benchlib.Server(name, [py, "-m", "pyfork", "serve", "hello_app:raw",
                                           "--interface", "raw", "--backend", be,
                                           "-w", str(args.workers), "-b", f"127.0.0.1:{port}"],
                                    env=benchlib.python_env(), cwd=benchlib.BENCH_DIR,
                                    log_path=log(name))
                s.wait_http(port, args.workers)
                servers[name] = s
    return servers, skipped


def measure(server, args) -> dict:
    meter = benchlib.CpuMeter(server.pid).start()
    res = benchlib.run_wrk(server.port, args.duration, args.conns, args.threads, close=True)
    meter.stop()
    n = max(1, res["requests"])
    return {"us_per_conn": meter.sched_ns / n / 1e3, "us_per_conn_ticks": meter.tick_ns / n / 1e3,
            "rps": res["rps"], "requests": res["requests"], "errors": res["errors"]}


def fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description="primary CPU per connection, floor vs pyfork vs node")
    ap.add_argument("--duration", type=float, default=4.0, help="seconds of wrk per round (4)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per target (3)")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections (32)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    ap.add_argument("--workers", type=int, default=2, help="workers per server (2)")
    ap.add_argument("--no-node", dest="node", action="store_false")
    ap.add_argument("--no-full", dest="full", action="store_false",
                    help="skip the `pyfork serve` rows")
    ap.add_argument("--no-nodelay-floor", dest="nodelay_floor", action="store_false",
                    help="skip the floor variant that also sets TCP_NODELAY (as pyfork does)")
    ap.add_argument("--out", default=os.path.join(benchlib.RESULTS_DIR, "primary_cpu"),
                    help="output path without extension (.md and .json are written)")
    args = ap.parse_args()
    if not benchlib.wrk_path():
        print(benchlib.WRK_HINT, file=sys.stderr)
        return 2
    log_dir = os.path.join(benchlib.RESULTS_DIR, "logs")
    os.makedirs(log_dir, exist_ok=True)

    servers, skipped = start_targets(args, log_dir)
    for line in skipped:
        print(line)
    rows: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for s in servers.values():  # warm-up: caches, JIT (node), first-connection paths
            benchlib.run_wrk(s.port, 1, args.conns, args.threads)
        for r in range(args.rounds):
            for name, s in servers.items():
                m = measure(s, args)
                rows[name].append(m)
                print(f"round {r + 1}/{args.rounds} {name:18s} {m['us_per_conn']:7.2f} us/conn "
                      f"(ticks {m['us_per_conn_ticks']:6.2f})  {m['rps']:9.0f} req/s  "
                      f"errors {m['errors']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    # Loop wake-ups per accepted connection over the whole run (< 1: accepts were batched).
    wakeups = {}
    for be in ("c", "python"):
        try:
            with open(stats_path(log_dir, be)) as f:
                st = json.load(f)
            os.unlink(stats_path(log_dir, be))
            if st.get("accepted"):
                wakeups[f"pyfork-{be}"] = st["wakeups"] / st["accepted"]
        except (OSError, ValueError):
            pass

    med = {n: statistics.median(m["us_per_conn"] for m in ms) for n, ms in rows.items() if ms}
    floor, c, pure = med.get("floor"), med.get("pyfork-c"), med.get("pyfork-python")
    lines = [
        f"# Primary CPU per connection ({args.workers} workers, wrk -c{args.conns} "
        f"`Connection: close`, {args.rounds} x {args.duration:g} s interleaved)",
        "",
        "| primary | µs CPU / conn (median) | min-max | µs (stat ticks) | req/s | vs floor | vs pure | wake-ups / conn |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ms in rows.items():
        us = [m["us_per_conn"] for m in ms]
        lines.append(
            f"| {name} | {med[name]:.2f} | {min(us):.2f}-{max(us):.2f} | "
            f"{statistics.median(m['us_per_conn_ticks'] for m in ms):.2f} | "
            f"{statistics.median(m['rps'] for m in ms):.0f} | {fmt_ratio(med[name], floor)} | "
            f"{fmt_ratio(med[name], pure)} | "
            f"{f'{wakeups[name]:.2f}' if name in wakeups else '-'} |")
    lines.append("")
    if c and pure:
        ok = "meets" if c <= 0.5 * pure else "misses"
        lines.append(f"- C / pure = **{c / pure:.2f}** ({ok} the target <= 0.5)")
    if c and floor:
        ok = "meets" if c <= 1.25 * floor else "misses"
        lines.append(f"- C / floor = **{c / floor:.2f}** ({ok} the target <= 1.25)")
    if c and med.get("floor+nodelay"):
        lines.append(f"- C / floor+nodelay (floor that also sets TCP_NODELAY like pyfork) = "
                     f"**{c / med['floor+nodelay']:.2f}**")
    for line in skipped:
        lines.append(f"- {line}")
    lines.append(f"- machine: {benchlib.machine_info()}")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "rounds": rows, "median_us_per_conn": med,
                   "wakeups_per_conn": wakeups,
                   "skipped": skipped, "machine": benchlib.machine_info(),
                   "time": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
