"""What the hop through the primary costs one fresh client on an idle server.

Theory of operation: with `--policy rr` (the default) a new connection is accepted by the
primary and passed to a worker (two processes wake, one after the other); with `shared`
the worker accepts it itself (one wakes), as uvicorn's and gunicorn's workers do. One
client, nothing else running, sends `GET /` with `Connection: close` on a new connection,
reads to EOF, waits 1 ms, and again, --probes times per server; servers are interleaved
round by round, so drift on a shared machine hits each alike. Latency is connect to last
byte. pyfork WSGI and ASGI with rr and shared, and uvicorn, 2 workers each. What it
answers: the difference rr - shared at the same interface is the hop's price when no CPU
is contended (bench/README.md and README.md "Many connections" say what it explains).

Usage: python bench/fresh_latency.py [--rounds 3] [--probes 4000]
Writes results/fresh-latency.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

import benchlib

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
GAP_S = 0.001
WARMUP = 200


def servers(workers: int) -> list[tuple[str, list[str]]]:
    py, w = sys.executable, str(workers)
    out = []
    for iface, app in (("wsgi", "hello_app:app"), ("asgi", "hello_app:asgi")):
        for policy in ("rr", "shared"):
            out.append((f"pyfork {iface} {policy}",
                        [py, "-m", "pyfork", "serve", app, "--interface", iface, "--policy", policy,
                         "-w", w, "-b", "127.0.0.1:{port}"]))
    out.append(("uvicorn", [py, "-m", "uvicorn", "hello_app:asgi", "--workers", w, "--host",
                            "127.0.0.1", "--port", "{port}", "--log-level", "warning",
                            "--no-access-log"]))
    return out


def probe(port: int, count: int) -> list[float]:
    """Latencies in ms of `count` sequential fresh clients."""
    lat = []
    for _ in range(count):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(REQUEST)
            data = benchlib.recv_all(s)
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"status {data[:12]!r}")
        lat.append((time.perf_counter() - t0) * 1e3)
        time.sleep(GAP_S)
    return lat


def run_one(name: str, cmd: list[str], args) -> dict:
    port = benchlib.free_port()
    server = benchlib.Server(name, [c.replace("{port}", str(port)) for c in cmd],
                             env=benchlib.python_env(), cwd=benchlib.BENCH_DIR)
    try:
        server.wait_http(port, args.workers)
        probe(port, WARMUP)
        lat = probe(port, args.probes)
    finally:
        server.stop()
    pct = benchlib.nearest_rank
    return {"p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99),
            "loadavg": os.getloadavg()[0]}


def markdown(results: dict, meta: dict) -> str:
    lines = ["# Fresh-client latency on an idle server: the hop through the primary", "",
             f"{meta['time']}; load average {meta['loadavg_start']} → {meta['loadavg_end']}; "
             f"{meta['rounds']} interleaved rounds of {meta['probes']} sequential fresh clients "
             f"(`Connection: close`, {GAP_S * 1e3:g} ms apart) per server; 2 workers each. "
             f"Command: `{meta['command']}`.", "",
             "| server | p50 ms (each round) | median p50 | median p90 | median p99 |",
             "|---|---|---:|---:|---:|"]
    for name, rows in results.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("p50_ms", "p90_ms", "p99_ms")}
        each = " / ".join(f"{r['p50_ms']:.3f}" for r in rows)
        lines.append(f"| {name} | {each} | {med['p50_ms']:.3f} | {med['p90_ms']:.3f} | "
                     f"{med['p99_ms']:.3f} |")
    hop = []
    for iface in ("wsgi", "asgi"):
        rr, shared = results.get(f"pyfork {iface} rr"), results.get(f"pyfork {iface} shared")
        if rr and shared:
            d = [a["p50_ms"] - b["p50_ms"] for a, b in zip(rr, shared)]
            hop.append(f"{iface.upper()} rr - shared p50, per round: "
                       + " / ".join(f"{x * 1e3:+.0f} µs" for x in d))
    lines += ["", *(f"- {h}" for h in hop), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--probes", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(benchlib.BENCH_DIR, "results", "fresh-latency"))
    args = ap.parse_args()
    meta = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": args.rounds,
            "probes": args.probes, "loadavg_start": round(os.getloadavg()[0], 2),
            "command": "python bench/fresh_latency.py " + " ".join(sys.argv[1:])}
    specs = servers(args.workers)
    results: dict = {name: [] for name, _ in specs}
    for r in range(args.rounds):
        for name, cmd in (specs if r % 2 == 0 else specs[::-1]):
            row = run_one(name, cmd, args)
            results[name].append(row)
            print(f"round {r + 1} {name:20} p50 {row['p50_ms']:.3f} p90 {row['p90_ms']:.3f} "
                  f"p99 {row['p99_ms']:.3f} ms (load {row['loadavg']:.2f})", flush=True)
    meta["loadavg_end"] = round(os.getloadavg()[0], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(results, meta))
    print(f"wrote {args.out}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
