"""The access log: one line per request, in gunicorn's format language, never in the way.

Theory of operation. ``--access-log PATH|-`` and ``--access-log-format FMT`` are checked in
the primary before any fork (``compile_format`` raises ValueError with one line on a bad
format; the arbiter opens PATH once to check it) and recorded with ``configure()``; a
forked worker inherits that record, and its interface (WSGI, ASGI) asks ``for_worker()``
for its AccessLog, or None when the log is off, so an off log costs one ``is None`` test
per request.

Format: gunicorn's (``access_log_format``): Python %-formatting over named atoms,
``%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"`` by default. Atoms:
h remote address, l "-", u user (HTTP basic auth) or "-", t date [10/Oct/2000:13:55:36
+0000], r request line, m method, U path, q query string, H protocol, s status, B body
bytes, b body bytes or "-", f referer, a user agent, T seconds, M milliseconds, D
microseconds, L seconds with decimals, p <pid>, {name}i request header, {name}o response
header, {name}e environment variable. Only the atoms the format uses are computed.

Writing never delays a response: the interface logs after the response is written (WSGI)
or handed to the transport (ASGI); a line is appended to an in-memory buffer, written
with one write() when it holds FLUSH_BYTES or when the interface's tick finds it older
than FLUSH_EVERY, and at the end of serve() (a graceful stop loses no line; an immediate
stop, SIGQUIT, may lose the last FLUSH_EVERY seconds). Lines are shorter than PIPE_BUF
and the file is opened O_APPEND, so workers sharing one file never interleave within a
line. SIGUSR1 reopens the path (pyfork.logfiles): lines logged before it go to the old
file, lines after it to the new one.
"""

from __future__ import annotations

import base64
import os
import re
import time
from typing import Optional

from pyfork import logfiles

DEFAULT_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
ATOMS = ("h", "l", "u", "t", "r", "m", "U", "q", "H", "s", "B", "b", "f", "a", "T", "M", "D", "L", "p")
FLUSH_BYTES = 64 * 1024      # one write() per this much (a few hundred lines)
FLUSH_EVERY = 1.0            # seconds a line may wait in the buffer (logrotate/tail see it soon)

_KEY = re.compile(r"%\(([^)]*)\)")
_VARIABLE = re.compile(r"^\{[^{}]+\}[ioe]$")

_config: Optional[tuple] = None     # (target, format), set by configure() in the primary


class _Probe(dict):
    def __missing__(self, key):
        return "-"


def compile_format(fmt: str) -> tuple:
    """The atoms ``fmt`` uses; ValueError (one line) when it is not a valid format."""
    if not isinstance(fmt, str) or not fmt:
        raise ValueError("empty access log format")
    keys = tuple(dict.fromkeys(_KEY.findall(fmt)))
    for k in keys:
        if k not in ATOMS and not _VARIABLE.match(k):
            raise ValueError(f"unknown access log atom %({k})s: expected one of {' '.join(ATOMS)}, "
                             "{header}i, {header}o or {variable}e")
    try:
        fmt % _Probe()
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"malformed access log format {fmt!r}: {e}") from None
    if not keys:
        raise ValueError(f"access log format {fmt!r} uses no atom, e.g. %(r)s")
    return keys


def configure(target: Optional[str], fmt: Optional[str] = None) -> None:
    """Records the access log settings for the workers forked after this (None: off)."""
    global _config
    if not target:
        _config = None
        return
    fmt = fmt or DEFAULT_FORMAT
    compile_format(fmt)
    _config = (target, fmt)


def check_target(target: str) -> None:
    """Opens PATH once (created if needed) so that a bad path fails before any fork (OSError)."""
    if target != "-":
        os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))


def for_worker() -> Optional["AccessLog"]:
    """The access log of this worker, or None when the log is off."""
    if _config is None:
        return None
    return AccessLog(*_config)


# ---- per-line values ----------------------------------------------------------------
class Record:
    """What one request leaves for the log; the interface fills it (see ``AccessLog.log``)."""

    __slots__ = ("remote", "method", "path", "query", "protocol", "status", "length", "req_headers",
                 "resp_headers", "start", "duration", "environ")


def _header(headers, name: bytes) -> str:
    for k, v in headers or ():
        if type(k) is str:
            k = k.encode("latin-1")
        if k.lower() == name:
            return v.decode("latin-1") if type(v) is not str else v
    return "-"


def _user(r: Record) -> str:
    auth = _header(r.req_headers, b"authorization")
    if auth[:6].lower() == "basic ":
        try:
            return base64.b64decode(auth[6:].strip()).decode("latin-1").split(":", 1)[0] or "-"
        except (ValueError, UnicodeDecodeError):
            return "-"
    return "-"


_last_date = [0, ""]


def _date(r: Record) -> str:
    sec = int(r.start)
    if sec != _last_date[0]:      # strftime once per second, not per line
        _last_date[0] = sec
        _last_date[1] = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(sec))
    return _last_date[1]


def _line(r: Record) -> str:
    q = r.query
    return f"{r.method} {r.path}{'?' + q if q else ''} {r.protocol}"


_GETTERS = {
    "h": lambda r: r.remote or "-",
    "l": lambda r: "-",
    "u": _user,
    "t": _date,
    "r": _line,
    "m": lambda r: r.method,
    "U": lambda r: r.path,
    "q": lambda r: r.query,
    "H": lambda r: r.protocol,
    "s": lambda r: r.status,
    "B": lambda r: r.length or 0,
    "b": lambda r: r.length if r.length else "-",
    "f": lambda r: _header(r.req_headers, b"referer"),
    "a": lambda r: _header(r.req_headers, b"user-agent"),
    "T": lambda r: int(r.duration),
    "M": lambda r: int(r.duration * 1000),
    "D": lambda r: int(r.duration * 1000000),
    "L": lambda r: f"{r.duration:.6f}",
    "p": lambda r: f"<{os.getpid()}>",
}


def _getter(key: str):
    g = _GETTERS.get(key)
    if g is not None:
        return g
    name, kind = key[1:-2], key[-1]
    if kind == "i":
        lname = name.lower().encode("latin-1")
        return lambda r: _header(r.req_headers, lname)
    if kind == "o":
        lname = name.lower().encode("latin-1")
        return lambda r: _header(r.resp_headers, lname)
    return lambda r: (r.environ or {}).get(name, "-")   # {var}e: the WSGI environ


class AccessLog:
    """One worker's buffered writer (see the module docstring)."""

    def __init__(self, target: str, fmt: str):
        self.target = target
        self.fmt = fmt
        self.getters = tuple((k, _getter(k)) for k in compile_format(fmt))
        self.wants_environ = any(k.endswith("}e") for k in dict(self.getters))
        self.fd = -1
        self.buf = []
        self.size = 0
        self.first_at = 0.0          # monotonic time of the oldest buffered line
        self.generation = logfiles.generation()
        self.errors = 0
        logfiles.register(self)
        try:
            self._open()      # now, not at the first flush: a rename before then must not win
        except OSError:
            self.fd = -1      # the first flush tries again and reports

    def log(self, r: Record) -> None:
        values = {k: g(r) for k, g in self.getters}
        line = self.fmt % values + "\n"
        if not self.buf:
            self.first_at = time.monotonic()
        self.buf.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()

    def tick(self, now: float) -> None:
        """From the interface's timer: flush lines older than FLUSH_EVERY, act on a USR1."""
        if self.generation != logfiles.generation():
            self.reopen()
        elif self.buf and now - self.first_at >= FLUSH_EVERY:
            self.flush()

    def _open(self) -> None:
        if self.target == "-":
            self.fd = 1
        else:
            self.fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def flush(self) -> None:
        if not self.buf:
            return
        data = "".join(self.buf).encode("utf-8", "backslashreplace")
        self.buf.clear()
        self.size = 0
        try:
            if self.fd < 0:
                self._open()
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            self.errors += 1
            if self.errors == 1 or self.errors % 1000 == 0:
                import logging
                logging.getLogger("pyfork.access").error("cannot write the access log %s: %s (%d time(s))",
                                                         self.target, e, self.errors)

    def reopen(self) -> None:
        """Flush to the old file, then open the path again (logrotate renamed it)."""
        self.flush()
        self.generation = logfiles.generation()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
        try:
            self._open()
        except OSError:
            self.fd = -1          # the next flush tries again and reports

    def close(self) -> None:
        self.flush()
        logfiles.unregister(self)
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1
