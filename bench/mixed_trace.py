"""Where do light requests wait under mixed load? A tracing experiment for issue 10.

Theory of operation: nothing in pyfork is changed. The server runs `traced_app`,
a WSGI middleware around hello_app.app, which appends one line per request to
a per-process file: the client's send time (header X-Sent, CLOCK_MONOTONIC ns,
written by wrk through bench/xsent.lua just before the request is written), the
time the application was entered and left (same clock: one machine), the
serving pid, the path and the client's port (which names a kept-alive
connection). With the slow requests traced too, every light request is put in
one class:

  busy-at-send   sent while the worker that served it was inside a slow
                 request, and started only after it: dispatched (rr/least:
                 its fd waited in that worker's channel), accepted, or, for a
                 kept-alive connection, pinned to a busy single-threaded worker
                 (waited in its selector)
  taken-before   sent before the slow request started on that worker, but
                 started after it: the worker had both in one batch (channel
                 read or accept batch) and ran the slow one first
  waited-other   waited more than --wait-ms with no slow request in between:
                 the kernel's accept queue, the primary, or CPU
  prompt         started within --wait-ms of being sent

plus the light requests' application time (CPU contention shows there), and
for each class its share and the p50/p99 of its wait (send -> app).

Usage:
  python bench/mixed_trace.py run --policy rr --slow sleep --light close4
  python bench/mixed_trace.py matrix          # every policy x slow x light, one table
The server is `pyfork serve mixed_trace:traced_app` (or gunicorn with --gunicorn
sync|gthread), 2 workers, on loopback; traces go to a temporary directory.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
import hello_app  # noqa: E402

TRACE_DIR_ENV = "MIXED_TRACE_DIR"
_fd = None


def _trace_fd():
    global _fd
    if _fd is None:
        path = os.path.join(os.environ[TRACE_DIR_ENV], f"trace-{os.getpid()}.log")
        _fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return _fd


def traced_app(environ, start_response):
    """hello_app.app, with one trace line per request (one write: cheap, survives kill)."""
    t_in = time.monotonic_ns()
    body = hello_app.app(environ, start_response)
    t_out = time.monotonic_ns()
    line = "%s %d %d %d %s %s\n" % (environ.get("HTTP_X_SENT", "0"), t_in, t_out, os.getpid(),
                                    environ.get("PATH_INFO", "/"), environ.get("REMOTE_PORT", "0"))
    os.write(_trace_fd(), line.encode())
    return body


# ---------------------------------------------------------------- analysis

def load(trace_dir):
    rows = []
    for path in glob.glob(os.path.join(trace_dir, "trace-*.log")):
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 6:
                    sent, t_in, t_out, pid = (int(x) for x in parts[:4])
                    rows.append((sent, t_in, t_out, pid, parts[4], parts[5]))
    return rows


def pct(vals, p):
    if not vals:
        return None
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(round(p / 100 * (len(vals) - 1))))]


def classify(rows, wait_ms=2.0):
    slow = {}
    for sent, t_in, t_out, pid, path, _ in rows:
        if path != "/":
            slow.setdefault(pid, []).append((t_in, t_out))
    light = [r for r in rows if r[4] == "/" and r[0] > 0]
    classes = {"busy-at-send": [], "taken-before": [], "waited-other": [], "prompt": []}
    app_ms, conns_pid = [], {}
    for sent, t_in, t_out, pid, _, port in light:
        wait = (t_in - sent) / 1e6
        app_ms.append((t_out - t_in) / 1e6)
        conns_pid.setdefault(port, set()).add(pid)
        spans = slow.get(pid, ())
        if any(s0 <= sent < s1 and t_in >= s1 for s0, s1 in spans):
            cls = "busy-at-send"
        elif any(sent < s0 and s1 <= t_in for s0, s1 in spans):
            cls = "taken-before"
        elif wait > wait_ms:
            cls = "waited-other"
        else:
            cls = "prompt"
        classes[cls].append(wait)
    n = len(light) or 1
    waits = [w for ws in classes.values() for w in ws]
    out = {"light": len(light), "slow": sum(len(v) for v in slow.values()),
           "wait_p50_ms": pct(waits, 50), "wait_p90_ms": pct(waits, 90),
           "wait_p99_ms": pct(waits, 99), "app_p50_ms": pct(app_ms, 50),
           "app_p99_ms": pct(app_ms, 99),
           "light_per_pid": {}, "classes": {}}
    for sent, t_in, t_out, pid, path, _ in light:
        out["light_per_pid"][pid] = out["light_per_pid"].get(pid, 0) + 1
    for cls, ws in classes.items():
        out["classes"][cls] = {"share": len(ws) / n, "wait_p50_ms": pct(ws, 50),
                               "wait_p99_ms": pct(ws, 99)}
    # kept-alive connections: did any connection move between workers?
    ka_ports = [p for p, pids in conns_pid.items()]
    out["conns"] = len(ka_ports)
    out["conns_on_two_pids"] = sum(1 for pids in conns_pid.values() if len(pids) > 1)
    return out


# ---------------------------------------------------------------- running one experiment

XSENT_LUA = os.path.join(benchlib.BENCH_DIR, "xsent.lua")


def server_cmd(args, port):
    py = sys.executable
    if args.gunicorn:
        return [py, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir",
                benchlib.BENCH_DIR, "--log-level", "warning", "-k", args.gunicorn,
                "--threads", "4", "mixed_trace:traced_app"]
    return [py, "-m", "pyfork", "serve", "mixed_trace:traced_app", "--interface", "wsgi",
            "--policy", args.policy, "--backend", "c", "-w", "2", "-b", f"127.0.0.1:{port}"]


def run_one(args, policy=None, slow=None, light=None):
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in
                                                  (("policy", policy), ("slow", slow),
                                                   ("light", light)) if v}})
    tdir = tempfile.mkdtemp(prefix="mixed-trace-")
    port = benchlib.free_port()
    env = benchlib.python_env({TRACE_DIR_ENV: tdir})
    name = args.gunicorn and f"gunicorn {args.gunicorn}" or f"pyfork {args.policy}"
    server = benchlib.Server(name, server_cmd(args, port), env=env, cwd=benchlib.BENCH_DIR,
                             log_path=os.path.join(tdir, "server.log"))
    try:
        server.wait_http(port, 2)
        t_start = time.monotonic_ns()    # lines before this are readiness probes
        conns, close = {"close4": (4, True), "ka8": (8, False)}[args.light]
        path = f"/sleep?ms={args.sleep_ms}" if args.slow == "sleep" else f"/fibonacci?n={args.fib_n}"
        slow_wrk = benchlib.start_wrk(port, args.duration + 2, 1, 1, close=True, path=path,
                                      script=XSENT_LUA, timeout_s=10)
        time.sleep(0.5)
        res = benchlib.run_wrk(port, args.duration, conns, 1, close=close, script=XSENT_LUA,
                               latency=True)
        benchlib.finish_wrk(slow_wrk)
    finally:
        server.stop()
    out = classify([r for r in load(tdir) if r[1] >= t_start], args.wait_ms)
    out.update({"server": name, "slow_kind": args.slow, "light_kind": args.light,
                "wrk_rps": res["rps"], "wrk_p50_ms": (res.get("p50_us") or 0) / 1e3,
                "wrk_p99_ms": (res.get("p99_us") or 0) / 1e3})
    shutil.rmtree(tdir, ignore_errors=True)
    return out


def _py_light_client(port, conns, duration, close=True):
    """Closed-loop light clients in threads: [(sent_ns, done_ns)] per request; the
    send time is also the X-Sent header, so each row joins its trace line."""
    import socket
    import threading
    out, stop = [], time.monotonic() + duration

    def one_client():
        sock = None
        while time.monotonic() < stop:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sent = time.monotonic_ns()
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Sent: %d\r\n%s\r\n"
                         % (sent, b"Connection: close\r\n" if close else b""))
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            out.append((sent, time.monotonic_ns()))
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=one_client) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def post_app(args):
    """Where the long light requests spend their time: before the app (wait) or after it
    (post: response write to client read), with a Python client that records both ends."""
    tdir = tempfile.mkdtemp(prefix="mixed-trace-")
    port = benchlib.free_port()
    env = benchlib.python_env({TRACE_DIR_ENV: tdir})
    server = benchlib.Server("traced", server_cmd(args, port), env=env, cwd=benchlib.BENCH_DIR,
                             log_path=os.path.join(tdir, "server.log"))
    try:
        server.wait_http(port, 2)
        path = f"/sleep?ms={args.sleep_ms}" if args.slow == "sleep" else f"/fibonacci?n={args.fib_n}"
        slow_wrk = benchlib.start_wrk(port, args.duration + 2, 1, 1, close=True, path=path,
                                      timeout_s=10)
        time.sleep(0.5)
        conns, close = {"close4": (4, True), "ka8": (8, False)}[args.light]
        client = _py_light_client(port, conns, args.duration, close)
        benchlib.finish_wrk(slow_wrk)
    finally:
        server.stop()
    trace = {r[0]: r for r in load(tdir) if r[4] == "/"}
    shutil.rmtree(tdir, ignore_errors=True)
    rows = [(sent, done, trace[sent]) for sent, done in client if sent in trace]
    total = [(done - sent) / 1e6 for sent, done, _ in rows]
    slow = [(d - s) / 1e6 for s, d, _ in rows if (d - s) / 1e6 >= args.long_ms]
    long_rows = [r for r in rows if (r[1] - r[0]) / 1e6 >= args.long_ms]
    wait_dom = sum(1 for s, d, t in long_rows if (t[1] - s) > (d - t[2]))
    return {"server": args.gunicorn or args.policy, "requests": len(rows),
            "total_p50_ms": pct(total, 50), "total_p99_ms": pct(total, 99),
            "long": len(slow), "long_share": len(slow) / max(1, len(rows)),
            "long_wait_dominated": wait_dom, "long_post_dominated": len(long_rows) - wait_dom,
            "long_post_p50_ms": pct([(d - t[2]) / 1e6 for s, d, t in long_rows], 50),
            "long_wait_p50_ms": pct([(t[1] - s) / 1e6 for s, d, t in long_rows], 50)}


def fmt_row(r):
    c = r["classes"]
    f = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"| {r['server']} | {r['slow_kind']} | {r['light_kind']} | {r['wrk_rps']:,.0f} | "
            f"{f(r['wrk_p99_ms'])} | {f(r['wait_p50_ms'])} | {f(r['wait_p99_ms'])} | "
            f"{c['busy-at-send']['share'] * 100:.1f}% ({f(c['busy-at-send']['wait_p50_ms'])}) | "
            f"{c['taken-before']['share'] * 100:.1f}% ({f(c['taken-before']['wait_p50_ms'])}) | "
            f"{c['waited-other']['share'] * 100:.1f}% ({f(c['waited-other']['wait_p50_ms'])}) | "
            f"{f(r['app_p50_ms'])} / {f(r['app_p99_ms'])} |")


HEADER = ("| server | slow | light | light req/s | wrk p99 ms | wait p50 ms | wait p99 ms "
          "| busy-at-send (wait p50) | taken-before (wait p50) | waited-other (wait p50) "
          "| light app ms p50 / p99 |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("run", "matrix", "post"))
    ap.add_argument("--long-ms", type=float, default=10.0,
                    help="post: a light request this slow or slower counts as long")
    ap.add_argument("--policy", default="rr")
    ap.add_argument("--gunicorn", default="", help="sync|gthread: trace gunicorn instead")
    ap.add_argument("--slow", default="sleep", choices=("sleep", "fib"))
    ap.add_argument("--light", default="close4", choices=("close4", "ka8"))
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--sleep-ms", type=int, default=25)
    ap.add_argument("--fib-n", type=int, default=27)
    ap.add_argument("--wait-ms", type=float, default=2.0)
    ap.add_argument("--policies", default="rr,least,shared,reuseport")
    ap.add_argument("--out", default=os.path.join(benchlib.RESULTS_DIR, "mixed-trace"))
    args = ap.parse_args(argv)
    if args.mode == "post":
        print(json.dumps(post_app(args), indent=1))
        return 0
    if args.mode == "run":
        r = run_one(args)
        print(HEADER)
        print(fmt_row(r))
        print(json.dumps(r, indent=1))
        return 0
    rows = []
    for slow in ("sleep", "fib"):
        for light in ("close4", "ka8"):
            for pol in args.policies.split(","):
                rows.append(run_one(args, policy=pol, slow=slow, light=light))
                print(fmt_row(rows[-1]), flush=True)
            for gk in ("sync", "gthread"):
                rows.append(run_one(argparse.Namespace(**{**vars(args), "gunicorn": gk}),
                                    slow=slow, light=light))
                print(fmt_row(rows[-1]), flush=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg": os.getloadavg(),
                   "args": vars(args), "rows": rows}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("# Where light requests wait (bench/mixed_trace.py matrix)\n\n")
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}, load average {os.getloadavg()}; "
                f"wait = client send → app entry; share of light requests per class "
                f"(wait p50 of the class, ms); see the module docstring.\n\n")
        f.write(HEADER + "\n" + "\n".join(fmt_row(r) for r in rows) + "\n")
    print(f"wrote {args.out}.md, .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
