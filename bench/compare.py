"""pyfork against the servers people use today, every figure measured in one run.

Theory of operation: each server in the list (pyfork: every policy x backend;
the bare-C floor; gunicorn sync and gthread; uvicorn --workers; Node cluster
RR and SCHED_NONE; granian WSGI and ASGI; the stdlib-loop ASGI pair, uvicorn
--loop asyncio and pyfork ASGI with PYFORK_UVLOOP=0) serves bench/hello_app.py (node_cluster.js for Node) on
loopback with the same number of workers. All servers are started first and
stay up (an idle server costs nothing); the load scenarios then run in
interleaved rounds across servers, so drift on a shared machine hits every
server alike instead of whichever ran during a busy minute. Load is bounded
(wrk with a fixed connection count, or an open-loop Python client at a fixed
rate) and loopback-only. Scenarios:

  tail       (runs first) open-loop client: Poisson arrivals, 5% hit
             /fibonacci (n calibrated to --heavy-ms of CPU), p50/p99 of the
             light requests and the share of them that landed behind a heavy one
  close      wrk throughput with `Connection: close`; the primary's CPU per
             connection is read from /proc/<pid>/schedstat during this run
  keepalive  wrk throughput with keep-alive
  memory     primary RSS, per-worker USS (smaps_rollup), after the load runs
  fairness   per-worker share of requests at wrk concurrency 1, 4, 64
             (Connection: close, pids counted by bench/pidcount.lua)
  mixed      (not in the default run: --scenarios mixed) issue 10's mixed load:
             one slow request always in flight (/sleep, then /fibonacci) while
             light clients (4 new-connection, 8 keep-alive) measure p50/p90/p99;
             gunicorn sync, gthread, uvicorn and each pyfork policy (first
             backend); writes results/compare-mixed.{md,json} (compare_mixed.py)
  recovery   SIGKILL an idle worker -> time until the replacement answers;
             SIGKILL a worker under wrk load -> failed requests; SIGHUP
             (rolling restart) under wrk load -> failed requests
Results: bench/results/compare.{md,json,png} (tables and plot by
bench/compare_report.py). Ratios compare servers measured in the same minutes on a
shared 2-core machine, even interleaved: run twice and read the spread.

Usage: python bench/compare.py [--duration 2] [--rounds 3] [--workers 2]
       [--peers pyfork,floor,gunicorn,uvicorn,node,granian,stdloop] [--scenarios ...] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import compare_conns  # noqa: E402
import compare_mixed  # noqa: E402
import compare_report  # noqa: E402
from compare_scenarios import (calibrate, run_close, run_fairness, run_keepalive,  # noqa: E402
                               run_memory, run_recovery, run_tail, summarize_rounds,
                               summarize_tail)

ALL_PEERS = ("pyfork", "floor", "gunicorn", "uvicorn", "node", "granian", "stdloop")
ALL_SCENARIOS = ("close", "keepalive", "memory", "fairness", "tail", "recovery", "mixed", "conns")
FULL = {"close", "keepalive", "memory", "fairness", "tail"}
BASELINE = "pyfork rr c"


@dataclasses.dataclass
class Spec:
    name: str
    family: str                      # pyfork | floor | gunicorn | uvicorn | node
    cmd: list[str]
    env: dict
    scenarios: set
    ready_line: bool = False         # prints "READY <port>" (floor) instead of taking a port
    impl: str = "python"             # which fib the heavy route runs: python | node | none
    note: str = ""


def build_specs(args) -> tuple[list[Spec], list[str]]:
    """The server list for this run, and a line for every participant skipped."""
    specs, skipped = [], []
    py, w, bench = sys.executable, str(args.workers), benchlib.BENCH_DIR
    penv = benchlib.python_env()
    want = set(args.scenarios)

    def sc(*names):
        return set(names) & want

    if "floor" in args.peers:
        try:
            exe, _ = benchlib.build_floor()
            specs.append(Spec("floor (bare C)", "floor", [exe, "-w", w, "-m", "http"], dict(os.environ),
                              sc("close", "memory"), ready_line=True, impl="none",
                              note="Connection: close only"))
        except benchlib.Unavailable as e:
            skipped.append(f"floor: skipped ({e})")

    if "pyfork" in args.peers:
        why_cli = benchlib.pyfork_cli_available()
        if why_cli:
            skipped.append(f"pyfork: skipped, `pyfork serve` unavailable ({why_cli})")
        else:
            for be in args.backends:
                why = benchlib.backend_available(be)
                if why:
                    skipped.append(f"pyfork backend {be}: skipped ({why})")
                    continue
                for pol in args.policies:
                    full = be == args.backends[0] or args.everything
                    scen = sc(*FULL) if full else sc("close", "keepalive", "memory")
                    if pol in ("rr", "shared") and full:
                        scen |= sc("recovery")
                    if be == args.backends[0]:
                        scen |= sc("mixed")
                    specs.append(Spec(
                        f"pyfork {pol} {be}", "pyfork",
                        [py, "-m", "pyfork", "serve", "hello_app:app", "--interface", "wsgi",
                         "--policy", pol, "--backend", be, "-w", w, "-b", "127.0.0.1:{port}"],
                        penv, scen))
            if args.backends and not benchlib.backend_available(args.backends[0]):
                be = args.backends[0]
                specs.append(Spec(
                    f"pyfork asgi rr {be}", "pyfork",
                    [py, "-m", "pyfork", "serve", "hello_app:asgi", "--interface", "asgi",
                     "--policy", "rr", "--backend", be, "-w", w, "-b", "127.0.0.1:{port}"],
                    penv, sc("close", "keepalive", "memory")))

    if "gunicorn" in args.peers:
        if importlib.util.find_spec("gunicorn") is None:
            skipped.append("gunicorn: skipped, not installed (pip install gunicorn)")
        else:
            base = [py, "-m", "gunicorn", "-w", w, "-b", "127.0.0.1:{port}", "--chdir", bench,
                    "--log-level", "warning"]
            specs.append(Spec("gunicorn sync", "gunicorn", base + ["-k", "sync", "hello_app:app"],
                              penv, sc(*FULL, "recovery", "mixed")))
            specs.append(Spec("gunicorn gthread", "gunicorn",
                              base + ["-k", "gthread", "--threads", str(args.gthreads), "hello_app:app"],
                              penv, sc(*FULL, "mixed"), note=f"--threads {args.gthreads}"))

    if "uvicorn" in args.peers:
        if importlib.util.find_spec("uvicorn") is None:
            skipped.append("uvicorn: skipped, not installed (pip install uvicorn)")
        else:
            specs.append(Spec("uvicorn", "uvicorn",
                              [py, "-m", "uvicorn", "hello_app:asgi", "--workers", w, "--host",
                               "127.0.0.1", "--port", "{port}", "--log-level", "warning",
                               "--no-access-log"], penv, sc(*FULL, "recovery", "mixed")))

    if "node" in args.peers:
        if not shutil.which("node"):
            skipped.append("node: skipped, `node` not installed (apt-get install nodejs)")
        else:
            js = os.path.join(bench, "node_cluster.js")
            for pol, label in (("rr", "node cluster rr"), ("none", "node cluster none")):
                env = {**os.environ, "WORKERS": w, "NODE_CLUSTER_SCHED_POLICY": pol}
                scen = sc(*FULL, "recovery") if pol == "rr" else sc(*FULL)
                specs.append(Spec(label, "node", ["node", js], env, scen, impl="node"))
    if "granian" in args.peers:
        granian_specs(args, specs, skipped)
    if "stdloop" in args.peers:
        stdloop_specs(args, specs, skipped)
    if args.only:
        specs = [s for s in specs if any(o in s.name for o in args.only)]
    return specs, skipped


def granian_specs(args, specs: list, skipped: list) -> None:
    """granian (Rust/hyper, one process per worker) serving the same app as WSGI and ASGI.
    Its defaults otherwise (ASGI on uvloop when installed, as pyfork's and uvicorn's)."""
    if importlib.util.find_spec("granian") is None:
        skipped.append("granian: skipped, not installed (pip install granian)")
        return
    want = set(args.scenarios)
    for interface, target in (("wsgi", "hello_app:app"), ("asgi", "hello_app:asgi")):
        specs.append(Spec(
            f"granian {interface}", "granian",
            [sys.executable, "-m", "granian", "--interface", interface, "--workers", str(args.workers),
             "--host", "127.0.0.1", "--port", "{port}", "--log-level", "warning", "--no-access-log",
             target], benchlib.python_env(), {"close", "keepalive", "memory"} & want))


def stdloop_specs(args, specs: list, skipped: list) -> None:
    """The ASGI pair on asyncio's own loop (what `pip install uvicorn` gives without
    uvloop): uvicorn --loop asyncio, and pyfork's ASGI interface with PYFORK_UVLOOP=0
    (pyfork.serve.aio.loop_factory)."""
    want = {"close", "keepalive", "memory"} & set(args.scenarios)
    w = str(args.workers)
    if importlib.util.find_spec("uvicorn") is None:
        skipped.append("stdloop: skipped, uvicorn not installed (pip install uvicorn)")
        return
    be = args.backends[0] if args.backends else "c"
    if "pyfork" in args.peers and not benchlib.backend_available(be):
        specs.append(Spec(
            f"pyfork asgi rr {be} asyncio-loop", "pyfork",
            [sys.executable, "-m", "pyfork", "serve", "hello_app:asgi", "--interface", "asgi",
             "--policy", "rr", "--backend", be, "-w", w, "-b", "127.0.0.1:{port}"],
            benchlib.python_env({"PYFORK_UVLOOP": "0"}), want, note="PYFORK_UVLOOP=0"))
    specs.append(Spec("uvicorn asyncio-loop", "uvicorn",
                      [sys.executable, "-m", "uvicorn", "hello_app:asgi", "--workers", w, "--host",
                       "127.0.0.1", "--port", "{port}", "--log-level", "warning", "--no-access-log",
                       "--loop", "asyncio"], benchlib.python_env(), want, note="--loop asyncio"))


# (label, pyfork server, peer server): the pairs issue 17 asks about, printed as ratios
# of the same run under the report's tables.
PEER_PAIRS = (
    ("WSGI, pyfork / granian", "pyfork rr {be}", "granian wsgi"),
    ("ASGI, pyfork / granian", "pyfork asgi rr {be}", "granian asgi"),
    ("ASGI on asyncio's loop, pyfork / uvicorn", "pyfork asgi rr {be} asyncio-loop", "uvicorn asyncio-loop"),
)


def peer_ratios(results, args) -> str:
    """Markdown: `Connection: close` and keep-alive req/s ratios of PEER_PAIRS and worker USS,
    the median of the per-round ratios (compare_report.ratio)."""
    be = args.backends[0] if args.backends else "c"
    lines = ["## Peer pairs (issue 17)", "",
             "| pair | close × | keep-alive × | worker USS MB (pyfork / peer) |", "|---|---:|---:|---:|"]
    for label, ours, peer in PEER_PAIRS:
        ours = ours.format(be=be)
        if ours not in results or peer not in results:
            continue
        cells = []
        for scen in ("close", "keepalive"):
            r = compare_report.ratio(results, ours, peer, scen, "rps")
            cells.append("-" if r is None else f"{r:.2f}×")
        mem = [(results[n].get("memory") or {}).get("worker_uss_kb") for n in (ours, peer)]
        cells.append(" / ".join("-" if m is None else f"{m / 1024:.1f}" for m in mem))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n" + "\n".join(lines) + "\n" if len(lines) > 4 else ""


def start(spec: Spec, args) -> benchlib.Server:
    log = os.path.join(args.log_dir, "compare-" + spec.name.replace(" ", "_").replace("(", "")
                       .replace(")", "") + ".log")
    if spec.ready_line:
        return benchlib.Server(spec.name, spec.cmd, env=spec.env, log_path=log, ready_line=True,
                               own_session=not args.same_session)
    port = benchlib.free_port()
    cmd = [c.replace("{port}", str(port)) for c in spec.cmd]
    env = dict(spec.env)
    if spec.family == "node":
        env["PORT"] = str(port)
    server = benchlib.Server(spec.name, cmd, env=env, cwd=benchlib.BENCH_DIR, log_path=log,
                             own_session=not args.same_session)
    server.wait_http(port, args.workers)
    return server


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="pyfork vs gunicorn, uvicorn, Node cluster (one run)")
    ap.add_argument("--duration", type=float, default=2.0,
                    help="seconds per wrk throughput run, per round; whole seconds (2)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds of the throughput and tail scenarios (3)")
    ap.add_argument("--workers", type=int, default=2, help="workers per server (2)")
    ap.add_argument("--conns", type=int, default=32, help="wrk connections for throughput (32)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    ap.add_argument("--peers", default=",".join(ALL_PEERS),
                    help="comma list of " + ",".join(ALL_PEERS) + " (all)")
    ap.add_argument("--scenarios", default=",".join(s for s in ALL_SCENARIOS
                                                    if s not in ("mixed", "conns")),
                    help="comma list of " + ",".join(ALL_SCENARIOS) + " (all but mixed, conns)")
    ap.add_argument("--policies", default="rr,least,shared,reuseport")
    ap.add_argument("--backends", default="c,python",
                    help="pyfork backends; the first one also runs fairness/tail/recovery")
    ap.add_argument("--everything", action="store_true",
                    help="run every scenario for every pyfork backend too (slower)")
    ap.add_argument("--only", default="", help="comma list of substrings of server names")
    ap.add_argument("--gthreads", type=int, default=4, help="gunicorn gthread --threads (4)")
    ap.add_argument("--fair-conc", default="1,4,64", help="fairness concurrencies (1,4,64)")
    ap.add_argument("--fair-duration", type=float, default=1.0)
    ap.add_argument("--tail-rate", type=float, default=50.0, help="tail: requests/s (50)")
    ap.add_argument("--tail-duration", type=float, default=16.0,
                    help="seconds of tail load per server, split over the rounds (16)")
    ap.add_argument("--heavy-frac", type=float, default=0.05)
    ap.add_argument("--heavy-ms", type=float, default=25.0,
                    help="tail: CPU ms of a heavy request; fib n is calibrated to it (25)")
    ap.add_argument("--mixed-duration", type=float, default=4.0,
                    help="mixed: seconds of light load per variant, per round (4)")
    ap.add_argument("--mixed-threads", type=int, default=1,
                    help="mixed: wrk threads of the light clients (1)")
    ap.add_argument("--sleep-ms", type=int, default=25, help="mixed: ms of /sleep (25)")
    ap.add_argument("--heavy-n", type=int, default=0,
                    help="fixed /fibonacci n for Python servers instead of calibrating it "
                         "(calibration on a busy machine picks a smaller n)")
    ap.add_argument("--recovery-conns", type=int, default=16)
    # conns (issue 18): runs on its own (compare_conns.py), servers started per N
    ap.add_argument("--conns-n", default="1000,5000,10000",
                    help="conns: open active keep-alive connections per measurement")
    ap.add_argument("--conns-rate", type=float, default=2000.0,
                    help="conns: total req/s of the N connections at most (each sends every "
                         "max(0.5 s, N/rate)) (2000)")
    ap.add_argument("--conns-keepalive", type=float, default=30.0,
                    help="conns: keep-alive timeout given to every server, s (30)")
    ap.add_argument("--conns-probes", type=int, default=200, help="conns: fresh-client probes (200)")
    ap.add_argument("--conns-rounds", type=int, default=1, help="conns: rounds (1)")
    ap.add_argument("--conns-policies", default="rr", help="conns: pyfork policies (rr)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="short runs for a smoke test")
    ap.add_argument("--same-session", action="store_true",
                    help="start servers in this session (wrk's scheduling group under autogroup "
                         "scheduling) instead of each in its own, as from another terminal "
                         "(bench/mixed_sched_group.py)")
    ap.add_argument("--out", default=None,
                    help="output path without extension (.md .json .png); default "
                         "results/compare, or results/compare-mixed for --scenarios mixed")
    args = ap.parse_args(argv)
    args.peers = [p for p in args.peers.split(",") if p]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.policies = [p for p in args.policies.split(",") if p]
    args.backends = [b for b in args.backends.split(",") if b]
    args.only = [o for o in args.only.split(",") if o]
    args.fair_conc = [int(c) for c in args.fair_conc.split(",") if c]
    args.conns_argv = [a for a in (argv if argv is not None else sys.argv[1:])
                       if a not in ("--scenarios", "conns")]
    args.conns_n = [int(n) for n in args.conns_n.split(",") if n]
    args.conns_policies = [p for p in args.conns_policies.split(",") if p]
    for name in args.peers:
        if name not in ALL_PEERS:
            ap.error(f"unknown peer {name!r}")
    for name in args.scenarios:
        if name not in ALL_SCENARIOS:
            ap.error(f"unknown scenario {name!r}")
    if "conns" in args.scenarios and args.scenarios != ["conns"]:
        ap.error("the conns scenario runs on its own: --scenarios conns")
    if args.out is None and args.scenarios != ["conns"]:    # compare_conns picks its own
        only_mixed = args.scenarios == ["mixed"]
        args.out = os.path.join(benchlib.RESULTS_DIR, "compare-mixed" if only_mixed else "compare")
    if args.quick:
        args.duration, args.fair_duration, args.tail_duration, args.rounds = 1.0, 1.0, 3.0, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.scenarios == ["conns"]:
        return compare_conns.run(args)       # its own servers and client; no wrk
    if not benchlib.wrk_path():
        print(benchlib.WRK_HINT, file=sys.stderr)
        return 2
    args.log_dir = os.path.join(benchlib.RESULTS_DIR, "logs")
    os.makedirs(args.log_dir, exist_ok=True)
    t_start = time.monotonic()
    specs, skipped = build_specs(args)
    for line in skipped:
        print(line, flush=True)
    heavy_n = calibrate(args) if {"tail", "mixed"} & set(args.scenarios) else {}
    if heavy_n and args.heavy_n:
        heavy_n.update(python=args.heavy_n, none=args.heavy_n)
    if heavy_n:
        print(f"tail: heavy route /fibonacci n per implementation: {heavy_n}", flush=True)
    load0 = os.getloadavg()
    results = {s.name: {"family": s.family, "note": s.note} for s in specs}
    servers = {}
    try:
        # Every server runs for the whole comparison (idle ones cost ~nothing), so the
        # load scenarios can be interleaved: drift on a shared machine then hits every
        # server alike instead of whichever happened to run during a busy minute.
        for spec in specs:
            try:
                servers[spec.name] = start(spec, args)
                benchlib.run_wrk(servers[spec.name].port, 1, args.conns, args.threads)  # warm-up
                print(f"started {spec.name} (pid {servers[spec.name].pid})", flush=True)
            except (RuntimeError, OSError) as e:
                results[spec.name]["error"] = str(e).splitlines()[0]
                print(f"{spec.name}: failed to start: {results[spec.name]['error']}", flush=True)
        live = [s for s in specs if s.name in servers]

        def each(scen, fn, *extra, reverse=False):
            for spec in (live[::-1] if reverse else live):
                if scen not in spec.scenarios:
                    continue
                server = servers[spec.name]
                if not server.alive():
                    results[spec.name].setdefault("error", f"exited before {scen}")
                    continue
                try:
                    fn(spec, server, *extra)
                except (RuntimeError, OSError, subprocess.SubprocessError, KeyError,
                        ValueError, IndexError, ZeroDivisionError) as e:
                    results[spec.name].setdefault("scenario_errors", {})[scen] = repr(e)
                    print(f"  {spec.name} {scen}: error {e!r}", flush=True)

        per_round = {name: {"close": [], "keepalive": [], "tail": [], "mixed": []}
                     for name in servers}
        # Tail first: latency is the figure most easily disturbed by what ran before it.
        # Every other round runs the servers in reverse order (A B, B A, ...), so that
        # neither a trend over the run nor what ran just before favours a server.
        for r in range(args.rounds):
            print(f"tail round {r + 1}/{args.rounds}", flush=True)
            each("tail", lambda sp, sv: per_round[sp.name]["tail"].extend(
                run_tail(sv, sp, args, heavy_n, r)), reverse=r % 2 == 1)
        for spec in live:
            if per_round[spec.name]["tail"]:
                results[spec.name]["tail"] = summarize_tail(per_round[spec.name]["tail"],
                                                            heavy_n[spec.impl])
        for r in range(args.rounds):
            if not any("mixed" in s.scenarios for s in live):
                break
            print(f"mixed round {r + 1}/{args.rounds}", flush=True)
            each("mixed", lambda sp, sv: per_round[sp.name]["mixed"].append(
                compare_mixed.run_mixed(sv, sp, args, heavy_n)), reverse=r % 2 == 1)
        for spec in live:
            if per_round[spec.name]["mixed"]:
                results[spec.name]["mixed"] = compare_mixed.summarize_mixed(
                    per_round[spec.name]["mixed"])
        for r in range(args.rounds):
            print(f"throughput round {r + 1}/{args.rounds}", flush=True)
            each("close", lambda sp, sv: per_round[sp.name]["close"].append(run_close(sv, args)),
                 reverse=r % 2 == 1)
            each("keepalive", lambda sp, sv: per_round[sp.name]["keepalive"].append(
                run_keepalive(sv, args)), reverse=r % 2 == 1)
        for name, pr in per_round.items():
            for scen in ("close", "keepalive"):
                if pr[scen]:
                    results[name][scen] = summarize_rounds(pr[scen])
        each("memory", lambda sp, sv: results[sp.name].__setitem__("memory", run_memory(sv, args)))
        print("fairness", flush=True)
        each("fairness", lambda sp, sv: results[sp.name].__setitem__("fairness", run_fairness(sv, args)))
        print("recovery", flush=True)
        each("recovery", lambda sp, sv: results[sp.name].__setitem__("recovery", run_recovery(sv, args)))
    finally:
        for server in servers.values():
            server.stop()
    for name, row in results.items():
        print(compare_report.progress_line(name, row), flush=True)

    meta = {"args": {k: v for k, v in vars(args).items()}, "skipped": skipped,
            "heavy_n": heavy_n, "machine": benchlib.machine_info(),
            "loadavg_start": load0, "loadavg_end": os.getloadavg(),
            "elapsed_s": round(time.monotonic() - t_start, 1),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "baseline": BASELINE}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    if args.scenarios == ["mixed"]:
        md = compare_mixed.markdown(results, meta)
    else:
        md = compare_report.markdown(results, meta) + peer_ratios(results, args)
        try:
            compare_report.plot(results, meta, args.out + ".png")
        except ImportError as e:
            print(f"plot skipped: {e} (pip install matplotlib)")
        if "mixed" in args.scenarios:
            with open(args.out + "-mixed.md", "w") as f:
                f.write(compare_mixed.markdown(results, meta))
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print()
    print(md)
    print(f"wrote {args.out}.md, .json, .png in {meta['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
