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
"""
from __future__ import annotations

import argparse
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


def scraper(url: str, stop: threading.Event, count: list) -> None:
    while not stop.wait(1.0):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                r.read()
            count[0] += 1
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--conns", type=int, default=32)
    args = ap.parse_args()
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
