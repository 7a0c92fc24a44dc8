"""What observability costs: the access log against gunicorn's, metrics on against off.

Theory of operation: five servers serve bench/hello_app.py (WSGI) with the same number of
workers and stay up; wrk runs keep-alive and `Connection: close` rounds over them,
interleaved, so drift on a shared machine hits every server alike. Each figure is the
median requests/s over the rounds; the report is ratios measured in the same minutes:

  pyfork + access log    / gunicorn sync + access log     (both log to a file)
  pyfork + --metrics     / pyfork                         (a scraper GETs /metrics every second)
  pyfork + access log    / pyfork                         (what the log costs pyfork)

Usage: python bench/observability.py [--duration 3] [--rounds 3] [--workers 2] [--conns 32]
Writes bench/results/observability.{md,json}. Needs wrk and gunicorn (pip install gunicorn).

``--metrics-only`` measures just the metrics cost, more closely: the two pyfork servers
(metrics on with a scrape every second, as Prometheus would; metrics off) and a second
metrics-off server (the A/A control: what two identical servers differ by here) run back
to back in each round, the order cycling through all six so none always goes first;
each round gives one on/off ratio per load, of requests/s and of the server's CPU time
(primary + workers) per request, and the report is their median and spread, with the
load average at each round and the primary's CPU per run. Writes
bench/results/observability-metrics.{md,json}.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib as B  # noqa: E402


def scraper(url: str, stop: threading.Event, count: list, walls: list | None = None) -> None:
    """GETs url every second until stop; counts the scrapes and, when given a list, appends
    each one's wall time in s (the primary serves a scrape on its loop thread, so this
    bounds how long dispatch waited for it)."""
    while not stop.wait(1.0):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            count[0] += 1
            if walls is not None:
                walls.append(time.perf_counter() - t0)
        except OSError:
            pass


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def tree_cpu_ns(pid: int) -> int:
    """On-CPU ns of pid and its children (the primary and its workers)."""
    total = B.cpu_ns(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(k) for k in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        kids = []
    return total + sum(B.cpu_ns(k) for k in kids)


def metrics_only(args, env, tmp) -> int:
    """Metrics on against off, paired per round in alternating order (module docstring)."""
    py = sys.executable
    ports = {"off": B.free_port(), "on": B.free_port(), "off2": B.free_port()}
    mport = B.free_port()
    base = [py, "-m", "pyfork", "serve", "hello_app:app", "--interface", "wsgi", "-w", str(args.workers)]
    specs = {"off": base + ["-b", f"127.0.0.1:{ports['off']}"],
             "on": base + ["-b", f"127.0.0.1:{ports['on']}", "--metrics", f"127.0.0.1:{mport}"],
             "off2": base + ["-b", f"127.0.0.1:{ports['off2']}"]}    # the A/A control: off again
    orders = list(itertools.permutations(("on", "off", "off2")))
    modes = ("keepalive", "close")
    rounds = []
    servers = {}
    scrapes = [0]
    walls = {mode: [] for mode in modes}     # wall time of each scrape, by load
    try:
        for name, cmd in specs.items():
            s = B.Server("metrics_" + name, cmd, env=env, cwd=HERE, log_path=os.path.join(tmp, name + ".log"))
            s.wait_http(ports[name], args.workers)
            servers[name] = s
        for r in range(args.rounds):
            order = orders[r % len(orders)]
            row = {"order": "-".join(order), "loadavg": loadavg()}
            for mode in modes:
                for name in order:
                    stop = threading.Event()
                    t = None
                    if name == "on":
                        t = threading.Thread(target=scraper, args=(f"http://127.0.0.1:{mport}/metrics", stop,
                                                                   scrapes, walls[mode]), daemon=True)
                        t.start()
                    pid = servers[name].pid
                    c0, t0 = B.cpu_ns(pid), tree_cpu_ns(pid)
                    res = B.run_wrk(ports[name], args.duration, args.conns, close=(mode == "close"))
                    row[f"{name}/{mode}/primary_cpu_ms"] = (B.cpu_ns(pid) - c0) / 1e6
                    # CPU per request of the whole server: what metrics would cost if they
                    # cost anything, and far less sensitive to other load than requests/s
                    row[f"{name}/{mode}/cpu_us_per_req"] = (tree_cpu_ns(pid) - t0) / 1e3 / max(
                        1, res["rps"] * args.duration)
                    stop.set()
                    if t is not None:
                        t.join(10)
                    row[f"{name}/{mode}"] = res["rps"]
                row[f"ratio/{mode}"] = row[f"on/{mode}"] / row[f"off/{mode}"]
                row[f"cpu_ratio/{mode}"] = (row[f"on/{mode}/cpu_us_per_req"]
                                            / row[f"off/{mode}/cpu_us_per_req"])
                row[f"aa_ratio/{mode}"] = row[f"off2/{mode}"] / row[f"off/{mode}"]
                row[f"aa_cpu_ratio/{mode}"] = (row[f"off2/{mode}/cpu_us_per_req"]
                                               / row[f"off/{mode}/cpu_us_per_req"])
            rounds.append(row)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in row.items()), flush=True)
    finally:
        for s in servers.values():
            s.stop()
    md = ["| load | pair | requests/s ratio: median | min | max | CPU per request ratio: median | min | max "
          "| rounds |", "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for mode in modes:
        for pair, key in (("metrics on / off", ""), ("A/A: off again / off", "aa_")):
            ratios = [row[f"{key}ratio/{mode}"] for row in rounds]
            cpu = [row[f"{key}cpu_ratio/{mode}"] for row in rounds]
            summary[key + mode] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                   "cpu_median": statistics.median(cpu), "cpu_min": min(cpu),
                                   "cpu_max": max(cpu)}
            md.append(f"| {mode} | {pair} | {statistics.median(ratios):.3f} | {min(ratios):.3f} | "
                      f"{max(ratios):.3f} | {statistics.median(cpu):.3f} | {min(cpu):.3f} | {max(cpu):.3f} | "
                      f"{len(ratios)} |")
    md.append("")
    md.append("requests/s of the metrics-off server (median): "
              + ", ".join(f"{m} {statistics.median(row[f'off/{m}'] for row in rounds):.0f}" for m in modes)
              + "; CPU µs per request (primary + workers, median): "
              + ", ".join(f"{m} {statistics.median(row[f'off/{m}/cpu_us_per_req'] for row in rounds):.1f}"
                          for m in modes))
    md.append("")
    for mode in modes:
        w = sorted(walls[mode])
        if w:
            # the share of the metrics runs' time the primary could have spent on scrapes
            # instead of dispatching: every scrape's full wall time, an upper bound
            bound = sum(w) / (args.rounds * args.duration)
            summary[mode]["scrape_wall_ms"] = {"median": 1e3 * statistics.median(w), "max": 1e3 * w[-1]}
            summary[mode]["scrape_share_bound"] = bound
            md.append(f"- {mode}: {len(w)} scrapes under load took {1e3 * statistics.median(w):.1f} ms "
                      f"(median wall, client side), {1e3 * w[-1]:.1f} ms at most: the primary's loop was "
                      f"busy with scrapes for at most {100 * bound:.2f}% of the time.")
    md.append("")
    md.append(f"{args.rounds} rounds of {args.duration:g} s per server and load, wrk -c{args.conns}, "
              f"{args.workers} workers, hello_app WSGI, {scrapes[0]} scrapes (one a second while the "
              f"metrics server runs); load average (1/5/15 min) at each round: "
              + "; ".join(row["loadavg"] for row in rounds))
    md.append("")
    md.append("| round | order | " + " | ".join(f"{m} req/s on/off" for m in modes) + " | "
              + " | ".join(f"{m} CPU/req on/off" for m in modes) + " | "
              + " | ".join(f"primary CPU ms {m} on/off" for m in modes) + " | load average |")
    md.append("|---|---|" + "---|" * (3 * len(modes) + 1))
    for i, row in enumerate(rounds, 1):
        md.append(f"| {i} | {row['order']} | " + " | ".join(f"{row[f'ratio/{m}']:.3f}" for m in modes) + " | "
                  + " | ".join(f"{row[f'cpu_ratio/{m}']:.3f}" for m in modes) + " | "
                  + " | ".join(f"{row[f'on/{m}/primary_cpu_ms']:.0f}/{row[f'off/{m}/primary_cpu_ms']:.0f}"
                               for m in modes) + f" | {row['loadavg']} |")
    text = "\n".join(md)
    print(text)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "observability-metrics.md"), "w") as f:
        f.write("# Metrics cost: on against off (bench/observability.py --metrics-only)\n\n" + text + "\n")
    with open(os.path.join(out, "observability-metrics.json"), "w") as f:
        json.dump({"machine": B.machine_info(), "args": vars(args), "rounds": rounds, "summary": summary,
                   "scrapes": scrapes[0]}, f, indent=1)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--metrics-only", action="store_true", help="measure only metrics on against off")
    args = ap.parse_args()
    if args.metrics_only:
        return metrics_only(args, B.python_env(), tempfile.mkdtemp(prefix="pyfork-obs-bench-"))
    tmp = tempfile.mkdtemp(prefix="pyfork-obs-bench-")
    env = B.python_env()
    py = sys.executable
    w = str(args.workers)
    ports = {k: B.free_port() for k in ("pyfork", "pyfork_metrics", "pyfork_access", "gunicorn_access")}
    mport = B.free_port()
    base = [py, "-m", "pyfork", "serve", "hello_app:app", "--interface", "wsgi", "-w", w]
    specs = {
        "pyfork": base + ["-b", f"127.0.0.1:{ports['pyfork']}"],
        "pyfork_metrics": base + ["-b", f"127.0.0.1:{ports['pyfork_metrics']}", "--metrics", f"127.0.0.1:{mport}"],
        "pyfork_access": base + ["-b", f"127.0.0.1:{ports['pyfork_access']}",
                                 "--access-log", os.path.join(tmp, "pyfork-access.log")],
        "gunicorn_access": [py, "-m", "gunicorn", "hello_app:app", "-w", w, "-k", "sync",
                            "-b", f"127.0.0.1:{ports['gunicorn_access']}",
                            "--access-logfile", os.path.join(tmp, "gunicorn-access.log")],
    }
    servers = {}
    try:
        for name, cmd in specs.items():
            s = B.Server(name, cmd, env=env, cwd=HERE, log_path=os.path.join(tmp, name + ".log"))
            s.wait_http(ports[name], args.workers)
            servers[name] = s
        results = {(n, mode): [] for n in specs for mode in ("keepalive", "close")}
        scrapes = [0]
        for _ in range(args.rounds):
            for mode in ("keepalive", "close"):
                for name in specs:
                    stop = threading.Event()
                    t = None
                    if name == "pyfork_metrics":
                        t = threading.Thread(target=scraper, args=(f"http://127.0.0.1:{mport}/metrics", stop,
                                                                   scrapes), daemon=True)
                        t.start()
                    r = B.run_wrk(ports[name], args.duration, args.conns, close=(mode == "close"))
                    stop.set()
                    if t is not None:
                        t.join(10)
                    results[(name, mode)].append(r["rps"])
        # The direct figure for metrics: the primary's CPU per scrape (workers do no work
        # for it), measured over 50 scrapes of an idle server.
        prim = servers["pyfork_metrics"].pid
        c0 = B.cpu_ns(prim)
        for _ in range(50):
            with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
                r.read()
        scrape_ms = (B.cpu_ns(prim) - c0) / 50 / 1e6
    finally:
        for s in servers.values():
            s.stop()
    med = {k: statistics.median(v) for k, v in results.items()}
    rows = []
    for mode in ("keepalive", "close"):
        rows.append((mode, med[("pyfork_access", mode)] / med[("gunicorn_access", mode)],
                     med[("pyfork_metrics", mode)] / med[("pyfork", mode)],
                     med[("pyfork_access", mode)] / med[("pyfork", mode)]))
    md = ["| load | pyfork+access log / gunicorn+access log | metrics on / off | pyfork access log on / off |",
          "|---|---|---|---|"]
    md += [f"| {m} | {a:.2f}x | {b:.3f} | {c:.3f} |" for m, a, b, c in rows]
    md.append("")
    md.append(f"primary CPU per /metrics scrape: {scrape_ms:.2f} ms (at a 15 s scrape interval: "
              f"{scrape_ms / 150:.4f}% of one core; workers spend nothing)")
    md.append("")
    md.append(f"median requests/s over {args.rounds} rounds of {args.duration:g} s, wrk -c{args.conns}, "
              f"{args.workers} workers, {scrapes[0]} scrapes; "
              + ", ".join(f"{n} {mode} {med[(n, mode)]:.0f}" for n in specs for mode in ("keepalive", "close")))
    text = "\n".join(md)
    print(text)
    out = os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "observability.md"), "w") as f:
        f.write("# Observability cost (bench/observability.py)\n\n" + text + "\n")
    with open(os.path.join(out, "observability.json"), "w") as f:
        json.dump({"machine": B.machine_info(), "args": vars(args),
                   "rps": {f"{n}/{m}": v for (n, m), v in results.items()},
                   "scrape_cpu_ms": scrape_ms}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
