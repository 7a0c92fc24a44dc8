"""Memory of `pyfork serve` on the demo app after 2,000 requests (issue 17's figure).

Theory of operation: starts `pyfork serve pyfork.demo:app` (WSGI) and
`pyfork.demo:asgi_app` (ASGI) with 2 workers on loopback, sends 2,000 requests with
wrk (bench/stop_after.lua stops it), then reads the primary's RSS and each worker's
USS (Private_Clean + Private_Dirty, smaps_rollup) and RSS. Each server runs alone.

Usage: python bench/demo_memory.py [--workers 2] [--requests 2000] [--conns 4] [--close]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

STOP_AFTER = os.path.join(benchlib.BENCH_DIR, "stop_after.lua")


def measure(target: str, interface: str, workers: int, requests: int, conns: int = 4,
            close: bool = False) -> dict:
    port = benchlib.free_port()
    cmd = [sys.executable, "-m", "pyfork", "serve", target, "--interface", interface, "-w", str(workers),
           "-b", f"127.0.0.1:{port}"]
    server = benchlib.Server(f"pyfork {interface}", cmd, env=benchlib.python_env(), cwd=benchlib.BENCH_DIR,
                             log_path=os.path.join(benchlib.RESULTS_DIR, "logs", f"demo_memory-{interface}.log"))
    try:
        server.wait_http(port, workers)
        env = dict(os.environ, STOP_AFTER=str(requests))
        extra = ["-H", "Connection: close"] if close else []
        subprocess.run([benchlib.wrk_path(), "-t1", f"-c{conns}", "-d120s", "-s", STOP_AFTER, *extra,
                        f"http://127.0.0.1:{port}/"], env=env, capture_output=True, check=True)
        time.sleep(0.5)
        prim = benchlib.memory_kb(server.pid)
        mems = [benchlib.memory_kb(p) for p in benchlib.worker_pids(server.pid)]
        return {"primary_rss_mb": prim["rss"] / 1024,
                "worker_uss_mb": statistics.mean(m["uss"] for m in mems) / 1024,
                "worker_rss_mb": statistics.mean(m["rss"] for m in mems) / 1024}
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--conns", type=int, default=4, help="wrk connections (4)")
    ap.add_argument("--close", action="store_true", help="every request with Connection: close")
    args = ap.parse_args()
    os.makedirs(os.path.join(benchlib.RESULTS_DIR, "logs"), exist_ok=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    for target, interface in (("pyfork.demo:app", "wsgi"), ("pyfork.demo:asgi_app", "asgi")):
        m = measure(target, interface, args.workers, args.requests, args.conns, args.close)
        print(f"{interface}: primary RSS {m['primary_rss_mb']:.1f} MB, worker USS {m['worker_uss_mb']:.2f} MB, "
              f"worker RSS {m['worker_rss_mb']:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
