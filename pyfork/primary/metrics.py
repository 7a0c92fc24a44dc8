"""``--metrics ADDR``: Prometheus text at ``GET /metrics``, served by the primary.

Theory of operation. The primary binds ADDR (``HOST:PORT`` or ``unix:PATH``) before the
first fork (an unbindable address is a startup error, exit code 2). The listener and each
scraper's socket are watched fds of the dispatcher, like the control socket: the primary's
loop returns to Python when one is readable; pyfork.primary.watched accepts and reads, and
this module answers, without ever blocking (non-blocking sockets, a request head of at most MAX_HEAD bytes, at
most MAX_CLIENTS scrapers, an idle one dropped after IDLE_TIMEOUT). Workers never see a
scrape, and a stuck app cannot delay one: every value is read by the primary from what it
already has -- the scoreboard (requests handled, the request-duration buckets each
worker counts into in its own line), the dispatcher's counters (connections,
pending, back-pressure skips, fd exhaustion, per-worker inflight), /proc (RSS, CPU), and
the tally of reaped workers (pyfork.primary.tally) -- all through ``Arbiter.status()``,
which is what ``pyfork status --json`` prints too. A scrape costs the primary about a
millisecond of Python and costs workers nothing; the per-connection path is unchanged.

The text is made by ``prometheus_client`` (the optional extra ``pyfork[metrics]``) from a
collector that turns one status snapshot into metric families, plus its standard process
collector for the primary itself. The metric names are the contract (README "Metrics").
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from typing import Callable, Dict, Optional

from pyfork.primary.watched import Client, WatchedListener

log = logging.getLogger("pyfork.metrics")

MAX_HEAD = 8192        # a scrape's request head is a few hundred bytes
MAX_CLIENTS = 8        # concurrent scrapers (watched fds are a fixed-size table in the dispatcher)
IDLE_TIMEOUT = 10.0    # seconds a scraper may take to send its request or read the reply
SNDBUF = 1 << 20       # ask the kernel to take a whole reply in one send (capped by wmem_max)
# Watch tags: the control socket uses 1 .. 2**31+1 (pyfork.primary.control); ours are above.
TAG_LISTENER = 0xC0000000
CLIENT_TAGS = 0xFFFFFFFF - TAG_LISTENER - 1

WORKER_STATES = ("spawning", "ready", "draining", "backoff", "gave_up")


def require_client():
    """Imports prometheus_client or raises ImportError with the one-line fix."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImportError("--metrics needs the prometheus-client package: pip install 'pyfork[metrics]'") from None
    return prometheus_client


class StatusCollector:
    """A prometheus_client collector over one ``Arbiter.status()`` snapshot per scrape."""

    def __init__(self, status: Callable[[], dict]):
        self.status = status

    def describe(self):
        return []      # unchecked collector: the families depend on the live slots

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        st = self.status()
        if not st:
            return
        totals = st["totals"]
        disp = st.get("dispatch", {})
        req = CounterMetricFamily("pyfork_requests", "Requests completed, per worker slot "
                                  "(a reaped worker's count is kept in its slot)", labels=["slot"])
        for slot, n in totals["requests"].items():
            req.add_metric([slot], n)
        yield req
        yield CounterMetricFamily("pyfork_connections", "Connections accepted: by the primary (rr, least; "
                                  "but during a pull) or by the workers themselves",
                                  value=disp.get("accepted", 0) + totals.get("worker_accepted", 0))
        yield GaugeMetricFamily("pyfork_dispatch_pending", "Connections accepted and not yet sent to a worker",
                                value=disp.get("pending", 0))
        yield GaugeMetricFamily("pyfork_parked_connections", "Idle kept-alive connections parked in the "
                                "primary until their next request (handed back by a worker stuck in a "
                                "long request)", value=disp.get("parked", 0))
        yield CounterMetricFamily("pyfork_backpressure", "Times a worker was skipped because it was full",
                                  value=disp.get("busy_skips", 0))
        yield CounterMetricFamily("pyfork_pulls", "Times no worker could start a new connection, so the "
                                  "primary (rr, least) left it and the next ones to the workers to accept",
                                  value=disp.get("pulls", 0))
        yield CounterMetricFamily("pyfork_fd_exhaustion", "accept() failures for lack of file descriptors "
                                  "(EMFILE/ENFILE)", value=disp.get("fd_exhaustion", 0))
        states = {s: 0 for s in WORKER_STATES}
        for row in st["workers"]:
            if row["state"] in states:
                states[row["state"]] += 1
        for s in st.get("slots", []):
            if s["state"] in ("backoff", "gave_up"):
                states[s["state"]] += 1
        workers = GaugeMetricFamily("pyfork_workers", "Workers by state (backoff and gave_up count slots)",
                                    labels=["state"])
        for name in WORKER_STATES:
            workers.add_metric([name], states[name])
        yield workers
        restarts = CounterMetricFamily("pyfork_worker_restarts", "Workers replaced, by cause", labels=["cause"])
        for cause, n in totals["restarts"].items():
            restarts.add_metric([cause], n)
        yield restarts
        inflight: Dict[str, int] = {}
        rss: Dict[str, int] = {}
        for row in st["workers"]:
            s = str(row["slot"])
            inflight[s] = inflight.get(s, 0) + int(row.get("inflight") or 0)
            rss[s] = rss.get(s, 0) + int(row.get("rss") or 0)
        g = GaugeMetricFamily("pyfork_inflight", "Connections open on the slot's workers: sent by the "
                              "primary or accepted by the worker (shared, reuseport), not yet closed",
                              labels=["slot"])
        for s, n in sorted(inflight.items()):
            g.add_metric([s], n)
        yield g
        busy = CounterMetricFamily("pyfork_busy_seconds", "CPU seconds (user+system) the slot's workers spent, "
                                   "reaped workers included", labels=["slot"])
        for s, v in totals["cpu_seconds"].items():
            busy.add_metric([s], v)
        yield busy
        g = GaugeMetricFamily("pyfork_worker_rss_bytes", "Resident memory of the slot's workers", labels=["slot"])
        for s, n in sorted(rss.items()):
            g.add_metric([s], n)
        yield g
        dur = totals.get("request_duration")
        if dur:
            yield HistogramMetricFamily(
                "pyfork_request_duration_seconds", "Time from a request's start to its end in the "
                "worker, counted into buckets in the worker's scoreboard line (reaped workers included)",
                buckets=list(dur["le"].items()), sum_value=dur["sum_seconds"])
        yield from limit_families(st)


def limit_families(st: dict):
    """The limits in force (--limit-concurrency, --backlog, --keep-alive, RLIMIT_NOFILE) and
    the 503s --limit-concurrency caused: all from the status snapshot, no per-request cost."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    limits = st.get("limits") or {}
    yield GaugeMetricFamily("pyfork_limit_concurrency", "--limit-concurrency: requests per worker "
                            "before new ones get 503 (0 = off)", value=limits.get("limit_concurrency", 0))
    yield CounterMetricFamily("pyfork_limit_concurrency_rejections", "Requests answered 503 because a "
                              "worker was at --limit-concurrency (reported by workers once a second)",
                              value=st["totals"].get("limit_concurrency_rejections", 0))
    yield GaugeMetricFamily("pyfork_listen_backlog", "--backlog given to every listener",
                            value=limits.get("backlog", 0))
    yield GaugeMetricFamily("pyfork_keep_alive_seconds", "--keep-alive: idle timeout of kept-alive "
                            "connections (0 = no keep-alive)", value=limits.get("keep_alive", 0))
    nofile = limits.get("nofile") or {}
    yield GaugeMetricFamily("pyfork_open_files_limit", "RLIMIT_NOFILE soft limit of the primary and "
                            "its workers (raised to the hard limit at start)", value=nofile.get("soft", 0))


class MetricsServer:
    """The /metrics listener; owns its sockets, watched by ``disp`` (see the module docstring)."""

    def __init__(self, addr, disp, status: Callable[[], dict]):
        """``addr``: a pyfork.config.BindAddr of kind tcp or unix. OSError when it cannot bind."""
        prom = require_client()
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector
        self.addr = addr
        self.disp = disp
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatusCollector(status))
        ProcessCollector(registry=self.registry)      # process_* of the primary
        self._render = prom.generate_latest
        self.content_type = prom.CONTENT_TYPE_LATEST.encode()
        self.out: Dict[int, bytes] = {}       # by tag: reply bytes the kernel has not taken yet
        self.path: Optional[str] = None
        self.listener = WatchedListener("metrics", self._listen(addr), self.path, disp, self,
                                        tag=TAG_LISTENER, client_tags=CLIENT_TAGS, max_clients=MAX_CLIENTS,
                                        idle_timeout=IDLE_TIMEOUT, recv_size=MAX_HEAD)

    def _listen(self, addr) -> socket.socket:
        if addr.kind == "unix":
            try:
                if stat.S_ISSOCK(os.lstat(addr.path).st_mode):
                    os.unlink(addr.path)       # stale, as gunicorn does for its unix binds
            except FileNotFoundError:
                pass
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.path = addr.path
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr.path if addr.kind == "unix" else (addr.host, addr.port))
            s.listen(64)
            s.setblocking(False)
        except BaseException:
            s.close()
            self.path = None
            raise
        return s

    def url(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host, port = self.listener.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/metrics"

    # ---- events from the loop ------------------------------------------------
    def owns(self, tag: int) -> bool:
        return self.listener.owns(tag)

    def on_readable(self, tag: int) -> None:
        self.listener.on_readable(tag)

    # ---- WatchedServer: what the listener asks of the protocol ----------------
    def vet(self, sock: socket.socket) -> Optional[str]:
        return None

    def refuse(self, sock: socket.socket, why: str) -> None:
        sock.close()           # the scraper retries at its next interval

    def on_drop(self, c: Client) -> None:
        self.out.pop(c.tag, None)

    def on_data(self, c: Client, data: bytes) -> None:
        # Not refreshing c.seen here: a scraper has IDLE_TIMEOUT from connecting to finish.
        if c.tag in self.out:
            self.listener.drop(c.tag)     # talking while its reply is still going out
            return
        c.buf += data
        end = c.buf.find(b"\r\n\r\n")
        if end < 0:
            end = c.buf.find(b"\n\n")
        if end < 0:
            if len(c.buf) > MAX_HEAD:
                self._reply(c, b"431 Request Header Fields Too Large", b"text/plain", b"head too large\n")
            return
        line = c.buf.split(b"\n", 1)[0].strip()
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._reply(c, b"400 Bad Request", b"text/plain", b"bad request line\n")
        elif parts[0] not in (b"GET", b"HEAD"):
            self._reply(c, b"405 Method Not Allowed", b"text/plain", b"GET /metrics\n")
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            self._reply(c, b"404 Not Found", b"text/plain", b"try /metrics\n")
        else:
            try:
                body = self._render(self.registry)
            except Exception:
                log.exception("metrics: rendering failed")
                self._reply(c, b"500 Internal Server Error", b"text/plain", b"rendering failed\n")
                return
            self._reply(c, b"200 OK", self.content_type, b"" if parts[0] == b"HEAD" else body,
                        length=len(body))

    def _reply(self, c: Client, status: bytes, ctype: bytes, body: bytes, length=None) -> None:
        head = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                % (status, ctype, len(body) if length is None else length))
        self.out[c.tag] = head + body
        try:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        except OSError:
            pass
        self._flush(c)

    def _flush(self, c: Client) -> None:
        out = self.out[c.tag]
        try:
            n = c.sock.send(out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.listener.drop(c.tag)
            return
        if n == len(out):
            self.listener.drop(c.tag)
        else:
            self.out[c.tag] = out[n:]     # the rest goes out from expire()

    def expire(self, now: float) -> None:
        for tag in list(self.out):
            c = self.listener.clients.get(tag)
            if c is not None:
                self._flush(c)
        self.listener.expire(now)         # a scraper that does not read its reply is dropped

    # ---- teardown --------------------------------------------------------------
    def close(self) -> None:
        self.listener.close()
