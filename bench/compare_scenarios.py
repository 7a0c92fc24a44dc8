"""The scenarios of bench/compare.py, one function each, on a running server.

Theory of operation: every function takes a started benchlib.Server (its
`pid` is the primary, its `port` serves hello_app) and returns plain figures
for compare_report. Throughput and tail are called once per interleaved round
and merged by summarize_rounds / summarize_tail; memory, fairness and recovery
run once. Recovery runs last for a server: it kills and replaces workers.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time

import benchlib


def run_close(server, args) -> dict:
    meter = benchlib.CpuMeter(server.pid).start()
    res = benchlib.run_wrk(server.port, args.duration, args.conns, args.threads, close=True,
                           latency=True)
    meter.stop()
    n = max(1, res["requests"])
    return {"rps": res["rps"], "requests": res["requests"], "errors": res["errors"],
            "p99_us": res.get("p99_us"),
            "primary_us_per_conn": meter.sched_ns / n / 1e3,
            "primary_us_per_conn_ticks": meter.tick_ns / n / 1e3}


def run_keepalive(server, args) -> dict:
    res = benchlib.run_wrk(server.port, args.duration, args.conns, args.threads, close=False,
                           latency=True)
    return {"rps": res["rps"], "requests": res["requests"], "errors": res["errors"],
            "p99_us": res.get("p99_us")}


def run_memory(server, args) -> dict:
    prim = benchlib.memory_kb(server.pid)
    workers = [benchlib.memory_kb(p) for p in benchlib.worker_pids(server.pid)]
    return {"primary_rss_kb": prim["rss"], "primary_uss_kb": prim["uss"],
            "worker_uss_kb": statistics.mean(x["uss"] for x in workers) if workers else 0,
            "worker_rss_kb": statistics.mean(x["rss"] for x in workers) if workers else 0,
            "worker_pss_kb": statistics.mean(x["pss"] for x in workers) if workers else 0,
            "workers": len(workers),
            "total_uss_kb": prim["uss"] + sum(x["uss"] for x in workers)}


def run_fairness(server, args) -> dict:
    script = os.path.join(benchlib.BENCH_DIR, "pidcount.lua")
    out = {}
    for conc in args.fair_conc:
        res = benchlib.run_wrk(server.port, args.fair_duration, conc, min(2, conc), close=True,
                               script=script)
        counts = sorted(res.get("pids", {}).values(), reverse=True)
        total = sum(counts) or 1
        counts += [0] * max(0, args.workers - len(counts))  # a worker that got nothing
        out[str(conc)] = {"max_share": counts[0] / total, "min_share": counts[-1] / total,
                          "shares": [c / total for c in counts], "requests": total,
                          "errors": res["errors"]}
    return out


async def _tail_client(port, rate, duration, heavy_frac, heavy_path, seed):
    """Open loop: Poisson arrivals at `rate`/s; each request a new connection."""
    rng = random.Random(seed)
    schedule, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        schedule.append((t, rng.random() < heavy_frac))
    results = []

    async def one(heavy):
        path = heavy_path if heavy else "/"
        t0 = time.perf_counter()
        ok, pid = False, None
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
            w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            data = await asyncio.wait_for(r.read(), 10)
            w.close()
            ok = data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
            pid = benchlib.body_pid(data)
        except (OSError, asyncio.TimeoutError):
            pass
        results.append((heavy, t0, time.perf_counter(), ok, pid))

    loop = asyncio.get_running_loop()
    begin = loop.time()
    tasks = []
    for at, heavy in schedule:
        delay = begin + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(heavy)))
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    return results


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def run_tail(server, spec, args, heavy_n, round_no) -> list:
    """One round of the open-loop client; returns raw (heavy, seconds, ok) samples."""
    n = heavy_n[spec.impl]
    return asyncio.run(_tail_client(server.port, args.tail_rate, args.tail_duration / args.rounds,
                                    args.heavy_frac, f"/fibonacci?n={n}", args.seed + round_no))


def summarize_tail(samples, n) -> dict:
    """Percentiles of the light requests, and the share of them that started while a
    heavy request was in flight on the worker that answered them (stuck behind it).
    That share counts dispatch decisions, so CPU noise from other processes on the
    machine does not move it the way it moves p99."""
    light = [(t0, t1, pid) for h, t0, t1, ok, pid in samples if not h and ok]
    heavy = [(t0, t1, pid) for h, t0, t1, ok, pid in samples if h and ok]
    by_pid = {}
    for t0, t1, pid in heavy:
        by_pid.setdefault(pid, []).append((t0, t1))
    behind = sum(1 for t0, _, pid in light
                 if pid is not None and any(h0 < t0 < h1 for h0, h1 in by_pid.get(pid, ())))
    lat = [(t1 - t0) * 1e3 for t0, t1, _ in light]
    return {"light_p50_ms": pct(lat, 50), "light_p99_ms": pct(lat, 99),
            "light_max_ms": max(lat) if lat else None,
            "behind_heavy": behind / len(light) if light else None,
            "heavy_p50_ms": pct([(t1 - t0) * 1e3 for t0, t1, _ in heavy], 50),
            "light": len(light), "heavy": len(heavy),
            "failed": sum(1 for sample in samples if not sample[3]), "fib_n": n}


def summarize_rounds(rounds: list) -> dict:
    """Median of every numeric figure over interleaved rounds, plus the rounds and
    the spread of req/s ((max - min) / median)."""
    out = {"rounds": rounds}
    for key in rounds[0]:
        vals = [r[key] for r in rounds if isinstance(r.get(key), (int, float))]
        if vals:
            out[key] = statistics.median(vals)
    rps = [r["rps"] for r in rounds if r.get("rps")]
    if len(rps) > 1 and statistics.median(rps):
        out["rps_spread"] = (max(rps) - min(rps)) / statistics.median(rps)
    out["errors"] = sum(r.get("errors", 0) for r in rounds)
    return out


def _probe_pids(port, n=8) -> set:
    """n concurrent GETs; the pids that answered."""
    def one(_):
        try:
            return benchlib.body_pid(benchlib.http_get(port, "/", timeout=2)[1])
        except OSError:
            return None
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        return set(ex.map(one, range(n))) - {None}


def _wait_workers(server, n, timeout=20.0, exclude=()) -> float | None:
    """Seconds until the primary has n worker children none of which is in exclude."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        pids = benchlib.worker_pids(server.pid)
        if len(pids) >= n and not set(pids) & set(exclude):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def run_recovery(server, args) -> dict:
    out = {}
    port = server.port
    # (a) idle: SIGKILL one worker, time to a new child, then to its first answer.
    old = set(benchlib.worker_pids(server.pid))
    victim = min(old)
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    new = None
    while time.monotonic() - t0 < 15 and new is None:
        fresh = set(benchlib.worker_pids(server.pid)) - old
        new = min(fresh) if fresh else None
        if new is None:
            time.sleep(0.002)
    out["kill_to_fork_ms"] = (time.monotonic() - t0) * 1e3 if new else None
    out["kill_to_serving_ms"] = None
    while new and time.monotonic() - t0 < 15:
        if new in _probe_pids(port):
            out["kill_to_serving_ms"] = (time.monotonic() - t0) * 1e3
            break
    _wait_workers(server, args.workers, exclude={victim})
    time.sleep(0.5)

    # (b) SIGKILL a worker under load: requests that failed.
    dur = max(3.0, args.duration)
    wrk = benchlib.start_wrk(port, dur, args.recovery_conns, 2, close=True)
    time.sleep(dur / 3)
    pids = benchlib.worker_pids(server.pid)
    if pids:
        os.kill(pids[0], signal.SIGKILL)
    res = benchlib.finish_wrk(wrk)
    out["kill_under_load"] = {"requests": res["requests"], "failed": res["errors"],
                              "socket_errors": res.get("socket_errors"), "non2xx": res["non2xx"]}
    _wait_workers(server, args.workers, exclude=set(pids[:1]))
    time.sleep(1.0)  # let the replacement finish booting before the next test

    # (c) SIGHUP (rolling restart) under load: requests that failed, restart time.
    dur = max(5.0, args.duration + 2)
    old = set(benchlib.worker_pids(server.pid))
    wrk = benchlib.start_wrk(port, dur, args.recovery_conns, 2, close=True)
    time.sleep(1.0)
    server.signal(signal.SIGHUP)
    took = _wait_workers(server, args.workers, timeout=dur, exclude=old)
    res = benchlib.finish_wrk(wrk)
    out["hup_under_load"] = {"requests": res["requests"], "failed": res["errors"],
                             "socket_errors": res.get("socket_errors"), "non2xx": res["non2xx"],
                             "restart_s": took}
    return out


# ---------------------------------------------------------------- heavy-route calibration

def calibrate(args) -> dict:
    """fib n per implementation whose CPU time (min of 3) is closest to --heavy-ms
    on a log scale (each n costs ~1.6x the one before)."""
    import math
    sys.setrecursionlimit(10000)
    from hello_app import fib
    best_n, best_err = 25, math.inf
    for n in range(15, 31):
        t_ms = min(_timed(fib, n) for _ in range(3)) * 1e3
        err = abs(math.log(t_ms / args.heavy_ms))
        if err < best_err:
            best_n, best_err = n, err
        if t_ms > args.heavy_ms * 2:
            break
    out = {"python": best_n, "none": best_n}
    if shutil.which("node"):
        js = ("function fib(n){return n<2?n:fib(n-1)+fib(n-2)}"
              "let bestN=35,bestErr=1e9;"
              "for(let n=20;n<=40;n++){let t=1e9;for(let i=0;i<3;i++){"
              "const b=process.hrtime.bigint();fib(n);"
              "t=Math.min(t,Number(process.hrtime.bigint()-b)/1e6)}"
              f"const e=Math.abs(Math.log(t/{args.heavy_ms}));if(e<bestErr){{bestErr=e;bestN=n}}"
              f"if(t>{args.heavy_ms}*2)break}}console.log(bestN)")
        r = subprocess.run(["node", "-e", js], capture_output=True, text=True, timeout=120)
        out["node"] = int(r.stdout.strip() or 35)
    return out


def _timed(fn, n):
    t0 = time.perf_counter()
    fn(n)
    return time.perf_counter() - t0


