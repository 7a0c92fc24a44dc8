"""The mixed-load scenario of bench/compare.py (issue 10): light-request tails while
one slow request is always in flight.

Theory of operation: for each server, for each slow stream (`sleep`: /sleep?ms=25,
no CPU; `fib`: /fibonacci?n=N, N calibrated to --heavy-ms of CPU) and each light
client mix (`close4`: 4 wrk connections, new connection per request; `ka8`: 8
keep-alive wrk connections), one wrk with a single connection keeps the slow
request in flight (`Connection: close`, so it lands on every worker in turn, as
independent slow clients would), and a second wrk, started once the slow one
is running, measures the light requests on `/` with its own latency histogram
(`--latency`: p50/p90/p99, measured from the write of the request to the last
byte of the response, so time in the kernel's accept queue, the primary, a
worker's channel or selector all count). wrk corrects its histogram for
coordinated omission (stats_correct: a response that took n x the
connection's mean interval adds samples at n-1, n-2, ... intervals, as a
client sending at a steady rate would have seen), so a rare 25 ms stall on a
fast keep-alive connection moves p90, not only p99; mixed_trace.py gives the
raw per-request view. The light wrk uses one thread
(--mixed-threads): on 2 cores a second load thread only competes with the
servers. Rounds are interleaved across servers like the other scenarios.

Two runs side by side: python bench/compare_mixed.py run1.json run2.json
prints light p99 and req/s of each run per server and variant (the spread).

Output: per server and variant, the medians over rounds of light p50/p90/p99,
light req/s and slow req/s, and the ratios to gunicorn sync (new connections)
and gunicorn gthread (keep-alive), the two references of issue 10.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
import time

import benchlib

SLOWS = ("sleep", "fib")
LIGHTS = {"close4": (4, True), "ka8": (8, False)}
REFERENCE = {"close4": "gunicorn sync", "ka8": "gunicorn gthread"}
PCTS = ("50", "90", "99")


def slow_path(slow: str, heavy_n: int, sleep_ms: int) -> str:
    return f"/sleep?ms={sleep_ms}" if slow == "sleep" else f"/fibonacci?n={heavy_n}"


def wrk_percentiles(out: str) -> dict:
    """p50/p90/p99 in ms from wrk --latency's "Latency Distribution" block."""
    res = {}
    for pct in PCTS:
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if m:
            val, unit = m.groups()
            res[f"p{pct}_ms"] = float(val) * {"us": 1e-3, "ms": 1, "s": 1e3, "m": 6e4}[unit]
    return res


def run_variant(port: int, slow: str, light: str, args, heavy_n: int) -> dict:
    """One measurement: the slow stream in the background, the light wrk in front."""
    conns, close = LIGHTS[light]
    dur = max(1, round(args.mixed_duration))
    slow_wrk = benchlib.start_wrk(port, dur + 2, 1, 1, close=True,
                                  path=slow_path(slow, heavy_n, args.sleep_ms), timeout_s=10)
    try:
        time.sleep(0.5)   # the slow stream is running before the light clients start
        res = benchlib.run_wrk(port, dur, conns, args.mixed_threads, close=close, latency=True)
    finally:
        slow_res = benchlib.finish_wrk(slow_wrk)
    out = {"light_rps": res["rps"], "light_requests": res["requests"],
           "light_errors": res["errors"], "slow_requests": slow_res["requests"],
           "slow_rps": slow_res["rps"], "slow_errors": slow_res["errors"]}
    out.update(wrk_percentiles(res["out"]))
    return out


def run_mixed(server, spec, args, heavy_n: dict) -> dict:
    """One round for one server: every slow x light variant, {variant: figures}."""
    n = heavy_n.get(spec.impl, heavy_n.get("python", 25))
    return {f"{slow}/{light}": run_variant(server.port, slow, light, args, n)
            for slow in SLOWS for light in LIGHTS}


def summarize_mixed(rounds: list) -> dict:
    """Per variant: the median of each figure over rounds, plus every round."""
    out = {}
    for variant in rounds[0]:
        per = [r[variant] for r in rounds if variant in r]
        row = {"rounds": per}
        for key in per[0]:
            vals = [p[key] for p in per if isinstance(p.get(key), (int, float))]
            if vals:
                row[key] = statistics.median(vals)
        for key in ("p99_ms", "light_rps"):
            vals = [p[key] for p in per if isinstance(p.get(key), (int, float))]
            if len(vals) > 1:
                row[key + "_range"] = [min(vals), max(vals)]
        out[variant] = row
    return out


def _fmt(v, digits=2):
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}f}"


def markdown(results: dict, meta: dict) -> str:
    """The mixed-load table: absolute figures and ratios to the reference server."""
    lines = ["# Mixed load: light requests while a slow one is always in flight", ""]
    lines.append(f"{meta.get('time', '')}; {meta.get('machine', {}).get('cpus')} CPUs; "
                 f"load average {meta.get('loadavg_start')} → {meta.get('loadavg_end')}; "
                 f"{meta['args'].get('rounds')} interleaved rounds × "
                 f"{meta['args'].get('mixed_duration')} s per variant; light wrk "
                 f"-t{meta['args'].get('mixed_threads')}; slow: one wrk connection, "
                 f"`/sleep?ms={meta['args'].get('sleep_ms')}` or "
                 f"`/fibonacci?n={meta.get('heavy_n', {}).get('python')}` "
                 f"(~{meta['args'].get('heavy_ms')} ms CPU); 2 workers everywhere; each server "
                 + ("in wrk's session (--same-session)." if meta['args'].get('same_session')
                    else "in its own session (as from another terminal)."))
    lines.append("")
    lines.append("Ratios: p99 × ref = this server's light p99 ÷ the reference's (lower is "
                 "better); req/s × ref = light req/s ÷ the reference's (higher is better). "
                 "Reference: gunicorn sync for new connections, gunicorn gthread for keep-alive. "
                 "p99 range = min–max over rounds.")
    names = [n for n, r in results.items() if r.get("mixed")]
    for slow in SLOWS:
        for light in LIGHTS:
            variant = f"{slow}/{light}"
            conns, close = LIGHTS[light]
            title = (f"{conns} light clients, {'new connection per request' if close else 'keep-alive'}"
                     f"; slow stream: {'/sleep (no CPU)' if slow == 'sleep' else '/fibonacci (CPU)'}")
            lines += ["", f"## {title}", "",
                      "| server | light p50 ms | p90 ms | p99 ms | p99 range | light req/s "
                      "| p99 × ref | req/s × ref | slow req/s | errors |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            ref = results.get(REFERENCE[light], {}).get("mixed", {}).get(variant, {})
            for name in names:
                row = results[name]["mixed"].get(variant)
                if not row:
                    continue
                p99r = row.get("p99_ms_range")
                rng = f"{_fmt(p99r[0])}–{_fmt(p99r[1])}" if p99r else "–"
                r99 = (row.get("p99_ms") / ref["p99_ms"]) if ref.get("p99_ms") and row.get("p99_ms") else None
                rrps = (row.get("light_rps") / ref["light_rps"]) if ref.get("light_rps") else None
                errs = int(row.get("light_errors", 0) + row.get("slow_errors", 0))
                lines.append(f"| {name} | {_fmt(row.get('p50_ms'))} | {_fmt(row.get('p90_ms'))} | "
                             f"{_fmt(row.get('p99_ms'))} | {rng} | {_fmt(row.get('light_rps'))} | "
                             f"{_fmt(r99)} | {_fmt(rrps)} | {_fmt(row.get('slow_rps'), 1)} | {errs} |")
    lines.append("")
    return "\n".join(lines)


def spread(paths: list) -> str:
    """Light p99 and req/s of several runs' JSON files, one line per server and variant."""
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f)["results"])
    lines = ["| variant | server | light p99 ms, " + " / ".join(f"run {i + 1}" for i in range(len(runs)))
             + " | light req/s | p99 × ref | req/s × ref |", "|---|---|---:|---:|---:|---:|"]
    for slow in SLOWS:
        for light in LIGHTS:
            variant = f"{slow}/{light}"
            for name in runs[0]:
                rows = [r.get(name, {}).get("mixed", {}).get(variant) for r in runs]
                if not all(rows):
                    continue
                refs = [r.get(REFERENCE[light], {}).get("mixed", {}).get(variant, {}) for r in runs]
                r99 = [row["p99_ms"] / ref["p99_ms"] for row, ref in zip(rows, refs) if ref.get("p99_ms")]
                rps = [row["light_rps"] / ref["light_rps"] for row, ref in zip(rows, refs)
                       if ref.get("light_rps")]
                lines.append(f"| {variant} | {name} | "
                             + " / ".join(_fmt(row.get("p99_ms"), 1) for row in rows) + " | "
                             + " / ".join(_fmt(row.get("light_rps"), 0) for row in rows) + " | "
                             + " / ".join(_fmt(x) for x in r99) + " | "
                             + " / ".join(_fmt(x) for x in rps) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/compare_mixed.py RUN.json [RUN.json ...]")
    print(spread(sys.argv[1:]))
