"""WSGI (PEP 3333) interface: one single-threaded selectors loop per worker.

Theory of operation. The worker's loop watches rt.fileno() (new connections), rt.wakeup_fd()
(signals) and every connection socket, all non-blocking. Bytes go into the connection's
http1.RequestReader; when a request is complete (the whole body is buffered, up to
Limits.max_body) the application is called inline, like a gunicorn sync worker, but the
connection stays open for keep-alive and pipelined requests are answered in order.

A response is written without blocking the loop: the common case (a list body) is rendered
into one bytes object and sent with one send(); anything the kernel does not take waits in
the connection's output queue. A streaming iterable is pulled only while that queue is below
HIGH_WATER; beyond it the response generator (wsgi_adapter.respond) yields and is resumed when
the socket is writable. wsgi.file_wrapper bodies on real files go out with os.sendfile the same
way. Only the legacy write() callable blocks (poll on that one socket, bounded by
request_timeout), because it runs inside the application's frame.

Held responses: a whole response (a list body) on a connection that stays open is *held*
until every event of the select() batch has been handled, and the held ones then go out one
after the other (send_held; Redis writes its replies the same way, before it sleeps). Why: a
send wakes the client, and on loopback (and in a VM, through an inter-processor interrupt)
that wake-up costs the sender more than the send; sent while the next request of the batch
runs, each response woke its client separately. Held, one wake-up serves them all:
hello-world keep-alive 36-39k -> 49-51k req/s against the commit before, worker CPU 22-23 ->
17-18 us a request (bench/README.md "Held responses"). A held response is a finished one:
--limit-concurrency does not count it, and parking may hand its connection back once it is
sent. It is never held across a pipelined request of its own connection (it goes first; if
its client is gone, that next request is not run), nor when it closes its connection, nor on
TLS, nor without the park timer. The timer bounds the wait: a request still running
PARK_AFTER after it began sends the others' held responses before it parks anything. Python
runs that handler only between bytecodes, so while the application is blocked inside a C
call (a database driver's read, restarted after the signal) held responses wait for that
call; a timer handler that runs HOLD_LATE after the timer was due, with responses still
held, shows such an application, and holding pauses from that moment (HOLD_PAUSE, doubling on
each recurrence, logged once each).

Timers: a connection has one deadline, swept a few times per second: keepalive_timeout while
idle between requests, request_timeout from the first byte of a request until its response
is written (slow clients), linger_timeout while draining input after an error response.

Draining (rt.draining) never fails a request: stop taking connections; every request
received is answered, including pipelined ones already read; the last response of a
connection says `Connection: close` (a response with more pipelined bytes behind it keeps
the connection); after it the connection is half-closed and lingers, so input the client
sent meanwhile cannot turn our close into a reset that destroys that response. A kept-alive
connection is never closed at the drain: a client may be sending its next request at that
very moment, and a close then fails it. It is closed only between requests, when its
keep-alive timeout expires, as in normal operation (so the drain adds no race a client does
not already face); a request that arrives before then is served, with `Connection: close`.
serve() returns once no connection is left.

Limits (pyfork.serve.connlimits, README "Limits"): --keep-alive sets keepalive_timeout (0:
every response says `Connection: close`). --limit-concurrency N counts the connections
with a request in progress: bytes of a request read, the application running, or its
response still being written (an idle kept-alive connection is not counted, nor one that
has sent nothing yet, nor one closing, nor one whose response is only held). A request whose
head completes while N others are in progress gets `503 Service Unavailable` with
`Connection: close` at once, before the application or a `100 Continue`; the count is kept
per transition in settle() and close().

Parking (issue 10): a kept-alive connection lives on one worker, and this worker runs one
request at a time, so while a request runs long the worker's other idle connections would
wait for it. When a request is still running PARK_AFTER after it started, those connections
are handed back to the primary (rt.park, MSG_PARK), which watches them and sends each one's
next request to a worker that can start it (csrc/park.c). Parking costs a few system calls
a connection, so a worker holding more than PARK_ALL_MAX others hands back only those whose
next request has come, and looks again while the request runs (after PARK_AFTER, backing off
to PARK_AGAIN_MAX). Only a connection with nothing buffered here may leave (bytes still in
the kernel travel with the fd, so pipelined requests keep their order); one with buffered
bytes, output queued, a request in progress, or closing stays. The hand-back must run while
the main thread is inside the application, so it runs in a SIGALRM handler: Python runs it
in the main thread between two bytecodes (a blocking sleep or select in the application is
interrupted and resumed, PEP 475; the handler is installed with SA_RESTART so other system
calls of C extensions are restarted, not failed with EINTR). The timer is lazy, because a
setitimer pair per request measured ~6 us here (load average 9; several % of the ~100 us of
CPU a hello-world keep-alive request costs): a request that starts while this worker holds
another connection arms it only if it is not armed already, and nothing disarms it; when it
fires, the handler parks if the request running then has run PARK_AFTER, re-arms for the
rest if a younger one runs, and otherwise stays unarmed. Under steady keep-alive load that
is one timer and one signal per PARK_AFTER, not per request (plus the backed-off looks above
while a long request runs on a worker with many connections); keep-alive off, or one
connection, costs nothing. The races, and why each is harmless: the handler acts only while
`running` names the connection in the application (a signal handled after the request ended
finds None); `running_since` is written before `running`, so a handler in between sees the
old request at worst, a false alarm that parks idle connections early, which is still
correct; the application's frames touch only its own connection, so the handler may change
the others, the connection table and the selector under it; a parked connection is marked
closed, which the loop already checks for events left in a batch; the handler never logs
(the application may hold the logging lock) and never raises into the application. Not used
when the application installed its own SIGALRM handler.

Expect: 100-continue: since the body is read before the application runs, `100 Continue` is
sent as soon as the head is accepted (and not when the body is too large: 413 instead).

Behind a load balancer (pyfork.serve.edge): with --proxy-protocol a connection's first bytes
must be a PROXY header from a peer in --proxy-allow-from, read within --proxy-timeout before
any request byte (`Conn.proxy` holds it meanwhile); anything else closes the connection
unanswered. Its client address becomes REMOTE_ADDR/REMOTE_PORT. Forwarded headers from
--forwarded-allow-ips are applied per request by a thin layer around the app
(pyfork.serve.forwarded).

TLS (--certfile, pyfork.serve.tls): every connection is wrapped when taken and its handshake
runs in this loop, step by step as the socket becomes ready (`Conn.handshaking`), within
tls.HANDSHAKE_TIMEOUT; a failed one (plain HTTP on the TLS port, a refused client
certificate) closes that connection only. Then reads and writes are the same as for plain
TCP (the TLS socket raises BlockingIOError as a plain one does); wsgi.url_scheme is https and
file_wrapper bodies are sent through TLS, not sendfile().

Layout: this module is the loop (connections, reading, writing, timers, draining);
wsgi_adapter is the application side (environ, start_response, the body iterable).
"""

import select
import selectors
import signal
import socket
import time

from . import accesslog, connlimits, edge, forwarded, health, http1
from .http1 import COMPLETE, HEAD, NEED_DATA, HttpError, Limits, RequestReader, error_response
from .proxyproto import ProxyHeaderError
from .detect import is_wsgi
from .runtime import Runtime
from .wsgi_adapter import FileWrapper, base_environ, conn_environ, respond  # noqa: F401 - re-exported

# pyfork.serve.tls, imported by the first worker that serves --certfile: ssl costs every
# process that imports it ~5 MB of RSS, and the primary imports this module to check the app.
tls = None

NAME = "wsgi"
# Requests a worker runs at once: one, inline (the dispatcher sends a connection only to a
# worker that can start it now, so none waits here behind a slow request).
CAPACITY = 1

# A request still running this long parks the worker's idle kept-alive connections. A light
# request takes well under 1 ms of application time here (hello world: p99 <= 0.05 ms,
# bench/README.md "Mixed load"), so 2 ms marks a slow one without reacting to noise; a false
# alarm costs ~11 us of system calls per connection parked (bench/park_cost.c) and a primary
# round trip for its next request, so parking on every response would cost ~10 % of
# keep-alive throughput: only on demand.
PARK_AFTER = 0.002
# Up to this many other connections, a park hands back every idle one, so that their next
# requests never wait at all. Beyond it only those whose next request is already here
# (readable now), looked for again while the request runs: parking costs ~11 us
# a connection, and a worker holding thousands of active keep-alive connections that parked
# them all on every long request (a hello world preempted for 2 ms on a busy machine is one)
# spent ~50 ms parking and sent the primary thousands of fds to dispatch back (measured:
# fresh-client p99 8-13 ms at 10,000 connections, bench/README.md "Many connections").
PARK_ALL_MAX = 64
# ... and the look again backs off, doubling from PARK_AFTER up to this, so a request that
# runs for seconds costs a signal every 20 ms, not every 2 ms (each may interrupt a system
# call of the application's with EINTR).
PARK_AGAIN_MAX = 0.02

# Held responses (see the module docstring): a park timer whose handler runs this much later
# than the timer was due shows a call Python could not interrupt, and pauses holding for
# HOLD_PAUSE (doubling on each recurrence up to HOLD_PAUSE_MAX). 10 ms: above a preemption on
# a busy machine (which would pause a hello world for nothing), below the database query it
# is meant to notice.
HOLD_LATE = 0.010
HOLD_PAUSE = 10.0
HOLD_PAUSE_MAX = 600.0

RECV_SIZE = 65536
TAKE_AGAIN = 8          # connections taken per wake-up while each is done at once (accept())
LINGER_MAX = 1 << 20             # bytes discarded after an error response before giving up

_ACCEPT, _WAKEUP = object(), object()
_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


detect = is_wsgi     # pyfork.serve.detect: guessing imports only the interface that wins


def serve(app, rt: Runtime, limits=None):
    """Serve `app` on the connections `rt` hands over until draining leaves none."""
    configured = connlimits.current()
    if limits is None:
        limits = Limits.from_env()
        if configured is not None and configured.keep_alive > 0:
            limits.keepalive_timeout = configured.keep_alive      # --keep-alive
    Server(app, rt, limits, configured).run()


class Conn:
    """One client connection."""

    __slots__ = ("sock", "fd", "reader", "env", "out", "out_len", "resume", "deadline",
                 "busy_since", "nreq", "closing", "linger", "dead", "events", "lingered", "closed",
                 "counted", "proxy", "tls", "handshaking", "held")

    def __init__(self, sock, reader, env):
        self.sock = sock
        self.fd = sock.fileno()
        self.reader = reader
        self.env = env              # per-connection part of the environ
        self.out = []               # queued output (bytes/memoryview), in order
        self.out_len = 0
        self.resume = None          # a suspended wsgi_adapter.respond generator
        self.deadline = 0.0
        self.busy_since = None      # monotonic time the current request's first byte came
        self.nreq = 0               # requests admitted on this connection
        self.closing = False        # close once the output queue is empty
        self.linger = False         # ... after shutdown(SHUT_WR) and draining the input
        self.dead = False           # peer gone: drop output, close
        self.events = 0             # registered for (0: not registered with the selector)
        self.lingered = 0
        self.closed = False         # closed: events still queued for it are stale
        self.counted = False        # in Server.in_progress (--limit-concurrency)
        self.proxy = None           # edge.ProxyState until the PROXY header is read
        self.tls = False            # a TLS connection (no sendfile(); no hand-back of the fd)
        self.handshaking = False    # its TLS handshake is not complete yet
        self.held = False           # `out` is a whole response held to the end of the batch


class Server:
    """The worker's loop; one per serve() call."""

    def __init__(self, app, rt: Runtime, limits, conn_limits=None):
        self.edge = edge.for_worker()
        self.app = forwarded.wrap_wsgi(health.wrap_wsgi(app, self.edge.health_path, self.edge.stopping),
                                       self.edge.forwarded_allow_ips)
        self.rt = rt
        self.limits = limits
        self.log = rt.log
        self.draining = False
        self.conns = {}
        self.sel = selectors.DefaultSelector()
        self.listen_fd = rt.fileno()
        self.sel.register(self.listen_fd, _R, _ACCEPT)
        self.sel.register(rt.wakeup_fd(), _R, _WAKEUP)
        shortest = min(limits.keepalive_timeout, limits.request_timeout, limits.linger_timeout)
        self.sweep_every = max(0.02, min(0.5, shortest / 4))
        self.tick_every = min(rt.tick_interval, 1.0) / 2
        self.base_env = base_environ()
        self.tls_context = None                  # plain TCP
        if self.edge.tls is not None:
            global tls
            from . import tls
            self.tls_context = tls.server_context(self.edge.tls)
        if self.tls_context is not None:
            self.base_env["wsgi.url_scheme"] = "https"
        self.access = accesslog.for_worker()     # None when --access-log is off
        # --limit-concurrency (0: off, nothing counted) and --keep-alive 0 (no keep-alive)
        self.limit = conn_limits.limit_concurrency if conn_limits is not None else 0
        self.no_keep_alive = conn_limits is not None and conn_limits.keep_alive == 0
        self.in_progress = 0                     # connections with a request in progress
        self.running = None                      # the connection in the application (parking)
        self.running_since = 0.0                 # ... since (monotonic)
        self.timer_armed = False                 # the park timer is set
        self.timer_due = 0.0                     # ... to fire then (monotonic)
        self.park_again = PARK_AFTER             # the next look for ready connections (backoff)
        self.park_again_for = 0.0                # ... while the request that began then runs
        self.parks = rt.parks and not self.no_keep_alive and self.install_park_timer()
        # Responses held to the end of a batch of events (see the module docstring): only with
        # the park timer (self.parks), which bounds how long one waits behind a slow request.
        self.holding = False                     # inside a batch: whole responses are held
        self.held = []                           # connections with a held response, this batch
        self.hold_resume = 0.0                   # holding paused until then (monotonic)
        self.hold_pause = HOLD_PAUSE             # the next pause, doubling up to HOLD_PAUSE_MAX
        self.hold_paused = None                  # (late s, pause s) for the loop to log

    # -- loop -------------------------------------------------------------------------------
    def run(self):
        rt = self.rt
        sel = self.sel
        monotonic = time.monotonic
        now = monotonic()
        next_tick = now + self.tick_every
        next_sweep = now + self.sweep_every
        try:
            self.check_drain()
            while not (self.draining and not self.conns and self.nothing_comes_back()):
                timeout = max(0.0, min(next_tick, next_sweep) - now)
                self.holding = self.parks and now >= self.hold_resume
                for key, mask in sel.select(timeout):
                    conn = key.data
                    if conn is _ACCEPT:
                        self.accept()
                    elif conn is _WAKEUP:
                        rt.tick()
                        if self.access is not None:
                            self.access.tick(monotonic())    # a USR1 reopens at once
                        self.check_drain()
                    elif conn.closed:
                        # closed earlier in this batch; its fd may already be a new conn's
                        continue
                    elif mask & _W:
                        self.on_writable(conn)
                    else:
                        self.on_readable(conn)
                self.holding = False
                if self.held:
                    self.send_held()
                if self.hold_paused is not None:
                    self.log_hold_paused()
                now = monotonic()
                if now >= next_tick:
                    rt.tick()
                    if self.access is not None:
                        self.access.tick(now)
                    self.check_drain()
                    now = monotonic()
                    next_tick = now + self.tick_every
                if now >= next_sweep:
                    self.sweep(now)
                    next_sweep = now + self.sweep_every
        finally:
            if self.parks:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
            for conn in list(self.conns.values()):
                self.close(conn)
            sel.close()
            if self.access is not None:
                self.access.close()          # a graceful stop loses no line

    def nothing_comes_back(self):
        """Draining with nothing open: True unless a connection this worker parked came
        back (rt.parks_settled: a PARK the primary read after its final dispatch returns
        here). Those are taken now and the loop goes on to serve them."""
        if self.parks and not self.rt.parks_settled():
            while True:             # every message that came back (each holds <= MAX_FDS)
                self.accept_once()
                if not self.rt.queued():
                    break
        return not self.conns

    # -- parking (see the module docstring) ----------------------------------------------
    def install_park_timer(self):
        """True when the SIGALRM handler is ours (not in the main thread, or the application
        has its own: no parking)."""
        try:
            handler = signal.getsignal(signal.SIGALRM)
            if (handler not in (signal.SIG_DFL, None)
                    and getattr(handler, "__func__", None) is not Server.on_park_timer):
                return False
            signal.signal(signal.SIGALRM, self.on_park_timer)
            signal.siginterrupt(signal.SIGALRM, False)
        except ValueError:
            return False
        return True

    def step(self, conn, gen):
        """next(gen) of conn's respond() generator, which runs the application: with the park
        timer armed while this worker holds other connections that could wait behind it."""
        if not self.parks or len(self.conns) < 2:
            return next(gen)
        self.running_since = time.monotonic()
        self.running = conn
        # Armed already, but for later (a backed-off look of a request that has ended):
        # sooner, so that this request gets its look, and held responses their send, on time.
        if not self.timer_armed or self.timer_due > self.running_since + PARK_AFTER:
            self.arm_timer(PARK_AFTER)
        try:
            return next(gen)
        finally:
            self.running = None

    def arm_timer(self, delay):
        self.timer_armed = True
        self.timer_due = time.monotonic() + delay
        signal.setitimer(signal.ITIMER_REAL, delay)

    def on_park_timer(self, signum, frame):
        self.timer_armed = False
        running = self.running
        if running is None:
            return                 # no request runs: stay unarmed until one starts
        try:
            now = time.monotonic()
            left = self.running_since + PARK_AFTER - now
            if left > 0:           # a younger request than the one that armed us
                self.arm_timer(left)
                return
            if self.held and self.send_held_now(running) and now - self.timer_due > HOLD_LATE:
                self.pause_holding(now - self.timer_due)
            if self.park_idle(running) and not self.rt.draining:
                # Only the ready ones were handed back: look again, less often each time.
                if self.park_again_for != self.running_since:
                    self.park_again_for, self.park_again = self.running_since, PARK_AFTER
                else:
                    self.park_again = min(self.park_again * 2, PARK_AGAIN_MAX)
                self.arm_timer(self.park_again)
        except Exception:          # noqa: BLE001 -- never into the application; no logging here
            pass

    def park_idle(self, running):
        """Hands idle connections but `running` back to the primary: every one, or with more
        than PARK_ALL_MAX others open, those with bytes waiting; True in the second case (the
        rest may need another look while `running` runs).
        Idle: between requests (kept alive), or taken and silent so far (a client that
        connects first and sends later, a browser's preconnect): either one's next request
        would otherwise wait for the running one (measured: without the silent ones, 1 % of
        a connect-then-send client's requests took ~40 ms behind a /sleep?ms=25, bench/README.md
        "Mixed load"). Never a TLS connection (its session state is ours) nor one whose PROXY
        header is still to come."""
        some = len(self.conns) > PARK_ALL_MAX + 1
        if some:
            # Level-triggered: polling reads no event away from the loop.
            candidates = [key.data for key, _ in self.sel.select(0) if type(key.data) is Conn]
        else:
            candidates = self.conns.values()
        idle = [c for c in candidates
                if c is not running and (c.busy_since is None or not c.nreq) and c.reader.idle
                and not c.out and c.resume is None and not c.closing and not c.linger
                and not c.counted and c.proxy is None and not c.tls and not c.closed and not c.dead]
        k = self.rt.park([c.fd for c in idle]) if idle else 0
        for conn in idle[:k]:
            # Handed over: ours no more. Marked closed (events left in a batch are skipped);
            # not reported with rt.closed(): park() accounted for it.
            conn.closed = conn.dead = True
            del self.conns[conn.fd]
            self.release(conn)
        return some

    def check_drain(self):
        if self.draining or not self.rt.draining:
            return
        self.draining = True
        if not self.parks:
            # Not parking: nothing comes back, and under shared/reuseport our fd covers the
            # listeners, which stay readable until the worker's final sweep: stop watching.
            self.sel.unregister(self.listen_fd)
        # Kept-alive connections keep their keep-alive deadline (see the module docstring);
        # one taken but silent yet gets the same short grace instead of request_timeout.
        grace = time.monotonic() + self.limits.keepalive_timeout
        for conn in list(self.conns.values()):
            if not conn.nreq and conn.resume is None and not conn.out and conn.reader.idle:
                conn.deadline = min(conn.deadline, grace)

    def sweep(self, now):
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.closed:
                continue                         # parked or closed by an earlier one
            if (conn.reader.idle and not conn.out and conn.resume is None and not conn.linger
                    and not conn.closing):
                # A request may have arrived while the application held the loop; it is
                # not the client's fault that we have not read it yet.
                self.on_readable(conn)
                if conn.closed or conn.deadline > now:
                    continue
            self.close(conn)

    def accept(self):
        # A sync worker under load has its next connection queued already (the primary
        # prefetches while it works): once this one is done and nothing else is open, take
        # it at once rather than through another select() -- up to TAKE_AGAIN times, so the
        # wake-up pipe and the timers are never put off for long.
        for _ in range(TAKE_AGAIN):
            self.accept_once()
            if self.conns or self.draining or not self.rt.queued():
                return

    def accept_once(self):
        rt = self.rt
        socks = rt.take()
        if rt.draining:
            self.check_drain()
        now = time.monotonic()
        limits, base_env, conns = self.limits, self.base_env, self.conns
        deadline = now + limits.request_timeout
        if self.draining:
            # Taken while draining (parked connections that came back): a silent one gets
            # the drain's short grace, as check_drain gives those already open.
            deadline = min(deadline, now + limits.keepalive_timeout)
        proxy_protocol = self.edge.proxy_protocol
        tls_context = self.tls_context
        for sock in socks:
            if tls_context is not None:
                self.start_tls(tls_context, sock, now)
                continue
            conn = Conn(sock, RequestReader(limits), conn_environ(base_env, sock))
            conn.deadline = deadline
            conn.busy_since = now
            conns[conn.fd] = conn
            if proxy_protocol and not self.start_proxy(conn, now):
                continue
            # The request has usually arrived already: read it before registering, so a
            # connection answered and closed at once never costs a selector round trip.
            self.on_readable(conn)
            if not conn.events and not conn.closed:
                conn.events = _R
                self.sel.register(conn.fd, _R, conn)

    # -- TLS --------------------------------------------------------------------------------
    def start_tls(self, context, sock, now):
        """A connection taken with --certfile: wrap it and begin its handshake."""
        try:
            sock = tls.wrap(context, sock)
        except OSError:                         # the peer is already gone
            sock.close()
            self.rt.closed()
            return
        conn = Conn(sock, RequestReader(self.limits), conn_environ(self.base_env, sock))
        conn.tls = conn.handshaking = True
        conn.deadline = now + tls.HANDSHAKE_TIMEOUT
        conn.busy_since = now
        self.conns[conn.fd] = conn
        self.continue_handshake(conn)

    def continue_handshake(self, conn):
        """One handshake step; once it is done, the request that may have come with it is read."""
        try:
            want = tls.handshake_step(conn.sock)
        except OSError as exc:                  # ssl.SSLError: not TLS, refused certificate, ...
            self.log.debug("TLS handshake with %s failed: %s", conn.env.get("REMOTE_ADDR") or "-", exc)
            self.close(conn)
            return
        if want:
            self.watch(conn, _R if want == tls.WANT_READ else _W)
            return
        conn.handshaking = False
        conn.deadline = time.monotonic() + self.limits.request_timeout
        if conn.events != _R:
            self.watch(conn, _R)
        self.on_readable(conn)

    # -- reading ----------------------------------------------------------------------------
    def on_readable(self, conn):
        if conn.handshaking:
            self.continue_handshake(conn)
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if conn.linger:
            conn.lingered += len(data)
            if not data or conn.lingered > LINGER_MAX:
                self.close(conn)
            return
        if not data:                 # EOF: an incomplete request is never dispatched
            self.close(conn)
            return
        if conn.proxy is not None:
            data = self.read_proxy(conn, data)
            if not data:
                return
        if conn.busy_since is None:
            now = time.monotonic()
            conn.busy_since = now
            conn.deadline = now + self.limits.request_timeout
        conn.reader.feed(data)
        self.process(conn)

    def start_proxy(self, conn, now):
        """--proxy-protocol: wait for the header (False: the peer may not send one, closed)."""
        if not edge.peer_allowed(self.edge, conn.env.get("REMOTE_ADDR", "")):
            self.log.warning("closing a connection from %s: not in --proxy-allow-from",
                             conn.env.get("REMOTE_ADDR") or "a unix socket")
            self.close(conn)
            return False
        conn.proxy = edge.ProxyState()
        conn.deadline = now + self.edge.proxy_timeout
        return True

    def read_proxy(self, conn, data):
        """Feeds the PROXY header; returns the request bytes after it (b"" or None: none yet)."""
        try:
            rest = conn.proxy.feed(data)
        except ProxyHeaderError as exc:
            self.log.info("closing a connection from %s: %s", conn.env.get("REMOTE_ADDR") or "-", exc)
            self.close(conn)
            return None
        if rest is None:
            return None
        client = conn.proxy.client
        conn.proxy = None
        if client is not None:
            conn.env["REMOTE_ADDR"] = client[0]
            conn.env["REMOTE_PORT"] = str(client[1])
        conn.deadline = time.monotonic() + self.limits.request_timeout
        return rest

    def process(self, conn):
        """Answer every complete request in the buffer, in order, until one has to wait."""
        reader = conn.reader
        while conn.resume is None and not conn.closing and not conn.dead:
            try:
                event = reader.next_event()
            except HttpError as exc:
                self.fail(conn, exc.status)
                return
            if event is NEED_DATA:
                break
            req = reader.request
            if not req.admitted:
                if self.limit and self.in_progress - conn.counted >= self.limit:
                    connlimits.rejected()
                    self.fail(conn, 503)         # says Connection: close; the app never runs
                    return
                if self.no_keep_alive:
                    req.keep_alive = False
                req.admitted = True
                conn.nreq += 1
                if event is HEAD and req.expect_continue and not reader.pending:
                    self.send(conn, http1.CONTINUE_100)
            if event is COMPLETE:
                if conn.held:            # a pipelined request: its predecessor's answer goes first
                    conn.held = False
                    self.flush(conn)
                    if conn.dead:        # the client is gone: do not run its next request
                        break
                gen = respond(self, conn, req)
                try:
                    self.step(conn, gen)
                except StopIteration:
                    conn.busy_since = None       # response done: timers restart in settle()
                    continue
                conn.resume = gen                # waits for the socket to take more
        self.settle(conn)

    def settle(self, conn):
        """Pick the events to wait for, or close, after a burst of work on `conn`."""
        if conn.held and (conn.closing or conn.resume is not None):
            conn.held = False                    # not held after all: send what we can now
            self.flush(conn)
        if self.limit:
            self.count_in_progress(conn)
        if conn.dead:
            self.close(conn)
            return
        if (conn.out and not conn.held) or conn.resume is not None:
            want = _W
        elif conn.closing:
            # Draining: always linger after the last response (see the module docstring).
            if conn.linger or conn.reader.pending or self.draining:
                self.start_linger(conn)
            else:
                self.close(conn)
            return
        else:
            want = _R
            if conn.busy_since is None:          # a response just completed
                now = time.monotonic()
                if conn.reader.idle:
                    # Also while draining: the client may be sending its next request now.
                    conn.deadline = now + self.limits.keepalive_timeout
                else:                            # part of the next request is here
                    conn.busy_since = now
                    conn.deadline = now + self.limits.request_timeout
        if conn.events != want:
            self.watch(conn, want)

    def count_in_progress(self, conn):
        """Keeps `in_progress` (see the module docstring) right after a burst on `conn`."""
        # A held response is a finished one (it only waits for the end of the batch).
        busy = not conn.closing and (conn.resume is not None or (bool(conn.out) and not conn.held)
                                     or not conn.reader.idle)
        if busy is not conn.counted:
            conn.counted = busy
            self.in_progress += 1 if busy else -1

    def fail(self, conn, status):
        """Answer a request the application never sees, then close (lingering)."""
        self.send(conn, error_response(status))
        conn.closing = conn.linger = True
        self.settle(conn)

    def start_linger(self, conn):
        # Closing with unread input makes the kernel send RST, which can destroy the error
        # response before the client reads it: half-close, then read and discard a while.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(conn)
            return
        conn.linger = True
        conn.deadline = time.monotonic() + self.limits.linger_timeout
        if conn.events != _R:
            self.watch(conn, _R)

    def watch(self, conn, events):
        """Wait for `events` on `conn` (registering it on first use)."""
        if conn.events:
            self.sel.modify(conn.fd, events, conn)
        else:
            self.sel.register(conn.fd, events, conn)
        conn.events = events

    def release(self, conn):
        """Stop watching `conn` and close our socket for it (closed, or handed to the primary)."""
        if conn.events:
            try:
                self.sel.unregister(conn.fd)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    # -- writing ----------------------------------------------------------------------------
    def send_response(self, conn, data, keep_alive):
        """A whole response (head and body) that leaves `conn` open: held to the end of the
        batch when holding (the connection stays watched for reading), else send()."""
        if (self.holding and keep_alive and not conn.dead and not conn.tls
                and (conn.held or not conn.out)):
            conn.out.append(data)
            conn.out_len += len(data)
            if not conn.held:
                conn.held = True
                self.held.append(conn)
            return
        self.send(conn, data)

    def send_held(self):
        """End of a batch: send every held response (one pass, as Redis writes its replies
        before it sleeps). A connection whose write fell short (the rest waits for
        writability), whose peer is gone (closed) or that --limit-concurrency counts is
        settled again; the others were settled for reading already."""
        held, self.held = self.held, []
        for conn in held:
            if conn.closed:
                continue                         # closed or parked meanwhile
            if conn.held:
                conn.held = False
                self.flush(conn)
            if conn.out or conn.dead or self.limit:   # else settled already, for reading
                self.settle(conn)

    def send_held_now(self, running):
        """From the park timer, while `running` is in the application: the responses held
        for the others go now, not when that request ends. Only `flush` (never a close, a
        log or a selector change): send_held() settles them at the end of the batch.
        Returns True when there was one to send."""
        sent = False
        for conn in self.held:
            if conn.held and conn is not running and not conn.closed:
                conn.held = False
                self.flush(conn)
                sent = True
        return sent

    def pause_holding(self, late):
        """The timer ran HOLD_LATE after it was due while responses were held: the
        application was in a call Python could not interrupt (a C extension's blocking read,
        restarted after the signal), and those responses waited for it. Such an application
        is not served by holding: send at once (from this batch on) for HOLD_PAUSE, doubling
        each time it happens again up to HOLD_PAUSE_MAX, and starting over once it has not
        happened for HOLD_PAUSE_MAX. Runs in the handler: only plain assignments."""
        now = time.monotonic()
        if now > self.hold_resume + HOLD_PAUSE_MAX:
            self.hold_pause = HOLD_PAUSE
        self.holding = False
        self.hold_resume = now + self.hold_pause
        self.hold_paused = (late, self.hold_pause)       # logged by the loop (see run())
        self.hold_pause = min(self.hold_pause * 2, HOLD_PAUSE_MAX)

    def log_hold_paused(self):
        (late, pause), self.hold_paused = self.hold_paused, None
        self.log.info("held responses waited over %.0f ms for a request in a call Python could "
                      "not interrupt; sending each at once for %.0f s",
                      (late + PARK_AFTER) * 1000, pause)

    def send(self, conn, data):
        """Queue `data`; try to send at once when nothing is queued before it."""
        if conn.dead or not data:
            return
        if conn.out:
            conn.out.append(data)
            conn.out_len += len(data)
            if conn.held:                        # held bytes go now, with these
                conn.held = False
                self.flush(conn)
            return
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            conn.dead = True
            return
        if sent < len(data):
            rest = memoryview(data)[sent:]
            conn.out.append(rest)
            conn.out_len += len(rest)

    def flush(self, conn):
        """Send queued output; returns True when the queue is empty."""
        out = conn.out
        while out:
            data = out[0] if len(out) == 1 else b"".join(out)
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                conn.dead = True
                out.clear()
                conn.out_len = 0
                return True
            if sent < len(data):
                rest = memoryview(data)[sent:]
                out[:] = [rest]
                conn.out_len = len(rest)
                conn.deadline = time.monotonic() + self.limits.request_timeout
                return False
            out.clear()
            conn.out_len = 0
        return True

    def flush_blocking(self, conn):
        """For write(): wait (this socket only) until the queue is empty."""
        poller = None
        while not self.flush(conn):
            if poller is None:
                poller = select.poll()
                poller.register(conn.fd, select.POLLOUT)
            if not poller.poll(self.limits.request_timeout * 1000):
                conn.dead = True
                raise TimeoutError("client did not read the response in time")
        if conn.dead:
            raise ConnectionError("client disconnected")

    def on_writable(self, conn):
        if conn.handshaking:
            self.continue_handshake(conn)
            return
        if not self.flush(conn):
            return
        gen = conn.resume
        if gen is not None and not conn.dead:
            try:
                self.step(conn, gen)
                self.settle(conn)
                return
            except StopIteration:
                conn.resume = None
                conn.busy_since = None
        if conn.dead:
            self.close(conn)
        elif not conn.closing and conn.reader.pending:
            self.process(conn)               # pipelined requests wait behind a response
        else:
            self.settle(conn)

    # -- closing ----------------------------------------------------------------------------
    def close(self, conn):
        if conn.closed:
            return
        conn.closed = conn.dead = True
        del self.conns[conn.fd]
        if conn.counted:
            conn.counted = False
            self.in_progress -= 1
        gen = conn.resume
        conn.resume = None
        if gen is not None:
            gen.close()                        # runs the iterable's close(), request_finished
        self.release(conn)
        conn.out.clear()
        self.rt.closed()
