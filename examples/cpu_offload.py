"""CPU work off the request loop: the article's cluster-with-thread-pool.js, in pyfork + ASGI.

Theory of operation: the cluster gives one event loop per core (pyfork forks the
workers; each runs the ASGI `app` below on its own asyncio loop). A CPU-heavy request
(naive recursive /fibonacci) must not run on that loop, or every other request on the
worker (/health included) waits for it. So each worker owns a small executor and awaits
the result with `loop.run_in_executor`, and the loop stays free to answer /health.

Which executor: a ProcessPoolExecutor, created in each worker after the fork (the
post_fork hook `make_pools`). Node's worker_threads run JavaScript in parallel because
each thread has its own V8 isolate; CPython threads share one GIL, so pure-Python
CPU work in a ThreadPoolExecutor never runs in parallel with other Python code: it
only keeps the loop *responsive* (the GIL is handed back every 5 ms,
sys.getswitchinterval()), while two fibonacci requests take twice as long and every
request on that worker slows down. Processes have their own interpreter and GIL, so the
pool really computes in parallel with the loop (and with the other workers). The
thread pool is kept as `?mode=thread`, and `?mode=inline` shows the blocked loop, so
the three can be compared.

Why after the fork, and why "spawn": an executor created in the primary would be
shared half-broken by every worker (its management and queue-feeder threads do not
survive fork; its processes and pipes would be the primary's). Its processes are
started with "spawn", not "fork": a forked copy of a pyfork worker would inherit the
worker's channel to the primary, its signal wakeup fd and its client sockets, and
fork() with threads running is unsafe; spawn starts a clean interpreter that gets
only the pipes it needs. A pool process never outlives its worker: the lifespan
shutdown joins the pool after a drain, and PR_SET_PDEATHSIG (`pool_process_init`)
covers a worker that is SIGKILLed. Pool size per worker defaults to
cpu_count // workers (at least 1), so workers x pool processes do not oversubscribe
the cores.

  GET /fibonacci?n=N[&mode=process|thread|inline]   n in 0..35 (else 400)
  GET /health        {"status": "healthy", "workerId", "pendingTasks"} - pendingTasks
                     counts this worker's computations in flight, which shows the loop
                     answered while one was running

Run:  python examples/cpu_offload.py --workers 2
then: curl -s 'http://127.0.0.1:8000/fibonacci?n=34' & curl -s http://127.0.0.1:8000/health
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import ctypes
import json
import logging
import multiprocessing
import os
import signal
import time
from urllib.parse import parse_qs

import pyfork
import pyfork.worker

log = logging.getLogger("examples.cpu_offload")

MAX_N = 35          # naive fib(35) is ~30 M calls, a few seconds of CPython: enough for a demo
POOL_SIZE = 1       # set from --pool-size in main(), before the fork, so workers inherit it


def fibonacci(n: int) -> int:
    """Deliberately naive and CPU-bound, as in the article."""
    return n if n <= 1 else fibonacci(n - 1) + fibonacci(n - 2)


def compute(n: int) -> tuple[int, int]:
    """Runs in the executor; returns the pid that computed it so the response can show it."""
    return fibonacci(n), os.getpid()


# ---- per-worker executors (created after the fork) -----------------------------------

process_pool: concurrent.futures.ProcessPoolExecutor | None = None
thread_pool: concurrent.futures.ThreadPoolExecutor | None = None
pending_tasks = 0   # computations in flight in this worker (only touched from the loop thread)


def pool_process_init(worker_pid: int) -> None:
    """Runs first in every pool process: it must never outlive its worker.

    A spawned pool process holds both ends of its task queue's pipe, so it would not see
    EOF if the worker were SIGKILLed (hung-worker timeout, OOM): it would wait forever.
    PR_SET_PDEATHSIG makes the kernel kill it when the thread that started it (the
    worker's main thread, where run_in_executor submits) goes away; the getppid() check
    covers a worker that died before prctl ran. SIGINT is ignored because Ctrl-C reaches
    the whole process group and the worker, not this process, decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: rely on the clean shutdown below
        pass
    if os.getppid() != worker_pid:
        os._exit(1)


def make_pools(worker) -> None:
    """pyfork post_fork hook: runs in each worker, right after the fork."""
    global process_pool, thread_pool
    process_pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=POOL_SIZE, mp_context=multiprocessing.get_context("spawn"),
        initializer=pool_process_init, initargs=(os.getpid(),))
    thread_pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=POOL_SIZE, thread_name_prefix=f"fib-w{worker.id}")
    logging.getLogger("examples.cpu_offload").info(
        "worker %d (pid %d): executors created, size %d", worker.id, os.getpid(), POOL_SIZE)


def shutdown_pools() -> None:
    # wait=True: the pool processes get their stop sentinel and are joined before the
    # worker exits (pyfork ends a worker with os._exit, which waits for nothing; without
    # the join they would be left waiting on their queue). cancel_futures: nothing queued
    # is wanted any more. After a drain no request, hence no computation, is in flight.
    for pool in (process_pool, thread_pool):
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


# ---- the ASGI app ------------------------------------------------------------------------

async def send_json(send, status: int, obj) -> None:
    body = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive, send) -> None:
    # pyfork's ASGI interface runs the lifespan protocol once per worker: startup before
    # the first connection, shutdown after the drain. The pools exist already (post_fork);
    # shutdown joins them, in a thread so the loop is not blocked meanwhile.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(shutdown_pools)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def fibonacci_route(query: dict, send) -> None:
    global pending_tasks
    me = pyfork.worker.current()
    try:
        n = int(query.get("n", ["30"])[0])
    except ValueError:
        n = -1
    mode = query.get("mode", ["process"])[0]
    if not 0 <= n <= MAX_N:
        return await send_json(send, 400, {"error": f"n must be an integer in 0..{MAX_N} for this demo"})
    if mode not in ("process", "thread", "inline"):
        return await send_json(send, 400, {"error": "mode must be process, thread or inline"})
    started = time.perf_counter()
    pending_tasks += 1
    try:
        if mode == "inline":
            result, pid = compute(n)   # blocks this worker's loop: /health waits too
        else:
            pool = process_pool if mode == "process" else thread_pool
            result, pid = await asyncio.get_running_loop().run_in_executor(pool, compute, n)
    finally:
        pending_tasks -= 1
    await send_json(send, 200, {
        "fibonacci": result, "n": n, "mode": mode,
        "computedInMs": round((time.perf_counter() - started) * 1000),
        "computedByWorker": me.id, "workerPid": os.getpid(), "computedInPid": pid,
    })


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        return await lifespan(receive, send)
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/fibonacci":
        return await fibonacci_route(parse_qs(scope.get("query_string", b"").decode()), send)
    if path in ("/", "/health"):
        # Answers immediately: proof that the loop is not blocked by a computation.
        return await send_json(send, 200, {"status": "healthy", "workerId": pyfork.worker.current().id,
                                           "pendingTasks": pending_tasks})
    await send_json(send, 404, {"error": "not found", "path": path})


# ---- the primary ------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bind", default=os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000"),
                   help="HOST:PORT to listen on (env EXAMPLE_BIND; default 127.0.0.1:8000)")
    p.add_argument("-w", "--workers", type=int, default=os.cpu_count())
    p.add_argument("--pool-size", type=int, default=None,
                   help="executor size per worker (default: cpu_count // workers, at least 1)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global POOL_SIZE
    args = parse_args(argv)
    POOL_SIZE = args.pool_size or max(1, (os.cpu_count() or 1) // args.workers)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(name)s: %(message)s")
    log.info("primary pid %d: %d workers, each with a pool of %d", os.getpid(), args.workers, POOL_SIZE)
    cluster = pyfork.Cluster(app, bind=[args.bind], workers=args.workers, interface="asgi",
                             post_fork=make_pools)
    cluster.on("ready", lambda w: log.info("worker %d (pid %d) is ready", w.id, w.pid))
    cluster.on("exit", lambda w, code, sig: log.warning(
        "worker %d (pid %d) exited code=%s signal=%s", w.id, w.pid, code, sig))
    return cluster.run()


if __name__ == "__main__":
    # Guard matters twice here: "spawn" re-imports this file in every pool process as
    # __mp_main__, and that import must not start another cluster.
    raise SystemExit(main())
