"""Shared state done right: Flask + Redis across pyfork workers (the article's cluster-redis-session.js).

Theory of operation: workers are separate processes and share no memory, so anything
that must be the same for every worker lives in Redis:

  /login, /profile, /logout   sessions in Redis through RedisSessionInterface below: the
                              cookie carries only a random session id; the data is a JSON
                              value under session:<id>, so any worker reads what another
                              wrote
  /bad-counter                a module-level counter: each worker counts its own visits
                              (the broken pattern, kept on purpose for comparison)
  /good-counter               Redis INCR: atomic in the server, exact across workers
  /limited                    a fixed-window rate limiter, INCR + EXPIRE in one MULTI/EXEC:
                              N requests per window per client key (X-Client-Key header, else
                              the peer address), 429 beyond, whichever worker answers

One Redis client per worker, opened in pyfork's post_fork hook (`open_redis`), i.e. in
the child right after the fork. Why not a client created before the fork, in the
primary? A connected client is a socket fd; fork() duplicates the fd, not the
connection, so every worker would write commands into the SAME TCP stream and read
replies from it: requests interleave byte-wise on the wire and a worker can read
another worker's reply (worker 1 gets worker 2's INCR result, or a half-parsed RESP
frame). pyfork closes in each worker the fds the primary opened after run() began, but
a client made earlier (at import time, the usual place) is inherited as is. redis-py
happens to notice a pid change in its ConnectionPool and quietly drops inherited
connections in the child (leaving their fds open), but that is a library detail: a
raw socket, a Connection used directly, a pub/sub socket or another client library has
no such guard, and the primary would still hold a connection it never uses. Opened
after the fork, each worker has its own connection, named `pyfork-worker-<id>`, so
`redis-cli CLIENT LIST` shows exactly one per worker.

Run:  REDIS_URL=redis://127.0.0.1:6379/0 python examples/shared_state/app.py --workers 4
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import time

import redis
from flask import Flask, jsonify, request, session
from flask.sessions import SessionInterface, SessionMixin
from werkzeug.datastructures import CallbackDict

import pyfork
import pyfork.worker

log = logging.getLogger("examples.shared_state")

RATE_LIMIT = int(os.environ.get("RATE_LIMIT", "10"))          # requests per window per client
RATE_WINDOW = int(os.environ.get("RATE_WINDOW", "60"))        # seconds
SESSION_TTL = int(os.environ.get("SESSION_TTL", "3600"))      # seconds, the article's 1 hour

# ---- the per-worker Redis client -----------------------------------------------------

_redis: redis.Redis | None = None
_redis_pid: int | None = None


def open_redis(worker) -> None:
    """pyfork post_fork hook: runs in each worker right after the fork."""
    global _redis, _redis_pid
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    _redis = redis.Redis.from_url(url, client_name=f"pyfork-worker-{worker.id}",
                                  socket_timeout=5, socket_connect_timeout=5,
                                  health_check_interval=30)
    _redis_pid = os.getpid()
    try:
        _redis.ping()  # connect now: a Redis that is down shows at boot, per worker
        log.info("worker %d connected to %s", worker.id, url)
    except redis.RedisError as exc:
        # Keep serving: routes that need Redis answer 503 until it is back.
        log.error("worker %d cannot reach Redis at %s: %s", worker.id, url, exc)


def r() -> redis.Redis:
    """The worker's client; refuses to be used from a process it was not opened in."""
    if _redis is None or _redis_pid != os.getpid():
        raise RuntimeError("Redis client is opened per worker in post_fork; none in this process")
    return _redis


# ---- Redis-backed sessions ------------------------------------------------------------

class RedisSession(CallbackDict, SessionMixin):
    """Session dict that records modification; `sid` is the random id in the cookie."""

    def __init__(self, initial=None, sid: str | None = None, new: bool = False):
        def on_update(_self):
            _self.modified = True
        super().__init__(initial, on_update)
        self.sid = sid or secrets.token_urlsafe(32)   # 256 random bits: unguessable, no signing needed
        self.new = new
        self.modified = False
        self.old_sid: str | None = None

    def rotate(self) -> None:
        """New id on privilege change (login): a fixated id from before login becomes useless."""
        if not self.new:
            self.old_sid = self.sid
        self.sid = secrets.token_urlsafe(32)
        self.modified = True


class RedisSessionInterface(SessionInterface):
    """Flask SessionInterface storing JSON under `session:<sid>` with a TTL."""

    prefix = "session:"

    def __init__(self, ttl: int = SESSION_TTL):
        self.ttl = ttl

    def open_session(self, app, req):
        sid = req.cookies.get(self.get_cookie_name(app))
        if sid:
            raw = r().get(self.prefix + sid)
            if raw is not None:
                return RedisSession(json.loads(raw), sid=sid)
        return RedisSession(new=True)   # no cookie, unknown or expired id: a fresh, empty session

    def save_session(self, app, sess, response):
        name, domain, path = self.get_cookie_name(app), self.get_cookie_domain(app), self.get_cookie_path(app)
        if sess.old_sid:
            r().delete(self.prefix + sess.old_sid)
        if not sess:
            if sess.modified and not sess.new:   # emptied (logout): forget it on both sides
                r().delete(self.prefix + sess.sid)
                response.delete_cookie(name, domain=domain, path=path)
            return
        if not sess.modified:
            return
        r().set(self.prefix + sess.sid, json.dumps(dict(sess)), ex=self.ttl)
        response.set_cookie(name, sess.sid, max_age=self.ttl, path=path, domain=domain,
                            httponly=self.get_cookie_httponly(app),
                            secure=self.get_cookie_secure(app),
                            samesite=self.get_cookie_samesite(app))


# ---- the app ----------------------------------------------------------------------------

app = Flask(__name__)
app.session_interface = RedisSessionInterface()

# The broken pattern: a module-level variable. Every worker has its own copy after the fork.
BROKEN_IN_MEMORY_COUNTER = {"visits": 0}


def worker_id() -> int:
    return pyfork.worker.current().id


@app.errorhandler(redis.RedisError)
def redis_down(exc):
    return jsonify(error="redis unavailable", detail=str(exc), workerId=worker_id()), 503


@app.post("/login")
def login():
    data = request.get_json(silent=True) or request.form
    username = (data.get("username") or "").strip()
    if not username:
        return jsonify(error="username required"), 400
    session.rotate()
    session["authenticatedUser"] = {"username": username,
                                    "loginTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    session["handledByWorkerId"] = worker_id()
    return jsonify(message=f"Logged in as {username}", sessionId=session.sid,
                   workerThatCreatedSession=worker_id())


@app.get("/profile")
def profile():
    user = session.get("authenticatedUser")
    if not user:
        return jsonify(error="Not authenticated"), 401
    return jsonify(user=user, sessionCreatedByWorker=session.get("handledByWorkerId"),
                   sessionServedByWorker=worker_id(),
                   message="Session correctly shared across all workers via Redis")


@app.post("/logout")
def logout():
    session.clear()
    return jsonify(message="logged out", workerId=worker_id())


@app.get("/bad-counter")
def bad_counter():
    BROKEN_IN_MEMORY_COUNTER["visits"] += 1
    return jsonify(warning="This counter is per-worker, not global!",
                   workerVisitCount=BROKEN_IN_MEMORY_COUNTER["visits"], workerId=worker_id(),
                   fix="Use Redis INCR for a globally accurate counter")


@app.get("/good-counter")
def good_counter():
    # INCR is executed atomically by the single-threaded Redis server: no lost updates.
    count = r().incr("global:visit_counter")
    return jsonify(globalVisitCount=count, servedByWorkerId=worker_id(),
                   message="This count is accurate across all workers")


def client_key() -> str:
    """Who is being limited: an API key header if sent, else the peer address."""
    return request.headers.get("X-Client-Key") or request.remote_addr or "unknown"


@app.get("/limited")
def limited():
    # INCR counts the hit; EXPIRE ... NX (Redis >= 7.0) sets the TTL only when the key has
    # none, i.e. on the first hit of a window, so the window starts at the client's first
    # request and later hits do not extend it. Both go in one MULTI/EXEC: a worker dying
    # between them cannot leave a key without a TTL (a client locked out forever), and
    # INCR being atomic in the server is what makes the count exact across workers.
    key = f"ratelimit:{client_key()}"
    pipe = r().pipeline(transaction=True)
    pipe.incr(key)
    pipe.expire(key, RATE_WINDOW, nx=True)
    pipe.ttl(key)
    count, _, ttl = pipe.execute()
    remaining = max(0, RATE_LIMIT - count)
    headers = {"X-RateLimit-Limit": str(RATE_LIMIT), "X-RateLimit-Remaining": str(remaining)}
    if count > RATE_LIMIT:
        headers["Retry-After"] = str(max(1, ttl))
        return jsonify(error="rate limit exceeded", limit=RATE_LIMIT, windowSeconds=RATE_WINDOW,
                       workerId=worker_id()), 429, headers
    return jsonify(ok=True, count=count, remaining=remaining, workerId=worker_id()), 200, headers


@app.get("/health")
def health():
    return jsonify(status="healthy", workerId=worker_id())


# ---- the primary ------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bind", default=os.environ.get("EXAMPLE_BIND", "127.0.0.1:8000"),
                   help="HOST:PORT to listen on (env EXAMPLE_BIND; default 127.0.0.1:8000)")
    p.add_argument("-w", "--workers", type=int, default=os.cpu_count())
    p.add_argument("--redis-url", help="overrides env REDIS_URL (default redis://127.0.0.1:6379/0)")
    p.add_argument("--rate-limit", type=int, default=RATE_LIMIT,
                   help=f"/limited: requests per window per client (env RATE_LIMIT, {RATE_LIMIT})")
    p.add_argument("--rate-window", type=int, default=RATE_WINDOW,
                   help=f"/limited: window in seconds (env RATE_WINDOW, {RATE_WINDOW})")
    return p.parse_args(argv)


def main(argv=None) -> int:
    global RATE_LIMIT, RATE_WINDOW
    args = parse_args(argv)
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url   # read by open_redis in each worker
    RATE_LIMIT, RATE_WINDOW = args.rate_limit, args.rate_window   # set before the fork: inherited
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(process)d] %(name)s: %(message)s")
    cluster = pyfork.Cluster(app, bind=[args.bind], workers=args.workers, post_fork=open_redis)
    cluster.on("ready", lambda w: log.info("worker %d (pid %d) is ready", w.id, w.pid))
    return cluster.run()


if __name__ == "__main__":
    raise SystemExit(main())
