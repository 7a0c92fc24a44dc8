"""The demo app: the article's Node cluster demo, served by `pyfork serve` with no APP.

Theory of operation: `app` is a plain WSGI callable (no framework: it is also the
app the benchmarks hit, so `/` must stay cheap) and `asgi_app` serves the same
routes over ASGI so both interfaces can be compared on identical work. Routing is
one dict lookup; each route returns (status, JSON-able dict). The two flavours
differ only where waiting is involved: /sleep uses time.sleep or asyncio.sleep,
/good-counter uses the redis client or redis.asyncio.

Routes (DESIGN.md "The demo app"):
  GET /               {"workerPid", "workerId", "requestsHandled", "message"}
  GET /health         {"status": "healthy", "workerId"}
  GET /fibonacci?n=N  naive recursion, 0 <= N <= 35, else 400 (CPU-bound on purpose:
                      it blocks its worker, the others keep serving)
  GET /sleep?ms=N     answers after N ms, 0 <= N <= 60000 (drain and reload tests)
  GET /bad-counter    a per-process counter: each worker counts alone (wrong on purpose)
  GET /good-counter   Redis INCR when REDIS_URL is set: exact across workers; 503 otherwise
  anything else       404; a known path with a method other than GET/HEAD: 405

Worker identity comes from `pyfork.worker.current()` when pyfork runs the app
(workerId 0 otherwise, e.g. under another server).
"""
from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs

FIB_MAX = 35        # DESIGN.md: n above 35 -> 400 (fib(35) is ~30M calls, seconds in CPython)
SLEEP_MAX_MS = 60_000
REDIS_KEY = "pyfork:demo:global_visit_counter"
REDIS_TIMEOUT = 2.0  # s; an unreachable Redis must not hold a worker for long

_requests_handled = 0   # per process: forked workers start from the primary's 0
_bad_counter = 0        # per process, on purpose: the broken pattern /bad-counter shows

_worker_module = None


def worker_id() -> int:
    """pyfork's worker id (1-based) inside a pyfork worker, 0 elsewhere."""
    global _worker_module
    if _worker_module is None:
        try:
            from pyfork import worker as module
        except ImportError:  # pyfork.worker absent (partial install): not a pyfork worker
            module = False
        _worker_module = module
    if _worker_module is False:
        return 0
    current = getattr(_worker_module, "current", None)
    w = current() if current is not None else None
    return getattr(w, "id", 0) if w is not None else 0


# --------------------------------------------------------------------------- routes

class BadRequest(Exception):
    pass


def _int_param(query: str, name: str, low: int, high: int) -> int:
    values = parse_qs(query).get(name)
    if not values:
        raise BadRequest(f"query parameter {name!r} is required: an integer from {low} to {high}")
    raw = values[0].strip()
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from {low} to {high}, got {raw[:40]!r}") from None
    if value < low or value > high:
        raise BadRequest(f"{name} must be from {low} to {high} for this demo, got {value}")
    return value


def fibonacci(n: int) -> int:
    """Deliberately naive recursion: CPU-bound work that blocks its worker."""
    return n if n <= 1 else fibonacci(n - 1) + fibonacci(n - 2)


def _root(query):
    return 200, {
        "workerPid": os.getpid(),
        "workerId": worker_id(),
        "requestsHandled": _requests_handled,
        "message": "Handled by worker",
    }


def _health(query):
    return 200, {"status": "healthy", "workerId": worker_id()}


def _fibonacci(query):
    n = _int_param(query, "n", 0, FIB_MAX)
    started = time.perf_counter()
    result = fibonacci(n)
    return 200, {
        "fibonacci": result,
        "n": n,
        "computedInMs": round((time.perf_counter() - started) * 1000, 3),
        "computedByWorker": worker_id(),
        "workerPid": os.getpid(),
    }


def _sleep_reply(ms):
    return 200, {"sleptMs": ms, "workerId": worker_id(), "workerPid": os.getpid()}


def _bad_counter_route(query):
    global _bad_counter
    _bad_counter += 1
    return 200, {
        "workerVisitCount": _bad_counter,
        "workerId": worker_id(),
        "workerPid": os.getpid(),
        "warning": "This counter is per-worker, not global!",
        "note": ("Each worker process has its own copy of this variable (workers share no "
                 "memory), so the count depends on which worker answered. Use /good-counter."),
    }


def _good_counter_reply(count):
    return 200, {
        "globalVisitCount": count,
        "servedByWorkerId": worker_id(),
        "workerPid": os.getpid(),
        "message": "This count is accurate across all workers (Redis INCR is atomic)",
    }


def _redis_unavailable(reason):
    return 503, {"error": f"/good-counter needs Redis: {reason}",
                 "hint": "set REDIS_URL, e.g. REDIS_URL=redis://127.0.0.1:6379/0 pyfork serve"}


# --------------------------------------------------------------------------- Redis, per process
#
# One client per worker process, created on first use and keyed by pid. A client made
# before the fork (at import time in the primary, say) would be inherited by every
# worker: its connection is one socket fd that fork() duplicates, not a connection per
# process, so the workers would interleave commands on the same TCP stream and read
# each other's replies (worker 1 gets worker 2's INCR result). redis-py's pool notices
# a pid change and drops inherited connections, but relying on that hides the bug in
# any other client; keying by pid makes each worker open its own.

_redis = {}         # pid -> redis.Redis
_aredis = {}        # pid -> redis.asyncio.Redis (bound to that worker's event loop)


def _redis_kwargs():
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    # One immediate retry covers a connection Redis dropped while idle; the default
    # policy backs off for seconds, which would hold the worker on a dead Redis.
    return dict(socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT,
                retry=Retry(NoBackoff(), 1))


def _sync_redis(url):
    client = _redis.get(os.getpid())
    if client is None:
        import redis
        _redis.clear()  # entries of another pid were inherited from the parent: not ours
        client = _redis[os.getpid()] = redis.Redis.from_url(url, **_redis_kwargs())
    return client


def _async_redis(url):
    client = _aredis.get(os.getpid())
    if client is None:
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        _aredis.clear()
        client = _aredis[os.getpid()] = redis.asyncio.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 1))
    return client


def _good_counter_sync(query):
    url = os.environ.get("REDIS_URL")
    if not url:
        return _redis_unavailable("REDIS_URL is not set")
    import redis
    try:
        return _good_counter_reply(_sync_redis(url).incr(REDIS_KEY))
    except (redis.RedisError, OSError, ValueError) as exc:
        return _redis_unavailable(f"Redis at {url} is unreachable or failed: {exc}")


async def _good_counter_async(query):
    url = os.environ.get("REDIS_URL")
    if not url:
        return _redis_unavailable("REDIS_URL is not set")
    import redis
    try:
        return _good_counter_reply(await _async_redis(url).incr(REDIS_KEY))
    except (redis.RedisError, OSError, ValueError) as exc:
        return _redis_unavailable(f"Redis at {url} is unreachable or failed: {exc}")


def _sleep_sync(query):
    ms = _int_param(query, "ms", 0, SLEEP_MAX_MS)
    time.sleep(ms / 1000)
    return _sleep_reply(ms)


async def _sleep_async(query):
    import asyncio   # here, not at the top: a WSGI server of this module never loads asyncio
    ms = _int_param(query, "ms", 0, SLEEP_MAX_MS)
    await asyncio.sleep(ms / 1000)
    return _sleep_reply(ms)


SYNC_ROUTES = {
    "/": _root,
    "/health": _health,
    "/fibonacci": _fibonacci,
    "/sleep": _sleep_sync,
    "/bad-counter": _bad_counter_route,
    "/good-counter": _good_counter_sync,
}
ASYNC_ROUTES = {"/sleep": _sleep_async, "/good-counter": _good_counter_async}

_JSON = ("Content-Type", "application/json")
_STATUS_LINES = {200: "200 OK", 400: "400 Bad Request", 404: "404 Not Found",
                 405: "405 Method Not Allowed", 500: "500 Internal Server Error",
                 503: "503 Service Unavailable"}


def _before(method, path):
    """Counts the request; returns (status, payload) for 404/405, else None."""
    global _requests_handled
    _requests_handled += 1
    if path not in SYNC_ROUTES:
        return 404, {"error": "not found", "path": path[:200],
                     "routes": sorted(SYNC_ROUTES)}
    if method not in ("GET", "HEAD"):  # HEAD: the server sends the GET headers, no body
        return 405, {"error": f"method {method} not allowed", "allowed": ["GET", "HEAD"]}
    return None


def _encode(status, payload):
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [_JSON, ("Content-Length", str(len(body)))]
    if status == 405:
        headers.append(("Allow", "GET, HEAD"))
    return body, headers


# --------------------------------------------------------------------------- WSGI

def app(environ, start_response):
    """The demo as a WSGI app."""
    method = environ["REQUEST_METHOD"]
    path = environ.get("PATH_INFO") or "/"
    result = _before(method, path)
    if result is None:
        try:
            result = SYNC_ROUTES[path](environ.get("QUERY_STRING", ""))
        except BadRequest as exc:
            result = 400, {"error": str(exc)}
    status, payload = result
    body, headers = _encode(status, payload)
    start_response(_STATUS_LINES[status], headers)
    return [body]


# --------------------------------------------------------------------------- ASGI

async def asgi_app(scope, receive, send):
    """The demo as an ASGI 3 app (same routes; /fibonacci blocks the loop, like the article's)."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        raise RuntimeError(f"the demo serves HTTP only, not {scope['type']!r}")
    method, path = scope["method"], scope["path"] or "/"
    result = _before(method, path)
    if result is None:
        query = scope.get("query_string", b"").decode("latin-1")
        try:
            handler = ASYNC_ROUTES.get(path)
            result = await handler(query) if handler else SYNC_ROUTES[path](query)
        except BadRequest as exc:
            result = 400, {"error": str(exc)}
    status, payload = result
    body, headers = _encode(status, payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})
