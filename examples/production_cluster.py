"""A production cluster: the article's production-cluster.js, with pyfork doing the hard parts.

Theory of operation: the article hand-writes three things in the primary; pyfork has
each one built in, and this example configures and observes them instead of
re-implementing them:

  article (Node)                          pyfork (this file)
  --------------------------------------  ----------------------------------------------
  respawn in cluster.on('exit')           the arbiter respawns every slot by itself
  crash-loop map + 2^k backoff            min_uptime= / max_restarts= (backoff 0.1 s*2^k,
                                          capped at 10 s; a slot gives up after
                                          max_restarts rapid crashes; if every slot gave
                                          up the primary exits with code 3)
  worker sends {type:'READY'}             the worker runtime sends READY over its channel
                                          once the app is loaded; we see it in
                                          cluster.on("ready") and only READY workers get
                                          connections
  SIGTERM -> GRACEFUL_SHUTDOWN messages,  SIGTERM to the primary: it stops accepting, tells
  count active connections, exit(0),      every worker to drain, each worker finishes its
  10 s force-kill timer                   in-flight requests (new ones on kept-alive
                                          connections get 503 + Connection: close) and
                                          exits; stragglers are SIGKILLed after
                                          graceful_timeout; run() returns 0

What this file adds is policy and visibility: a health table of READY workers kept
from the "ready"/"exit" events, and two routes to exercise the machinery:

  GET /            {"workerId", "pid"}
  GET /health      {"status": "healthy", "workerId"}
  GET /slow?ms=N   answers after N ms (send SIGTERM meanwhile: it still completes)
  GET /crash       the worker dies on the spot (os._exit(1)); pyfork respawns it
  --crash-on-boot  every worker dies before READY: watch the backoff, then exit code 3

Run:  python examples/production_cluster.py --workers 4
then: curl -s 'http://127.0.0.1:8000/slow?ms=3000' & sleep 0.5; kill -TERM <primary pid>
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from urllib.parse import parse_qs

import pyfork
import pyfork.worker

log = logging.getLogger("examples.production")

MAX_SLOW_MS = 60_000  # keep /slow below any sane graceful_timeout * 1000


# ---- worker side -----------------------------------------------------------------

def _json(start_response, status, obj):
    body = json.dumps(obj).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    """WSGI app run by every worker (pyfork's WSGI interface calls it inline, one request at a time)."""
    me = pyfork.worker.current()
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        return _json(start_response, "200 OK", {"workerId": me.id, "pid": os.getpid()})
    if path == "/health":
        return _json(start_response, "200 OK", {"status": "healthy", "workerId": me.id})
    if path == "/slow":
        try:
            ms = int(parse_qs(environ.get("QUERY_STRING", "")).get("ms", ["1000"])[0])
        except ValueError:
            ms = -1
        if not 0 <= ms <= MAX_SLOW_MS:
            return _json(start_response, "400 Bad Request",
                         {"error": f"ms must be an integer in 0..{MAX_SLOW_MS}"})
        # Logged so an operator (and the test) can see the request is in flight.
        log.info("worker %d: slow request started (%d ms)", me.id, ms)
        time.sleep(ms / 1000)
        return _json(start_response, "200 OK", {"workerId": me.id, "sleptMs": ms})
    if path == "/crash":
        # A hard crash, not an exception: an exception would become a 500 and the worker
        # would live on. The client of this request sees its connection close without a
        # response; every other connection is unaffected.
        log.warning("worker %d (pid %d): crashing on request", me.id, os.getpid())
        os._exit(1)
    return _json(start_response, "404 Not Found", {"error": "not found", "path": path})


def crash_on_boot(worker):
    """post_fork hook for --crash-on-boot: fail before READY, like a missing env var or a DB that is down.

    pyfork logs the traceback, the worker exits (code 4, a load error) and, as it never
    became READY, the primary counts a rapid crash and backs off before the next try."""
    logging.getLogger("examples.production").error(
        "worker %d (pid %d): simulated boot failure", worker.id, os.getpid())
    raise RuntimeError("DATABASE_URL is not set (simulated by --crash-on-boot)")


# ---- primary side ----------------------------------------------------------------

class HealthTable:
    """Which workers are READY, kept from cluster events (runs in the primary only)."""

    def __init__(self, wanted: int):
        self.wanted = wanted
        self.ready: dict[int, tuple[int, float]] = {}   # worker id -> (pid, monotonic ready time)

    def on_fork(self, worker):
        log.info("worker %d (pid %d) forked", worker.id, worker.pid)

    def on_ready(self, worker):
        self.ready[worker.id] = (worker.pid, time.monotonic())
        log.info("worker %d (pid %d) is healthy; %d/%d workers ready",
                 worker.id, worker.pid, len(self.ready), self.wanted)

    def on_disconnect(self, worker):
        log.info("worker %d (pid %d) disconnected (draining or gone)", worker.id, worker.pid)

    def on_exit(self, worker, code, sig):
        entry = self.ready.pop(worker.id, None)
        uptime = f"{time.monotonic() - entry[1]:.1f} s after READY" if entry else "before READY"
        # pyfork logs its own respawn/backoff decision right next to this line.
        log.warning("worker %d (pid %d) exited code=%s signal=%s %s; %d/%d workers ready",
                    worker.id, worker.pid, code, sig, uptime, len(self.ready), self.wanted)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bind", default=os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000"),
                   help="HOST:PORT to listen on (env EXAMPLE_BIND; default 127.0.0.1:8000)")
    p.add_argument("-w", "--workers", type=int, default=os.cpu_count())
    p.add_argument("--graceful-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after SIGTERM before a SIGKILL (30)")
    p.add_argument("--min-uptime", type=float, default=1.0,
                   help="an exit sooner than this after start counts as a rapid crash (1 s, the article's 1000 ms)")
    p.add_argument("--max-restarts", type=int, default=5,
                   help="rapid crashes in a row before a slot gives up (5, as the article)")
    p.add_argument("--crash-on-boot", action="store_true",
                   help="make every worker die before READY, to watch crash-loop protection")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(name)s: %(message)s")
    health = HealthTable(args.workers)
    cluster = pyfork.Cluster(
        app, bind=[args.bind], workers=args.workers,
        graceful_timeout=args.graceful_timeout,
        min_uptime=args.min_uptime, max_restarts=args.max_restarts,
        post_fork=crash_on_boot if args.crash_on_boot else None,
    )
    cluster.on("fork", health.on_fork)
    cluster.on("ready", health.on_ready)
    cluster.on("disconnect", health.on_disconnect)
    cluster.on("exit", health.on_exit)
    log.info("primary pid %d starting %d workers; SIGTERM for a graceful stop", os.getpid(), args.workers)
    code = cluster.run()
    log.info("primary exiting with code %d", code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
