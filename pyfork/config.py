"""Option definitions, defaults, environment variables and validation.

Theory of operation: ``OPTIONS`` is the single table of every ``pyfork serve``
setting (name, flags, type, default, help). The CLI builds its argparse parser
from it, reads ``PYFORK_<NAME>`` for any option not given on the command line
(command line > environment > default), and ``validate()`` turns the result
into a ``Settings`` or raises ``ConfigError`` with a one-line message. The
public ``pyfork.Cluster`` validates its keyword arguments with the same
functions, so the API and the CLI accept exactly the same values. Nothing here
binds, imports the app or forks.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

POLICIES = ("rr", "least", "shared", "reuseport")
BACKENDS = ("auto", "c", "python")
INTERFACES = ("auto", "wsgi", "asgi", "raw", "asyncio", "embed")
DEFAULT_APP = "pyfork.demo:app"
DEFAULT_BIND = "127.0.0.1:8000"
# 1024 workers is far beyond any core count we target; the dispatcher's slot
# table is sized 2x+ that to hold replacements and draining workers.
MAX_WORKERS = 1024
ENV_PREFIX = "PYFORK_"
LOOPBACK = "127.0.0.0/8,::1"     # the default of --proxy-allow-from and --forwarded-allow-ips


class ConfigError(ValueError):
    """A bad option value: the message is one line meant for the user."""


@dataclass(frozen=True)
class BindAddr:
    kind: str                 # "tcp" | "unix" | "fd"
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    text: str = ""

    def __str__(self) -> str:
        return self.text


@dataclass
class Option:
    name: str                          # attribute name, env PYFORK_<NAME.upper()>
    flags: tuple                       # argparse flags; () for the positional APP
    kind: Callable                     # parser from str
    default: object
    help: str
    metavar: Optional[str] = None
    repeat: bool = False
    flag: bool = False                 # takes no value on the command line (env: 1/0, true/false)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _int(text) -> int:
    try:
        return int(str(text).strip(), 10)
    except ValueError:
        raise ConfigError(f"expected an integer, got {text!r}") from None


def _float(text) -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise ConfigError(f"expected a number of seconds, got {text!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ConfigError(f"expected a finite number of seconds, got {text!r}")
    return v


def _str(text) -> str:
    return str(text)


def _bool(text) -> bool:
    if isinstance(text, bool):
        return text
    t = str(text).strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected 1/0, true/false, got {text!r}")


def _octal(text) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    try:
        return int(str(text).strip(), 8)
    except ValueError:
        raise ConfigError(f"expected an octal mode such as 022, got {text!r}") from None


OPTIONS: List[Option] = [
    Option("app", (), _str, DEFAULT_APP, "module:attribute of a WSGI, ASGI, raw or asyncio app "
           "(default: the demo app, pyfork.demo:app)", metavar="APP"),
    Option("bind", ("-b", "--bind"), _str, [DEFAULT_BIND],
           "HOST:PORT, [V6]:PORT, unix:PATH or fd://N; repeatable (default 127.0.0.1:8000)",
           metavar="ADDR", repeat=True),
    Option("workers", ("-w", "--workers"), _int, None, "number of workers (default: os.cpu_count())",
           metavar="N"),
    Option("policy", ("--policy",), _str, "rr", "rr | least | shared | reuseport (default rr)"),
    Option("backend", ("--backend",), _str, "auto", "auto | c | python (default auto)"),
    Option("interface", ("--interface",), _str, "auto", "auto | wsgi | asgi | raw | asyncio | embed (default auto)"),
    Option("graceful_timeout", ("--graceful-timeout",), _float, 30.0,
           "seconds draining workers get before SIGKILL (30)", metavar="S"),
    Option("timeout", ("--timeout",), _float, 30.0,
           "seconds without a heartbeat before a worker is killed as hung (30; 0 = off)", metavar="S"),
    Option("min_uptime", ("--min-uptime",), _float, 1.0,
           "a READY worker that dies sooner than this is respawned after a backoff (1)", metavar="S"),
    Option("max_restarts", ("--max-restarts",), _int, 5,
           "boot failures (exits before READY) in a row before a worker slot gives up (5)", metavar="N"),
    Option("give_up_cooldown", ("--give-up-cooldown",), _float, 60.0,
           "seconds before a slot that gave up tries again while others serve (60; 0 = never)", metavar="S"),
    Option("max_requests", ("--max-requests",), _int, 0,
           "recycle a worker after this many requests (0 = off)", metavar="N"),
    Option("max_requests_jitter", ("--max-requests-jitter",), _int, 0,
           "add 0..N at random to --max-requests per worker (0)", metavar="N"),
    Option("control", ("--control",), _str, None,
           "Unix socket for status and commands (mode 0600, peer uid checked)", metavar="PATH"),
    # ---- process management (issue 13) ----
    Option("max_worker_memory", ("--max-worker-memory",), _int, 0,
           "replace a worker whose RSS stays above this many MiB, replacement READY first (0 = off)",
           metavar="MB"),
    Option("max_worker_lifetime", ("--max-worker-lifetime",), _float, 0.0,
           "replace a worker after it has lived this many seconds, replacement READY first (0 = off)",
           metavar="S"),
    Option("max_worker_lifetime_jitter", ("--max-worker-lifetime-jitter",), _float, None,
           "add 0..S seconds at random to --max-worker-lifetime per worker (default: a tenth of it)",
           metavar="S"),
    Option("config", ("-c", "--config"), _str, None,
           "Python config file: option names as globals, server hooks as functions", metavar="FILE.py"),
    Option("check_config", ("--check-config",), _bool, False,
           "load the config and the app, report, exit 0 or 2 (no bind, no fork)", flag=True),
    Option("print_config", ("--print-config",), _bool, False,
           "print the effective settings and exit", flag=True),
    Option("pid_file", ("--pid-file",), _str, None,
           "write the primary's pid here after binding; removed at exit", metavar="PATH"),
    Option("user", ("--user",), _str, None,
           "after binding, run as this user (name or uid; root only)", metavar="USER"),
    Option("group", ("--group",), _str, None,
           "after binding, run as this group (name or gid; root only; default: the user's)", metavar="GROUP"),
    Option("umask", ("--umask",), _octal, None, "file mode creation mask, octal (e.g. 027)", metavar="MODE"),
    Option("chdir", ("--chdir",), _str, None, "change to this directory before loading the app", metavar="DIR"),
    # observability (issue 12)
    Option("metrics", ("--metrics",), _str, None,
           "HOST:PORT or unix:PATH: Prometheus text at GET /metrics, served by the primary "
           "(needs pyfork[metrics])", metavar="ADDR"),
    Option("access_log", ("--access-log",), _str, None,
           "PATH or - (stdout): one line per request (off by default); USR1 reopens it", metavar="PATH"),
    Option("access_log_format", ("--access-log-format",), _str, None,
           "gunicorn's access log format (default: gunicorn's)", metavar="FMT"),
    Option("log_level", ("--log-level",), _str, "info", "debug | info | warning | error | critical (info)"),
    Option("log_format", ("--log-format",), _str, "text", "text | json: pyfork's own log lines (text)"),
    # limits (issue 18)
    Option("limit_concurrency", ("--limit-concurrency",), _int, 0,
           "per worker: answer new requests with a fast 503 (Connection: close) above this many "
           "(0 = off)", metavar="N"),
    Option("backlog", ("--backlog",), _int, None,
           "listen backlog of every listener, 1..65535 (default: net.core.somaxconn)", metavar="N"),
    Option("keep_alive", ("--keep-alive",), _float, 5.0,
           "seconds a kept-alive connection may idle between requests (5; 0 = no keep-alive)",
            metavar="S"),
    # behind a load balancer (issue 14)
    Option("proxy_protocol", ("--proxy-protocol",), _bool, False,
           "every connection starts with a PROXY v1/v2 header (HAProxy send-proxy[-v2]); the app sees "
           "the client it names", flag=True),
    Option("proxy_allow_from", ("--proxy-allow-from",), _str, LOOPBACK,
           f"CIDRs (comma-separated, * = any) allowed to send PROXY headers ({LOOPBACK})", metavar="CIDRS"),
    Option("proxy_timeout", ("--proxy-timeout",), _float, 5.0,
           "seconds a connection has to send its PROXY header (5)", metavar="S"),
    Option("forwarded_allow_ips", ("--forwarded-allow-ips",), _str, LOOPBACK,
           f"CIDRs (comma-separated, * = any) whose X-Forwarded-For/-Proto and Forwarded headers "
           f"are trusted ({LOOPBACK}; '' = none)", metavar="CIDRS"),
    Option("health_path", ("--health-path",), _str, None,
           "pyfork answers GET PATH itself: 200, or 503 once a stop has begun (no app code)", metavar="PATH"),
    Option("drain_delay", ("--drain-delay",), _float, 0.0,
           "after TERM, keep serving S seconds (the health path says 503) before the graceful stop (0)",
           metavar="S"),
    # TLS in the worker (issue 14)
    Option("certfile", ("--certfile",), _str, None,
           "PEM certificate (chain) to serve TLS on every listener; the handshake runs in the workers",
           metavar="PATH"),
    Option("keyfile", ("--keyfile",), _str, None,
           "PEM private key of --certfile (default: the key is in --certfile)", metavar="PATH"),
    Option("ca_certs", ("--ca-certs",), _str, None,
           "PEM CA bundle that client certificates must chain to (with --cert-reqs)", metavar="PATH"),
    Option("ssl_ciphers", ("--ssl-ciphers",), _str, None,
           "OpenSSL cipher string for TLS 1.2 (default: OpenSSL's; TLS 1.3 suites are not affected)",
           metavar="CIPHERS"),
    Option("cert_reqs", ("--cert-reqs",), _str, "none",
           "client certificates: none | optional | required (none; optional/required need --ca-certs)"),
]
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class Settings:
    app: object = DEFAULT_APP
    bind: List[BindAddr] = field(default_factory=list)
    workers: int = 1
    policy: str = "rr"
    backend: str = "auto"
    interface: str = "auto"
    graceful_timeout: float = 30.0
    timeout: float = 30.0
    min_uptime: float = 1.0
    max_restarts: int = 5
    give_up_cooldown: float = 60.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    control: Optional[str] = None
    ready_timeout: float = 30.0
    # process management (issue 13)
    max_worker_memory: int = 0
    max_worker_lifetime: float = 0.0
    max_worker_lifetime_jitter: float = 0.0
    pid_file: Optional[str] = None
    user: Optional[str] = None          # the name or uid as given
    group: Optional[str] = None
    uid: Optional[int] = None           # resolved by validate()
    gid: Optional[int] = None
    umask: Optional[int] = None
    chdir: Optional[str] = None
    metrics: Optional[BindAddr] = None
    access_log: Optional[str] = None
    access_log_format: Optional[str] = None
    log_level: str = "info"
    log_format: str = "text"
    # limits (issue 18)
    limit_concurrency: int = 0
    backlog: int = 4096
    keep_alive: float = 5.0
    proxy_protocol: bool = False
    proxy_allow_from: str = LOOPBACK
    proxy_timeout: float = 5.0
    forwarded_allow_ips: str = LOOPBACK
    health_path: Optional[str] = None
    drain_delay: float = 0.0
    # TLS (issue 14): all None when off
    certfile: Optional[str] = None
    keyfile: Optional[str] = None
    ca_certs: Optional[str] = None
    ssl_ciphers: Optional[str] = None
    cert_reqs: str = "none"


_HOSTPORT = re.compile(r"^(?P<host>[^:\[\]]*):(?P<port>[0-9]+)$")
_V6PORT = re.compile(r"^\[(?P<host>[0-9A-Fa-f:.%a-zA-Z]+)\]:(?P<port>[0-9]+)$")


def parse_bind(text) -> BindAddr:
    """HOST:PORT, [V6]:PORT, unix:PATH or fd://N -> BindAddr; ConfigError otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"bad bind address {text!r}: expected HOST:PORT, [V6]:PORT, unix:PATH or fd://N")
    t = text.strip()
    if t.startswith("unix:"):
        path = t[5:]
        if not path:
            raise ConfigError(f"bad bind address {text!r}: unix: needs a path")
        if len(os.fsencode(path)) >= 108:   # sockaddr_un.sun_path is 108 bytes on Linux
            raise ConfigError(f"bad bind address {text!r}: unix socket path longer than 107 bytes")
        return BindAddr("unix", path=path, text=t)
    if t.startswith("fd://"):
        num = t[5:]
        if not num.isdigit():
            raise ConfigError(f"bad bind address {text!r}: fd:// needs a file descriptor number")
        return BindAddr("fd", fd=int(num), text=t)
    m = _V6PORT.match(t) or _HOSTPORT.match(t)
    if not m:
        raise ConfigError(f"bad bind address {text!r}: expected HOST:PORT, [V6]:PORT, unix:PATH or fd://N")
    port = int(m.group("port"))
    if not 0 <= port <= 65535:
        raise ConfigError(f"bad bind address {text!r}: port must be 0..65535")
    host = m.group("host")
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return BindAddr("tcp", host=host, port=port, text=shown)


def split_env_list(text: str) -> List[str]:
    """PYFORK_BIND may hold several addresses separated by commas or spaces."""
    return [p for p in re.split(r"[,\s]+", text.strip()) if p]


def _choice(name, value, choices):
    if value not in choices:
        raise ConfigError(f"bad --{name.replace('_', '-')} {value!r}: choose one of {', '.join(choices)}")
    return value


def _nonneg(name, value, integer=False):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"bad {flag} {value!r}: expected a{'n integer' if integer else ' number'}")
    if value < 0:
        raise ConfigError(f"bad {flag} {value!r}: must be >= 0")
    return value


def validate(*, app=DEFAULT_APP, bind=None, workers=None, policy="rr", backend="auto", interface="auto",
             graceful_timeout=30.0, timeout=30.0, min_uptime=1.0, max_restarts=5, give_up_cooldown=60.0,
             max_requests=0, max_requests_jitter=0, control=None, ready_timeout=30.0,
             metrics=None, access_log=None, access_log_format=None, log_level="info",
             log_format="text", limit_concurrency=0, backlog=None, keep_alive=5.0, proxy_protocol=False,
             proxy_allow_from=LOOPBACK, proxy_timeout=5.0, forwarded_allow_ips=LOOPBACK, health_path=None,
             drain_delay=0.0, certfile=None, keyfile=None, ca_certs=None, ssl_ciphers=None,
             cert_reqs="none", **procmgmt) -> Settings:
    """Checks every value; returns Settings or raises ConfigError (one line)."""
    if isinstance(app, str):
        if not app.strip():
            raise ConfigError("bad APP '': expected module:attribute")
    elif not callable(app):
        raise ConfigError(f"bad APP {app!r}: expected a 'module:attribute' string or a callable")
    if bind is None:
        bind = [DEFAULT_BIND]
    if isinstance(bind, (str, BindAddr)):
        bind = [bind]
    addrs = [b if isinstance(b, BindAddr) else parse_bind(b) for b in bind]
    if not addrs:
        raise ConfigError("no bind address given")
    if len(addrs) > 16:   # Dispatcher max_listeners default
        raise ConfigError(f"too many bind addresses ({len(addrs)}); at most 16")
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise ConfigError(f"bad --workers {workers!r}: must be an integer in 1..{MAX_WORKERS}")
    policy = _choice("policy", policy, POLICIES)
    backend = _choice("backend", backend, BACKENDS)
    interface = _choice("interface", interface, INTERFACES)
    if policy == "reuseport":
        bad = [a.text for a in addrs if a.kind != "tcp"]
        if bad:
            raise ConfigError(f"--policy reuseport needs HOST:PORT binds (one SO_REUSEPORT listener per worker); "
                              f"got {', '.join(bad)}")
    for name, val in (("graceful_timeout", graceful_timeout), ("timeout", timeout),
                      ("min_uptime", min_uptime), ("give_up_cooldown", give_up_cooldown),
                      ("ready_timeout", ready_timeout)):
        _nonneg(name, val)
    for name, val in (("max_restarts", max_restarts), ("max_requests", max_requests),
                      ("max_requests_jitter", max_requests_jitter)):
        _nonneg(name, val, integer=True)
    if ready_timeout <= 0:
        raise ConfigError("bad ready_timeout: must be > 0")
    if control is not None:
        if not isinstance(control, str) or not control:
            raise ConfigError(f"bad --control {control!r}: expected a path")
        if len(os.fsencode(control)) >= 108:
            raise ConfigError(f"bad --control {control!r}: unix socket path longer than 107 bytes")
    obs = validate_observability(metrics=metrics, access_log=access_log, access_log_format=access_log_format,
                                 log_level=log_level, log_format=log_format)
    edge = validate_edge(proxy_protocol=proxy_protocol, proxy_allow_from=proxy_allow_from,
                         proxy_timeout=proxy_timeout, forwarded_allow_ips=forwarded_allow_ips,
                         health_path=health_path, drain_delay=drain_delay)
    tls = validate_tls(certfile=certfile, keyfile=keyfile, ca_certs=ca_certs, ssl_ciphers=ssl_ciphers,
                       cert_reqs=cert_reqs)
    if tls["certfile"] is not None and edge["proxy_protocol"]:
        raise ConfigError("--proxy-protocol with --certfile is not supported: let the balancer "
                          "terminate TLS, or pass TLS through without the PROXY header")
    return Settings(**obs, **edge, **tls, app=app, bind=addrs, workers=workers, policy=policy, backend=backend, interface=interface,
                    graceful_timeout=float(graceful_timeout), timeout=float(timeout), min_uptime=float(min_uptime),
                    max_restarts=max_restarts, give_up_cooldown=float(give_up_cooldown), max_requests=max_requests,
                    max_requests_jitter=max_requests_jitter, control=control, ready_timeout=float(ready_timeout),
                    **validate_procmgmt(**procmgmt),
                    **validate_limits(limit_concurrency=limit_concurrency, backlog=backlog, keep_alive=keep_alive))


SOMAXCONN_PATH = "/proc/sys/net/core/somaxconn"
SOMAXCONN_FALLBACK = 4096      # Linux's default since 5.4 (128 before)
MAX_BACKLOG = 65535            # listen(2)'s backlog is kept in an unsigned short by the kernel
MAX_KEEP_ALIVE = 86400.0       # a day: beyond it a typo is likelier than a wish
MAX_LIMIT_CONCURRENCY = 1 << 20


def somaxconn() -> int:
    """The kernel's cap on a listen backlog (net.core.somaxconn): --backlog's default, as
    nginx and uvicorn take a backlog the kernel then caps."""
    try:
        with open(SOMAXCONN_PATH) as f:
            value = int(f.read().strip())
    except (OSError, ValueError):
        return SOMAXCONN_FALLBACK
    return min(max(value, 1), MAX_BACKLOG)


def validate_limits(*, limit_concurrency=0, backlog=None, keep_alive=5.0) -> dict:
    """The limit options (issue 18), checked; a dict of Settings fields."""
    if limit_concurrency is None:
        limit_concurrency = 0
    if (isinstance(limit_concurrency, bool) or not isinstance(limit_concurrency, int)
            or not 0 <= limit_concurrency <= MAX_LIMIT_CONCURRENCY):
        raise ConfigError(f"bad --limit-concurrency {limit_concurrency!r}: "
                          f"must be an integer in 0..{MAX_LIMIT_CONCURRENCY} (0 = off)")
    if backlog is None:
        backlog = somaxconn()
    if isinstance(backlog, bool) or not isinstance(backlog, int) or not 1 <= backlog <= MAX_BACKLOG:
        raise ConfigError(f"bad --backlog {backlog!r}: must be an integer in 1..{MAX_BACKLOG}")
    _nonneg("keep_alive", keep_alive)
    if keep_alive != keep_alive or keep_alive > MAX_KEEP_ALIVE:
        raise ConfigError(f"bad --keep-alive {keep_alive!r}: must be 0..{MAX_KEEP_ALIVE:g} seconds")
    return dict(limit_concurrency=limit_concurrency, backlog=backlog, keep_alive=float(keep_alive))


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")


def validate_observability(*, metrics=None, access_log=None, access_log_format=None, log_level="info",
                           log_format="text") -> dict:
    """The observability options (issue 12), checked; a dict of Settings fields."""
    if metrics is not None and not isinstance(metrics, BindAddr):
        if not isinstance(metrics, str) or not metrics.strip():
            raise ConfigError(f"bad --metrics {metrics!r}: expected HOST:PORT or unix:PATH")
        try:
            metrics = parse_bind(metrics)
        except ConfigError:
            raise ConfigError(f"bad --metrics {metrics!r}: expected HOST:PORT or unix:PATH") from None
    if metrics is not None and metrics.kind not in ("tcp", "unix"):
        raise ConfigError(f"bad --metrics {metrics.text!r}: expected HOST:PORT or unix:PATH")
    if access_log is not None and (not isinstance(access_log, str) or not access_log):
        raise ConfigError(f"bad --access-log {access_log!r}: expected a path or - (stdout)")
    if access_log_format is not None:
        from pyfork.serve.accesslog import compile_format
        try:
            compile_format(access_log_format)
        except ValueError as e:
            raise ConfigError(f"bad --access-log-format: {e}") from None
    if not isinstance(log_level, str):
        raise ConfigError(f"bad --log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    log_level = _choice("log_level", log_level.lower(), LOG_LEVELS)
    log_format = _choice("log_format", log_format, LOG_FORMATS)
    return {"metrics": metrics, "access_log": access_log, "access_log_format": access_log_format,
            "log_level": log_level, "log_format": log_format}


def validate_edge(*, proxy_protocol=False, proxy_allow_from=LOOPBACK, proxy_timeout=5.0,
                  forwarded_allow_ips=LOOPBACK, health_path=None, drain_delay=0.0) -> dict:
    """The load-balancer options (issue 14), checked; a dict of Settings fields."""
    from pyfork.serve.edge import Networks
    if not isinstance(proxy_protocol, bool):
        raise ConfigError(f"bad --proxy-protocol {proxy_protocol!r}: expected true or false")
    for name, value, may_be_empty in (("proxy_allow_from", proxy_allow_from, False),
                                      ("forwarded_allow_ips", forwarded_allow_ips, True)):
        flag = "--" + name.replace("_", "-")
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, str):
            raise ConfigError(f"bad {flag} {value!r}: expected CIDRs such as 127.0.0.0/8,::1 or *")
        if value.strip() or not may_be_empty:
            try:
                Networks(value)
            except ValueError as e:
                raise ConfigError(f"bad {flag}: {e}") from None
        if name == "proxy_allow_from":
            proxy_allow_from = value
        else:
            forwarded_allow_ips = value
    _nonneg("proxy_timeout", proxy_timeout)
    if proxy_timeout <= 0:
        raise ConfigError(f"bad --proxy-timeout {proxy_timeout!r}: must be > 0")
    if health_path is not None and (not isinstance(health_path, str) or not health_path.startswith("/")
                                    or any(c in health_path for c in " ?#\r\n")):
        raise ConfigError(f"bad --health-path {health_path!r}: expected a path such as /healthz")
    _nonneg("drain_delay", drain_delay)
    return {"proxy_protocol": proxy_protocol, "proxy_allow_from": proxy_allow_from,
            "proxy_timeout": float(proxy_timeout), "forwarded_allow_ips": forwarded_allow_ips,
            "health_path": health_path, "drain_delay": float(drain_delay)}


# --cert-reqs: pyfork.serve.tls.CERT_REQS's names, and gunicorn's numbers for them.
_CERT_REQS = ("none", "optional", "required")
_CERT_REQS_NUMBERS = {"0": "none", "1": "optional", "2": "required"}


def validate_tls(*, certfile=None, keyfile=None, ca_certs=None, ssl_ciphers=None, cert_reqs="none") -> dict:
    """The TLS options (issue 14), checked by building the server's SSLContext once here in
    the primary (pyfork.serve.tls; the workers build their own); a dict of Settings fields."""
    for name, val in (("certfile", certfile), ("keyfile", keyfile), ("ca_certs", ca_certs),
                      ("ssl_ciphers", ssl_ciphers)):
        if val is not None and (not isinstance(val, str) or not val):
            raise ConfigError(f"bad --{name.replace('_', '-')} {val!r}: expected a "
                              f"{'cipher string' if name == 'ssl_ciphers' else 'path'}")
    if cert_reqs is None:
        cert_reqs = "none"
    cert_reqs = _CERT_REQS_NUMBERS.get(str(cert_reqs).strip(), str(cert_reqs).strip().lower())
    cert_reqs = _choice("cert_reqs", cert_reqs, _CERT_REQS)
    off = dict(certfile=None, keyfile=None, ca_certs=None, ssl_ciphers=None, cert_reqs="none")
    if certfile is None:
        given = [n for n, v in (("keyfile", keyfile), ("ca_certs", ca_certs), ("ssl_ciphers", ssl_ciphers))
                 if v is not None] + (["cert_reqs"] if cert_reqs != "none" else [])
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} needs --certfile (TLS is off without it)")
        return off
    if cert_reqs != "none" and ca_certs is None:
        raise ConfigError(f"--cert-reqs {cert_reqs} needs --ca-certs (the CAs client certificates must chain to)")
    # Absolute: the workers read the files again, after a --chdir.
    certfile, keyfile, ca_certs = (None if p is None else os.path.abspath(p) for p in (certfile, keyfile, ca_certs))
    from pyfork.serve import tls     # here: ssl costs a primary without TLS ~5 MB of RSS
    cfg = tls.TLSConfig(certfile, keyfile, ca_certs, ssl_ciphers, cert_reqs)
    try:
        tls.check(cfg)
    except tls.TLSError as e:
        raise ConfigError(str(e)) from None
    return dict(certfile=certfile, keyfile=keyfile, ca_certs=ca_certs, ssl_ciphers=ssl_ciphers,
                cert_reqs=cert_reqs)


def from_env(environ=None) -> dict:
    """Options found in PYFORK_<NAME> variables, parsed (ConfigError on a bad value).
    PYFORK_BACKEND is also what pyfork.backend.load() reads."""
    environ = os.environ if environ is None else environ
    out = {}
    for opt in OPTIONS:
        raw = environ.get(opt.env)
        if raw is None or raw == "":
            continue
        try:
            if opt.repeat:
                out[opt.name] = [opt.kind(p) for p in split_env_list(raw)]
            else:
                out[opt.name] = opt.kind(raw)
        except ConfigError as e:
            raise ConfigError(f"bad {opt.env}: {e}") from None
    return out


def validate_procmgmt(*, max_worker_memory=0, max_worker_lifetime=0.0, max_worker_lifetime_jitter=None,
                      pid_file=None, user=None, group=None, umask=None, chdir=None) -> dict:
    """The process-management options (recycling, pid file, privileges): checked values
    as Settings fields, or ConfigError. A user or group is resolved here, before any fork."""
    _nonneg("max_worker_memory", max_worker_memory, integer=True)
    _nonneg("max_worker_lifetime", max_worker_lifetime)
    if max_worker_lifetime_jitter is None:
        max_worker_lifetime_jitter = max_worker_lifetime / 10
    _nonneg("max_worker_lifetime_jitter", max_worker_lifetime_jitter)
    for name, val in (("pid_file", pid_file), ("chdir", chdir)):
        if val is not None and (not isinstance(val, str) or not val):
            raise ConfigError(f"bad --{name.replace('_', '-')} {val!r}: expected a path")
    if chdir is not None and not os.path.isdir(chdir):
        raise ConfigError(f"bad --chdir {chdir!r}: not a directory")
    if umask is not None:
        if isinstance(umask, bool) or not isinstance(umask, int) or not 0 <= umask <= 0o777:
            raise ConfigError(f"bad --umask {umask!r}: expected an octal mode 000..777")
    uid = gid = None
    if user is not None or group is not None:
        from pyfork.primary import hygiene
        uid, gid = hygiene.resolve_ids(user, group)
    return dict(max_worker_memory=max_worker_memory, max_worker_lifetime=float(max_worker_lifetime),
                max_worker_lifetime_jitter=float(max_worker_lifetime_jitter), pid_file=pid_file,
                user=None if user is None else str(user), group=None if group is None else str(group),
                uid=uid, gid=gid, umask=umask, chdir=chdir)
