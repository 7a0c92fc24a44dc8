"""Turns bench/compare.py's results into the markdown report and the PNG plot.

Theory of operation: results is {server name: {scenario: figures}} as measured
in one run; every table column of relative figures divides by a baseline row
from the same run (pyfork rr with the first backend for most scenarios, the
bare-C floor for primary CPU, the fair share 1/N for fairness). Absolute
numbers stay in their own columns. Missing figures print as "-".

`python bench/compare_report.py A.json B.json ...` prints the headline ratios of
several runs side by side with their spread ((max - min) / mean).
"""
from __future__ import annotations

import json
import os
import statistics
import sys


def _get(row, *keys):
    for k in keys:
        if not isinstance(row, dict) or k not in row or row[k] is None:
            return None
        row = row[k]
    return row


def _baseline_name(results, meta):
    """pyfork rr with the first backend actually measured."""
    backends = meta["args"].get("backends") or ["c"]
    for be in backends:
        name = f"pyfork rr {be}"
        if name in results and "error" not in results[name]:
            return name
    for name in ("gunicorn sync", *results):  # pyfork absent: still a same-run baseline
        if name in results and "error" not in results[name]:
            return name
    return None


def _f(v, spec="{:.0f}"):
    return "-" if v is None else spec.format(v)


def _x(a, b):
    return "-" if not a or not b else f"{a / b:.2f}×"


def ratio(results, a, b, *keys):
    """a / b for the figure at keys. When both rows have interleaved rounds for the
    scenario (keys[0]), the median of the per-round ratios: each round measures every
    server within the same minute or two, so drift between rounds cancels out."""
    ra, rb = _get(results.get(a, {}), keys[0], "rounds"), _get(results.get(b, {}), keys[0], "rounds")
    if ra and rb and len(ra) == len(rb) and len(keys) == 2:
        vals = [x[keys[1]] / y[keys[1]] for x, y in zip(ra, rb) if x.get(keys[1]) and y.get(keys[1])]
        if vals:
            return statistics.median(vals)
    va, vb = _get(results.get(a, {}), *keys), _get(results.get(b, {}), *keys)
    return (va / vb) if va and vb else None


def _xr(results, a, b, *keys):
    r = ratio(results, a, b, *keys)
    return "-" if r is None else f"{r:.2f}×"


def progress_line(name, row):
    bits = [f"{name:22s}"]
    if "error" in row:
        bits.append("ERROR " + row["error"][:80])
    if _get(row, "close", "rps") is not None:
        bits.append(f"close {row['close']['rps']:.0f}/s "
                    f"prim {row['close']['primary_us_per_conn']:.1f}us/conn")
    if _get(row, "keepalive", "rps") is not None:
        bits.append(f"ka {row['keepalive']['rps']:.0f}/s")
    if _get(row, "tail", "light_p99_ms") is not None:
        bits.append(f"tail p99 {row['tail']['light_p99_ms']:.1f}ms")
    if _get(row, "fairness"):
        bits.append("fair " + "/".join(f"{v['max_share'] * 100:.0f}%" for v in row["fairness"].values()))
    if _get(row, "memory", "worker_uss_kb") is not None:
        bits.append(f"uss {row['memory']['worker_uss_kb'] / 1024:.1f}MB")
    if _get(row, "recovery"):
        r = row["recovery"]
        bits.append(f"kill->serve {_f(r.get('kill_to_serving_ms'))}ms "
                    f"fail kill {_f(_get(r, 'kill_under_load', 'failed'))} "
                    f"hup {_f(_get(r, 'hup_under_load', 'failed'))}")
    return "  ".join(bits)


def headline_values(results, meta):
    """[(label, value, target, lower_is_better)]: the targets bench/README.md lists
    and the ratios people ask about (value None when a side is missing)."""
    base = _baseline_name(results, meta)
    out = []

    def add(label, value, target=None, lower=False):
        out.append((label, value, target, lower))

    if base:
        asgi = base.replace("rr", "asgi rr", 1)
        add(f"`Connection: close` req/s, {base} / gunicorn sync", ratio(results, base, "gunicorn sync", "close", "rps"), 2)
        add(f"`Connection: close` req/s, {asgi} / uvicorn", ratio(results, asgi, "uvicorn", "close", "rps"), 1)
        add(f"`Connection: close` req/s, {base} / uvicorn", ratio(results, base, "uvicorn", "close", "rps"))
        add(f"`Connection: close` req/s, {base} / node cluster rr", ratio(results, base, "node cluster rr", "close", "rps"))
        add(f"keep-alive req/s, {base} / gunicorn gthread", ratio(results, base, "gunicorn gthread", "keepalive", "rps"), 1.5)
        add(f"keep-alive req/s, {asgi} / uvicorn", ratio(results, asgi, "uvicorn", "keepalive", "rps"))
        add(f"keep-alive req/s, {base} / node cluster rr", ratio(results, base, "node cluster rr", "keepalive", "rps"))
    for be in ("c", "python"):
        add(f"primary CPU per connection, pyfork rr {be} / floor",
            ratio(results, f"pyfork rr {be}", "floor (bare C)", "close", "primary_us_per_conn"))
    add("primary CPU per connection, pyfork rr c / pyfork rr python",
        ratio(results, "pyfork rr c", "pyfork rr python", "close", "primary_us_per_conn"), 0.5, True)
    add("primary CPU per connection, node cluster rr / pyfork rr c",
        ratio(results, "node cluster rr", "pyfork rr c", "close", "primary_us_per_conn"))
    for be in ("c", "python"):
        add(f"light-request p99 with 5% heavy, pyfork least {be} / pyfork rr {be}",
            ratio(results, f"pyfork least {be}", f"pyfork rr {be}", "tail", "light_p99_ms"), 1 / 3, True)
        add(f"light requests stuck behind a heavy one, pyfork least {be} / pyfork rr {be}",
            ratio(results, f"pyfork least {be}", f"pyfork rr {be}", "tail", "behind_heavy"))
    if base:
        for peer in ("node cluster rr", "gunicorn sync", "uvicorn"):
            add(f"worker USS, {peer} / {base}", ratio(results, peer, base, "memory", "worker_uss_kb"))
    return out


def headline(results, meta):
    """The headline as markdown bullet lines."""
    out = []
    for label, r, target, lower in headline_values(results, meta):
        if r is None:
            continue
        verdict = ""
        if target is not None:
            ok = r <= target if lower else r >= target
            shown = "1/3" if abs(target - 1 / 3) < 1e-9 else f"{target:g}"
            verdict = f" (target {'≤' if lower else '≥'} {shown}: {'met' if ok else 'MISSED'})"
        out.append(f"- {label}: **{r:.2f}×**{verdict}")
    for be in ("c", "python"):
        lb = _get(results.get(f"pyfork least {be}", {}), "tail", "behind_heavy")
        rb = _get(results.get(f"pyfork rr {be}", {}), "tail", "behind_heavy")
        if lb is not None and rb is not None:
            out.append(f"- light requests stuck behind a heavy one: pyfork least {be} "
                       f"**{lb * 100:.1f}%** vs pyfork rr {be} **{rb * 100:.1f}%**")
    for name, row in results.items():
        rc = row.get("recovery")
        if rc and name.startswith("pyfork"):
            out.append(f"- {name}: SIGKILL → replacement answering in "
                       f"{_f(rc.get('kill_to_serving_ms'))} ms; failed requests: "
                       f"{_f(_get(rc, 'kill_under_load', 'failed'))} with a worker SIGKILLed under load, "
                       f"{_f(_get(rc, 'hup_under_load', 'failed'))} during a rolling restart under load")
    return out


def spread(paths):
    """Markdown table of the headline ratios of several compare.json runs and their spread."""
    runs = []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        runs.append(headline_values(data["results"], data["meta"]))
    lines = ["| ratio | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " | spread |",
             "|---|" + "---:|" * (len(runs) + 1)]
    for i, (label, *_rest) in enumerate(runs[0]):
        vals = [r[i][1] if i < len(r) else None for r in runs]
        got = [v for v in vals if v]
        sp = f"{(max(got) - min(got)) / (sum(got) / len(got)) * 100:.0f}%" if len(got) > 1 else "-"
        lines.append(f"| {label} | " + " | ".join(_f(v, "{:.2f}") for v in vals) + f" | {sp} |")
    return "\n".join(lines) + "\n"


def markdown(results, meta):
    base = _baseline_name(results, meta)
    a = meta["args"]
    m = meta["machine"]
    rows = list(results.items())
    L = [
        "# pyfork against gunicorn, uvicorn and Node cluster",
        "",
        f"Measured {meta['time']} in one run of `python bench/compare.py` "
        f"({meta['elapsed_s']:.0f} s) on {m.get('cpus')} CPUs ({m.get('cpu', '?')}), "
        f"Linux {m.get('kernel')}, Python {m.get('python')}; load average "
        f"{meta['loadavg_start'][0]:.2f} at start, {meta['loadavg_end'][0]:.2f} at end. "
        f"{a['workers']} workers per server, loopback, wrk -t{a['threads']} -c{a['conns']} for "
        f"{a['duration']:g} s per throughput run. Ratios are to **{base or 'n/a'}** measured in "
        "the same run unless the column says otherwise; they are ratios on a shared 2-core "
        "machine, not absolute claims.",
        "",
        "## Headline",
        "",
        *headline(results, meta),
        "",
        "## Throughput (hello world)",
        "",
        f"req/s is the median over {a.get('rounds', 1)} interleaved rounds; × base is the median of "
        "the per-round ratios (each round runs every server within the same minute or two).",
        "",
        "| server | close req/s | close × base | close p99 ms | keep-alive req/s | keep-alive × base | keep-alive p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        if "close" not in r and "keepalive" not in r:
            continue
        errs = (_get(r, "close", "errors") or 0) + (_get(r, "keepalive", "errors") or 0)
        note = f" ({r['note']})" if r.get("note") else ""
        L.append(f"| {name}{note} | {_f(_get(r, 'close', 'rps'))} | {_xr(results, name, base, 'close', 'rps')} | "
                 f"{_f(_get(r, 'close', 'p99_us') and _get(r, 'close', 'p99_us') / 1e3, '{:.2f}')} | "
                 f"{_f(_get(r, 'keepalive', 'rps'))} | {_xr(results, name, base, 'keepalive', 'rps')} | "
                 f"{_f(_get(r, 'keepalive', 'p99_us') and _get(r, 'keepalive', 'p99_us') / 1e3, '{:.2f}')} | {errs} |")

    L += ["", "## Primary CPU per connection (`Connection: close` run)", "",
          "CPU time of the process that was started (primary / arbiter / supervisor), all threads, "
          "from /proc/<pid>/schedstat, divided by requests served. Where workers accept "
          "themselves (shared, reuseport, gunicorn, uvicorn, node none) the primary only supervises.",
          "",
          "| server | µs / conn | × floor | × base | µs (stat ticks) |", "|---|---:|---:|---:|---:|"]
    for name, r in rows:
        v = _get(r, "close", "primary_us_per_conn")
        if v is None:
            continue
        L.append(f"| {name} | {v:.2f} | {_xr(results, name, 'floor (bare C)', 'close', 'primary_us_per_conn')} | "
                 f"{_xr(results, name, base, 'close', 'primary_us_per_conn')} | "
                 f"{_f(_get(r, 'close', 'primary_us_per_conn_ticks'), '{:.2f}')} |")

    conc = [str(c) for c in a.get("fair_conc", [1, 4, 64])]
    L += ["", "## Fairness (`Connection: close`, share of requests per worker)", "",
          f"Largest worker share; × fair = that share over the fair share 1/{a['workers']} "
          "(1.00 is perfectly even).", "",
          "| server | " + " | ".join(f"c={c} max share | × fair" for c in conc) + " |",
          "|---|" + "---:|---:|" * len(conc)]
    for name, r in rows:
        fr = r.get("fairness")
        if not fr:
            continue
        cells = []
        for c in conc:
            s = _get(fr, c, "max_share")
            cells += [_f(s and s * 100, "{:.1f}%"), _f(s and s * a["workers"], "{:.2f}")]
        L.append(f"| {name} | " + " | ".join(cells) + " |")

    bt = _get(results.get(base, {}), "tail", "light_p99_ms")
    hn = meta.get("heavy_n", {})
    L += ["", "## Tail latency with mixed work", "",
          f"Open loop, Poisson arrivals at {a['tail_rate']:g}/s for {a['tail_duration']:g} s, a new "
          f"connection per request; {a['heavy_frac'] * 100:g}% hit /fibonacci (n={hn.get('python')} "
          f"for Python, {hn.get('node')} for Node: ≈{a['heavy_ms']:g} ms CPU each), the rest `/`.",
          "",
          "**behind heavy** = share of light requests that started while a heavy request was in "
          "flight on the worker that answered them (a dispatch decision: CPU noise from other "
          "processes does not move it, while it does move p99).", "",
          "| server | light p50 ms | light p99 ms | p99 × base | light max ms | behind heavy | heavy p50 ms | failed |",
          "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        t = r.get("tail")
        if not t:
            continue
        L.append(f"| {name} | {_f(t['light_p50_ms'], '{:.2f}')} | {_f(t['light_p99_ms'], '{:.2f}')} | "
                 f"{_x(t['light_p99_ms'], bt)} | {_f(t['light_max_ms'], '{:.1f}')} | "
                 f"{_f(t.get('behind_heavy') is not None and t['behind_heavy'] * 100 or None, '{:.1f}%')} | "
                 f"{_f(t['heavy_p50_ms'], '{:.1f}')} | {t['failed']} |")

    bm = _get(results.get(base, {}), "memory", "worker_uss_kb")
    L += ["", "## Memory (after the load runs)", "",
          "USS = Private_Clean + Private_Dirty from /proc/<pid>/smaps_rollup (memory a process "
          "would free on exit); RSS counts shared pages too.", "",
          "| server | primary RSS MB | worker USS MB (mean) | worker USS × base | worker RSS MB | total USS MB |",
          "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        mm = r.get("memory")
        if not mm:
            continue
        L.append(f"| {name} | {mm['primary_rss_kb'] / 1024:.1f} | {mm['worker_uss_kb'] / 1024:.1f} | "
                 f"{_x(mm['worker_uss_kb'], bm)} | {mm['worker_rss_kb'] / 1024:.1f} | "
                 f"{mm['total_uss_kb'] / 1024:.1f} |")

    br = _get(results.get(base, {}), "recovery", "kill_to_serving_ms")
    L += ["", "## Recovery", "",
          f"SIGKILL of an idle worker: time until a new worker process exists and until it answers a "
          f"request. Under load (wrk -c{a['recovery_conns']} `Connection: close`): failed requests "
          "(socket errors + non-2xx) when a worker is SIGKILLed, and during a SIGHUP rolling restart "
          "(gunicorn, uvicorn and pyfork built-in; node_cluster.js does the article's "
          "fork-then-disconnect).", "",
          "| server | kill → fork ms | kill → serving ms | × base | failed / requests, kill under load | failed / requests, HUP under load | HUP restart s |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        rc = r.get("recovery")
        if not rc:
            continue
        k, h = rc.get("kill_under_load", {}), rc.get("hup_under_load", {})
        L.append(f"| {name} | {_f(rc.get('kill_to_fork_ms'), '{:.0f}')} | "
                 f"{_f(rc.get('kill_to_serving_ms'), '{:.0f}')} | {_x(rc.get('kill_to_serving_ms'), br)} | "
                 f"{_f(k.get('failed'))} / {_f(k.get('requests'))} | {_f(h.get('failed'))} / "
                 f"{_f(h.get('requests'))} | {_f(h.get('restart_s'), '{:.2f}')} |")

    notes = list(meta.get("skipped", []))
    for name, r in rows:
        if "error" in r:
            notes.append(f"{name}: {r['error']}")
        for scen, err in r.get("scenario_errors", {}).items():
            notes.append(f"{name} {scen}: {err}")
    if notes:
        L += ["", "## Skipped and errors", ""] + [f"- {n}" for n in notes]
    L += ["", "Reproduce: `python bench/compare.py` (see bench/README.md for options).", ""]
    return "\n".join(L)


def plot(results, meta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = _baseline_name(results, meta)
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    fig.suptitle(f"pyfork vs peers, ratios to {base} in one run ({meta['time']}, "
                 f"{meta['machine'].get('cpus')} CPUs, {meta['args']['workers']} workers)")

    def panel(ax, title, series, xlabel, ref=1.0):
        """series: list of (label, {name: value}); one horizontal bar group per name."""
        names = [n for n in results if any(s.get(n) is not None for _, s in series)]
        if not names:
            ax.set_axis_off()
            ax.set_title(title + " (no data)")
            return
        h = 0.8 / len(series)
        for i, (label, s) in enumerate(series):
            ys = [k + i * h for k in range(len(names))]
            ax.barh(ys, [s.get(n) or 0 for n in names], height=h, label=label)
        ax.set_yticks([k + 0.4 - h / 2 for k in range(len(names))])
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
        if ref is not None:
            ax.axvline(ref, color="k", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        if len(series) > 1:
            ax.legend(fontsize=7)

    def rel(*keys, base_name=base):
        return {n: ratio(results, n, base_name, *keys) for n in results}

    panel(axes[0][0], "throughput (× base, higher is better)",
          [("Connection: close", rel("close", "rps")), ("keep-alive", rel("keepalive", "rps"))],
          "× base req/s")
    panel(axes[0][1], "primary CPU per connection (× floor, lower is better)",
          [("µs/conn × floor", rel("close", "primary_us_per_conn", base_name="floor (bare C)"))],
          "× bare-C floor")
    w = meta["args"]["workers"]
    panel(axes[0][2], "fairness: largest worker share × fair share (1 = even)",
          [(f"c={c}", {n: (_get(r, "fairness", str(c), "max_share") or 0) * w or None
                       for n, r in results.items()}) for c in meta["args"].get("fair_conc", [])],
          "× fair share")
    panel(axes[1][0], "light-request p99 with 5% heavy (× base, lower is better)",
          [("p99", rel("tail", "light_p99_ms")), ("p50", rel("tail", "light_p50_ms"))], "× base")
    panel(axes[1][1], "worker USS (× base, lower is better)",
          [("worker USS", rel("memory", "worker_uss_kb"))], "× base")
    panel(axes[1][2], "recovery: SIGKILL → replacement answers (ms)",
          [("kill → serving ms", {n: _get(r, "recovery", "kill_to_serving_ms")
                                   for n, r in results.items()})], "ms", ref=None)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/compare_report.py RUN1.json [RUN2.json ...]")
    print(spread(sys.argv[1:]), end="")
