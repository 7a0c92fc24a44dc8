"""Which worker served me? The article's first program (cluster-internals-demo.js) in pyfork.

Theory of operation: the primary (this script, in `main()`) builds a `pyfork.Cluster`
that owns the listening socket and hands each accepted connection to one of N forked
workers, round robin. Every worker runs the WSGI `app` below: it answers with its own
pid and 1-based worker id plus how many requests *this* worker has handled, and then
reports to the primary over pyfork's channel with `worker.send(obj)` (Node's
`process.send`). The primary receives it in `cluster.on("message", ...)` and logs

    worker 2 (pid 14203) handled request #5

The counter lives in each worker's memory, so it counts per worker, never globally:
that is the point (see examples/shared_state for the fix).

Run:  python examples/which_worker.py --workers 4
then: curl -s http://127.0.0.1:8000/   (repeat: the pid/id change, round robin)
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import pyfork
import pyfork.worker

log = logging.getLogger("examples.which_worker")

# Per-process state: after the fork each worker has its own copy starting at 0.
requests_handled = 0


def app(environ, start_response):
    """WSGI app run by every worker."""
    global requests_handled
    requests_handled += 1
    me = pyfork.worker.current()  # the worker we are running in (None only in the primary)
    body = json.dumps({
        "workerPid": os.getpid(),
        "workerId": me.id,
        "requestsHandled": requests_handled,
        "message": "Handled by worker",
    }).encode()
    # Tell the primary, like the article's process.send({type: 'REQUEST_HANDLED', ...}).
    # send() is a small datagram on the worker's own channel; it does not wait for the primary.
    me.send({"type": "REQUEST_HANDLED", "requestCount": requests_handled})
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]


def on_message(worker, msg):
    """Runs in the primary for every worker.send(obj); `worker` is its WorkerHandle."""
    if isinstance(msg, dict) and msg.get("type") == "REQUEST_HANDLED":
        log.info("worker %d (pid %d) handled request #%d", worker.id, worker.pid, msg["requestCount"])


def on_ready(worker):
    log.info("worker %d (pid %d) is ready", worker.id, worker.pid)


def on_exit(worker, code, sig):
    # pyfork itself respawns (with crash-loop backoff); this only reports.
    log.warning("worker %d (pid %d) exited code=%s signal=%s", worker.id, worker.pid, code, sig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bind", default=os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000"),
                   help="HOST:PORT to listen on (env EXAMPLE_BIND; default 127.0.0.1:8000)")
    p.add_argument("-w", "--workers", type=int, default=os.cpu_count(),
                   help="number of workers (default: one per CPU)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(name)s: %(message)s")
    log.info("primary pid %d, forking %d workers", os.getpid(), args.workers)
    # A callable target: workers inherit it through fork, no re-import needed.
    cluster = pyfork.Cluster(app, bind=[args.bind], workers=args.workers)
    cluster.on("message", on_message)
    cluster.on("ready", on_ready)
    cluster.on("exit", on_exit)
    return cluster.run()  # blocks until SIGTERM/SIGINT; 0 after a clean stop


if __name__ == "__main__":
    raise SystemExit(main())
