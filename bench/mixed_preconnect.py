"""Mixed load at equal request rates, with clients that connect before they send.

Theory of operation: issue 10's mixed-load scenario (bench/compare_mixed.py) is closed-loop,
so a faster server also gets more load, and its clients send each request the moment they
are connected. Here 4 light clients connect, wait 1 ms (bench/preconnect.lua, wrk's
delay()), then send `GET /` with `Connection: close`, while one wrk connection keeps a
`/sleep?ms=25` always in flight. The 1 ms of think time makes every server's light rate
nearly the same, so p99s compare at equal load; and every connection reaches the server
silent, as a browser's preconnect does. This found the case where pyfork held a taken,
silent connection on a worker that then ran a slow request: 1 % of light requests waited
~40 ms (bench/README.md "Mixed load"). Servers: pyfork with default options and gunicorn
sync, 2 workers each, interleaved rounds.

Usage: python bench/mixed_preconnect.py [--rounds 3] [--duration 5]
Writes results/mixed-preconnect.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import benchlib

LUA = os.path.join(benchlib.BENCH_DIR, "preconnect.lua")


def servers(workers: int) -> list[tuple[str, list[str]]]:
    py, w = sys.executable, str(workers)
    return [
        ("pyfork (defaults)", [py, "-m", "pyfork", "serve", "hello_app:app", "--interface", "wsgi",
                               "-w", w, "-b", "127.0.0.1:{port}"]),
        ("gunicorn sync", [py, "-m", "gunicorn", "-w", w, "-b", "127.0.0.1:{port}", "--chdir",
                           benchlib.BENCH_DIR, "--log-level", "warning", "-k", "sync", "hello_app:app"]),
    ]


def one_round(port: int, duration: float) -> dict:
    slow = benchlib.start_wrk(port, duration + 2, 1, 1, close=True, path="/sleep?ms=25")
    time.sleep(0.5)
    light = benchlib.run_wrk(port, duration, 4, 1, close=True, script=LUA, latency=True)
    slow_res = benchlib.finish_wrk(slow)
    return {"rps": light["rps"], "p50_ms": light.get("p50_us", 0) / 1e3,
            "p90_ms": light.get("p90_us", 0) / 1e3, "p99_ms": light.get("p99_us", 0) / 1e3,
            "errors": light["errors"], "slow_rps": slow_res["rps"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(benchlib.RESULTS_DIR, "mixed-preconnect"))
    args = ap.parse_args(argv)
    if not benchlib.wrk_path():
        print(benchlib.WRK_HINT)
        return 2
    started, rows = [], {}
    load0 = os.getloadavg()
    try:
        for name, cmd in servers(args.workers):
            port = benchlib.free_port()
            srv = benchlib.Server(name, [c.format(port=port) for c in cmd], env=benchlib.python_env(),
                                  cwd=benchlib.BENCH_DIR)
            srv.wait_http(port, args.workers)
            started.append((name, srv, port))
            rows[name] = []
        for r in range(args.rounds):
            for name, _srv, port in started:
                res = one_round(port, args.duration)
                rows[name].append(res)
                print(f"round {r + 1} {name}: {res['rps']:.0f} req/s p50 {res['p50_ms']:.2f} "
                      f"p90 {res['p90_ms']:.2f} p99 {res['p99_ms']:.2f} ms", flush=True)
    finally:
        for _name, srv, _port in started:
            srv.stop()
    ref = rows["gunicorn sync"]
    lines = ["# Mixed load at equal rates: connect-then-send clients beside a /sleep?ms=25 stream", "",
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {os.cpu_count()} CPUs; load average "
             f"{load0[0]:.2f} → {os.getloadavg()[0]:.2f}; {args.rounds} interleaved rounds × "
             f"{args.duration:g} s; 4 light clients (wrk -c4, 1 ms between connect and send, "
             "`Connection: close`), one `/sleep?ms=25` always in flight; "
             f"{args.workers} workers each. `python bench/mixed_preconnect.py`.", "",
             "| server | round | light req/s | p50 ms | p90 ms | p99 ms | p99 × gunicorn sync | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rs in rows.items():
        for i, res in enumerate(rs):
            ratio = res["p99_ms"] / ref[i]["p99_ms"] if ref[i]["p99_ms"] else float("nan")
            lines.append(f"| {name} | {i + 1} | {res['rps']:,.0f} | {res['p50_ms']:.2f} | "
                         f"{res['p90_ms']:.2f} | {res['p99_ms']:.2f} | {ratio:.2f} | {res['errors']} |")
    lines.append("")
    for name, rs in rows.items():
        lines.append(f"- {name}: median p99 {statistics.median(r['p99_ms'] for r in rs):.2f} ms, "
                     f"median light req/s {statistics.median(r['rps'] for r in rs):,.0f}")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "loadavg": [load0, os.getloadavg()], "rows": rows}, f, indent=1)
    print(f"wrote {args.out}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
