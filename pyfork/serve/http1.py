"""HTTP/1.1 for the sync interfaces: request heads, bodies and response heads, no sockets.

Theory of operation. A connection's bytes go into one RequestReader. The reader finds the end
of a request head itself (the first CRLFCRLF) and hands exactly that head to llhttp
(httptools), which parses and validates the request line and the field lines. Body framing
is decided here, not by llhttp: a Content-Length body is sliced off the buffer and a chunked
body goes through the strict decoder below. Because the reader always knows where a message
ends, pipelined requests are cut exactly, llhttp only ever sees heads, and a parser that has
seen the head of a body-bearing request is simply replaced (about 1 us) for the next one.

llhttp is more lenient than the conformance corpus (/work/shared/conformance, gunicorn's parser
vectors) in some places, so the checks it lacks are made here: request-target form versus
method, HTTP version (only 1.0/1.1; 400, as the corpus wants no 5xx), Transfer-Encoding
lists, Content-Length with Transfer-Encoding, repeated SP and bare CR/LF around the request
line, chunked framing and forbidden trailer fields, field count/size limits (gunicorn's
defaults: 4094-byte request line -> 414, 100 fields and 8190-byte field lines -> 431). While
a head is incomplete, cheap incremental checks refuse junk at once (a TLS ClientHello gets a
400) and keep a slow client's cost linear in the bytes it sends. It is stricter in
two places where gunicorn accepts a request: methods outside llhttp's table (`-BLARGH`) and
raw obs-text in the target. Those heads are re-validated by our own request-line grammar and
fed to llhttp again with a neutral request line (`PUT / HTTP/x.y`); the real method and target
are kept.

Everything raises HttpError(status) on a bad request; the caller answers with a tiny response
and closes. Response side: render_head() validates the application's status and headers
(no CR/LF injection) and decides the body framing (Content-Length, chunked, or close).
"""

import os
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

import httptools
from httptools.parser.errors import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
)

__all__ = [
    "Limits", "HttpError", "Request", "RequestReader", "NEED_DATA", "HEAD", "COMPLETE",
    "split_target", "render_head", "error_response", "CONTINUE_100",
    "MODE_NONE", "MODE_LENGTH", "MODE_CHUNKED", "MODE_CLOSE",
]


class Limits:
    """Request limits and timeouts of one worker; defaults cite where they come from."""

    __slots__ = ("max_body", "max_line", "max_field_size", "max_fields", "max_head",
                 "keepalive_timeout", "request_timeout", "linger_timeout")

    def __init__(self, max_body=1 << 20, max_line=4094, max_field_size=8190, max_fields=100,
                 max_head=65536, keepalive_timeout=5.0, request_timeout=30.0,
                 linger_timeout=2.0):
        self.max_body = max_body                   # 1 MiB: whole body is buffered in memory
        self.max_line = max_line                   # gunicorn limit_request_line -> 414
        self.max_field_size = max_field_size       # gunicorn limit_request_field_size -> 431
        self.max_fields = max_fields               # gunicorn limit_request_fields -> 431
        self.max_head = max_head                   # total head bytes -> 431
        self.keepalive_timeout = keepalive_timeout  # idle between requests (gunicorn 2, uvicorn 5)
        self.request_timeout = request_timeout     # head/body/response in progress (slow client)
        self.linger_timeout = linger_timeout       # drain input after an error response

    # env var -> (attribute, type); only the ones an operator plausibly tunes.
    ENV = {
        "PYFORK_MAX_BODY": ("max_body", int),
        "PYFORK_KEEPALIVE_TIMEOUT": ("keepalive_timeout", float),
        "PYFORK_REQUEST_TIMEOUT": ("request_timeout", float),
    }

    @classmethod
    def from_env(cls, environ=None):
        """Defaults overridden by PYFORK_MAX_BODY, PYFORK_KEEPALIVE_TIMEOUT, PYFORK_REQUEST_TIMEOUT."""
        environ = os.environ if environ is None else environ
        limits = cls()
        for var, (attr, typ) in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            try:
                value = typ(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r}: expected a number") from None
            if not value > 0:
                raise ValueError(f"{var}={raw!r}: must be > 0")
            setattr(limits, attr, value)
        return limits

    def __repr__(self):
        return "Limits(%s)" % ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)


class HttpError(Exception):
    """A request the server answers itself (4xx/5xx) and then closes the connection."""

    def __init__(self, status, detail=""):
        super().__init__(status, detail)
        self.status = status
        self.detail = detail


class Request:
    """One parsed request. `body` is None until the whole body has arrived."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "length", "chunked",
                 "expect_continue", "connect", "body", "admitted")

    def __init__(self, method, target, version, headers):
        self.method = method          # str, e.g. "GET"
        self.target = target          # bytes, the raw request-target
        self.version = version        # "1.1" or "1.0"
        self.headers = headers        # [(name bytes, value bytes)], values trimmed
        self.keep_alive = True
        self.length = 0               # body bytes announced by Content-Length (0 if none)
        self.chunked = False
        self.expect_continue = False
        self.connect = False          # CONNECT: answered, then the connection closes
        self.body = None
        self.admitted = False         # set by the server once it decided to serve this one


NEED_DATA = "need-data"
HEAD = "head"            # head parsed, body still to come (caller may send 100 / 503 now)
COMPLETE = "complete"    # reader.request is complete (body included)

_S_HEAD, _S_LENGTH, _S_CHUNKED, _S_ERROR = range(4)
_CH_SIZE, _CH_DATA, _CH_DATA_END, _CH_TRAILER = range(4)

# RFC 9110 5.6.2 token; methods additionally exclude lower case (gunicorn: `-bl` is rejected,
# `-BLARGH` accepted) since every registered method is upper case.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_METHOD = re.compile(rb"[!$%&'*+\-.^_`|~0-9A-Z]+").fullmatch
_METHOD_PREFIX = re.compile(rb"[" + _TCHAR + rb"]*").match
_METHOD_MAX = 64   # longest registered method is 17 bytes; a longer token is not HTTP
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]").fullmatch
# visible ASCII and obs-text: what our own request-line grammar accepts in a target
_TARGET_CHARS = re.compile(rb"[\x21-\x7e\x80-\xff]+").fullmatch
# RFC 3986 authority pieces (reg-name or IP-literal, optional port) for absolute/authority form
_HOST = rb"(?:\[[0-9A-Fa-f:.]+(?:%25[\w.~-]+)?\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)"
_ABSOLUTE = re.compile(
    rb"[A-Za-z][A-Za-z0-9+.\-]*://(?:[A-Za-z0-9\-._~%!$&'()*+,;=:]*@)?" + _HOST +
    rb"(?::[0-9]*)?(?:[/?#][\x21-\x7e\x80-\xff]*)?").fullmatch
_AUTHORITY = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~%!$&'()*+,;=]+):[0-9]+").fullmatch
# RFC 9112 7.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS val ] )
_QSTRING = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*[" + _TCHAR + rb"]+(?:[ \t]*=[ \t]*(?:[" + _TCHAR +
    rb"]+|" + _QSTRING + rb"))?)*").fullmatch
_FIELD_LINE = re.compile(rb"([" + _TCHAR + rb"]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)").fullmatch
_BARE_LF = re.compile(rb"(?<!\r)\n").search
_MAX_CHUNK_LINE = 4096   # size line incl. extensions; nginx/gunicorn use a few KiB

# RFC 9110 6.5.1: fields that must not appear in trailers (framing, routing, auth, controls)
_FORBIDDEN_TRAILERS = frozenset((
    b"content-length", b"transfer-encoding", b"host", b"trailer", b"te", b"connection",
    b"keep-alive", b"upgrade", b"expect", b"range", b"max-forwards", b"authorization",
    b"proxy-authorization", b"cookie", b"content-encoding", b"content-range",
))

# header names we must look at, by length first so most names cost one len() and a set probe
_SPECIAL = {b"host": 1, b"expect": 2, b"connection": 3, b"content-length": 4,
            b"transfer-encoding": 5}
_SPECIAL_LENS = frozenset(len(k) for k in _SPECIAL)


class _Head:
    """llhttp callbacks for one head; field limits are enforced as fields complete."""

    __slots__ = ("url", "headers", "done", "complete", "status", "max_fields", "max_field")

    def __init__(self, limits):
        self.max_fields = limits.max_fields
        self.max_field = limits.max_field_size
        self.reset()

    def reset(self):
        self.url = None
        self.headers = []
        self.done = self.complete = False
        self.status = 400

    def on_url(self, url):
        self.url = url if self.url is None else self.url + url

    def on_header(self, name, value):
        headers = self.headers
        # gunicorn counts "Name: value\r\n" against limit_request_field_size
        if len(headers) >= self.max_fields or len(name) + len(value) + 4 > self.max_field:
            self.status = 431
            raise HttpError(431)
        headers.append((name, value.rstrip(b" \t")))   # llhttp keeps trailing OWS

    def on_headers_complete(self):
        self.done = True

    def on_message_complete(self):
        self.complete = True


def _new_parser(head):
    parser = httptools.HttpRequestParser(head)
    # Let llhttp accept Transfer-Encoding together with Content-Length: we decide framing
    # ourselves and reject the smuggling combinations (TE chunked + CL) below, but accept
    # `Transfer-Encoding: identity` + Content-Length as gunicorn does.
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    return parser


class RequestReader:
    """Per-connection sans-IO reader: feed(bytes), then next_event() until NEED_DATA."""

    __slots__ = ("limits", "buf", "pos", "scan", "state", "request", "parser", "head",
                 "parts", "have", "remain", "cstate", "ntrailers", "line_seen")

    def __init__(self, limits):
        self.limits = limits
        self.buf = b""
        self.pos = self.scan = 0
        self.line_seen = False      # the current head's request line has its CRLF
        self.state = _S_HEAD
        self.request = None
        self.head = _Head(limits)
        self.parser = _new_parser(self.head)
        self.parts = None

    def feed(self, data):
        pos, buf = self.pos, self.buf
        if pos >= len(buf):
            self.buf = data
            self.scan = 0
        else:
            # Unconsumed bytes plus more: accumulate in a bytearray (amortised O(1) per byte;
            # `bytes + bytes` would copy the whole partial head on every read, quadratic for
            # a client trickling one byte per segment). Back to bytes once a head is whole.
            if pos:
                buf = buf[pos:]
                self.scan = max(0, self.scan - pos)
            if type(buf) is not bytearray:
                buf = bytearray(buf)
            buf += data
            self.buf = buf
        self.pos = 0

    def _bytes(self):
        buf = self.buf
        if type(buf) is bytearray:
            buf = self.buf = bytes(buf)
        return buf

    @property
    def pending(self):
        """Unconsumed bytes in the buffer."""
        return len(self.buf) - self.pos

    @property
    def idle(self):
        """True between requests with nothing buffered."""
        return self.state == _S_HEAD and self.pos >= len(self.buf)

    def next_event(self):
        state = self.state
        try:
            if state == _S_HEAD:
                if self.pos >= len(self.buf):   # the usual case after each request
                    return NEED_DATA
                return self._read_head()
            if state == _S_LENGTH:
                return self._read_length()
            if state == _S_CHUNKED:
                return self._read_chunked()
        except HttpError:
            self.state = _S_ERROR
            raise
        raise HttpError(400, "connection is in error state")

    # -- head ------------------------------------------------------------------------------
    def _read_head(self):
        buf, pos, limits = self.buf, self.pos, self.limits
        while buf.startswith(b"\r\n", pos):   # RFC 9112 2.2: ignore empty lines before a request
            pos += 2
        self.pos = pos
        first = buf[pos:pos + 1]
        if first == b"\n" or (first == b"\r" and len(buf) > pos + 1):
            raise HttpError(400, "bare CR or LF before the request line")   # llhttp skips them
        old = max(pos, self.scan)             # bytes before `old` were checked already
        end = buf.find(b"\r\n\r\n", old)
        if end < 0:
            # Incomplete head: cheap incremental checks so that junk is refused at once
            # and a slow client costs O(new bytes) per read.
            self.scan = max(pos, len(buf) - 3)
            size = len(buf) - pos
            if size == 0:
                return NEED_DATA
            if size > limits.max_head:
                raise HttpError(431)
            if not self.line_seen:
                line_end = buf.find(b"\r\n", old)
                if line_end >= 0:
                    if line_end - pos > limits.max_line:
                        raise HttpError(414)
                    self.line_seen = True
                elif size > limits.max_line:
                    raise HttpError(414)
            if _BARE_LF(buf, old):   # llhttp would reject it too; don't wait for a timeout
                raise HttpError(400, "bare LF")
            if old < pos + _METHOD_MAX:
                limit = min(len(buf), pos + _METHOD_MAX)
                mend = _METHOD_PREFIX(buf, pos, limit).end()
                if mend == pos + _METHOD_MAX or (mend < limit and buf[mend] != 32 and size > 1):
                    # not `token SP` (e.g. a TLS ClientHello); a lone CR may begin an empty line
                    raise HttpError(400, "not an HTTP request")
            return NEED_DATA
        buf = self._bytes()
        self.line_seen = False
        head_end = end + 4
        line_end = buf.find(b"\r\n", pos)
        if line_end - pos > limits.max_line:
            raise HttpError(414)
        if head_end - pos > limits.max_head:
            raise HttpError(431)
        line = buf[pos:line_end]
        if line.count(b" ") != 2:     # llhttp tolerates repeated SP; RFC 9112 3 says one
            raise HttpError(400, "bad request line")

        head, parser = self.head, self.parser
        head.reset()
        method = None
        upgraded = False
        view = buf if (pos == 0 and head_end == len(buf)) else memoryview(buf)[pos:head_end]
        try:
            parser.feed_data(view)
        except HttpParserUpgrade:
            upgraded = True
        except (HttpParserInvalidMethodError, HttpParserInvalidURLError):
            method, upgraded = self._reparse(line, buf[line_end:head_end])
            parser = self.parser
        except HttpParserError:
            raise HttpError(head.status, "malformed head") from None
        if not head.done:
            raise HttpError(400, "malformed head")
        self.pos = self.scan = head_end

        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            # 505 would fit HTTP/2.0, but the corpus rule is "4xx, never 5xx, for a request
            # we refuse", and llhttp only lets 0.9 and x.0 through here anyway
            raise HttpError(400, "unsupported HTTP version")
        if method is None:
            method = parser.get_method()
        target = head.url or b""
        if target[:1] != b"/" or method == b"CONNECT":
            _check_target(method, target)

        req = Request(method.decode("ascii"), target, version, head.headers)
        self._framing(req)
        if upgraded or not head.complete:
            # llhttp is mid-body, reading until EOF, or paused on an upgrade: start afresh
            self.parser = _new_parser(head)
        self.request = req
        if req.chunked:
            self.state, self.cstate = _S_CHUNKED, _CH_SIZE
            self.parts, self.have, self.ntrailers = [], 0, 0
            return HEAD
        if req.length:
            if req.length > limits.max_body:
                raise HttpError(413)
            self.state, self.remain = _S_LENGTH, req.length
            self.parts, self.have = [], 0
            return HEAD
        req.body = b""
        return COMPLETE

    def _reparse(self, line, rest):
        """llhttp refused the method or target: check the request line with our grammar, and if
        it holds, let llhttp parse the fields behind a neutral request line."""
        parts = line.split(b" ")
        if len(parts) != 3:
            raise HttpError(400, "bad request line")
        method, target, version = parts
        if not (_METHOD(method) and _TARGET_CHARS(target) and _VERSION(version)):
            raise HttpError(400, "bad request line")
        head = self.head
        head.reset()
        parser = self.parser = _new_parser(head)
        upgraded = False
        try:
            parser.feed_data(b"PUT / " + version + rest)
        except HttpParserUpgrade:
            upgraded = True
        except HttpParserError:
            raise HttpError(head.status, "malformed head") from None
        head.url = target
        return method, upgraded

    def _framing(self, req):
        """Body framing and connection semantics from the fields (RFC 9112 6, 9.3)."""
        cl = te = conn = None
        hosts = 0
        for name, value in req.headers:
            if len(name) not in _SPECIAL_LENS:
                continue
            kind = _SPECIAL.get(name.lower())
            if kind is None:
                continue
            if kind == 1:
                hosts += 1
            elif kind == 2:
                if value.lower() == b"100-continue":
                    req.expect_continue = True
            elif kind == 3:
                conn = value if conn is None else conn + b"," + value
            elif kind == 4:
                if cl is not None or not value.isdigit():   # llhttp checks too; belt and braces
                    raise HttpError(400, "bad Content-Length")
                cl = value
            else:
                te = value if te is None else te + b"," + value
        if hosts > 1:                         # RFC 9112 3.2: MUST respond 400
            raise HttpError(400, "several Host fields")
        http11 = req.version == "1.1"
        if conn is not None:
            tokens = [t.strip() for t in conn.lower().split(b",")]
            req.keep_alive = b"close" not in tokens and (http11 or b"keep-alive" in tokens)
        else:
            req.keep_alive = http11
        if te is not None:
            if not http11:                    # RFC 9112 6.1: chunked is HTTP/1.1 only (gunicorn)
                raise HttpError(400, "Transfer-Encoding in HTTP/1.0")
            codings = [c.strip() for c in te.lower().split(b",")]
            codings = [c for c in codings if c]
            if b"chunked" in codings:
                if codings.count(b"chunked") != 1 or codings[-1] != b"chunked":
                    raise HttpError(400, "chunked must be the final coding, once")
                if cl is not None:            # RFC 9112 6.1: request smuggling vector
                    raise HttpError(400, "Content-Length with Transfer-Encoding")
                req.chunked = True
            elif any(c != b"identity" for c in codings):
                raise HttpError(400, "Transfer-Encoding without chunked")   # RFC 9112 6.3
        if cl is not None and not req.chunked:
            req.length = int(cl)
        if req.method == "CONNECT":
            req.connect = True
            req.keep_alive = False
        if not (req.chunked or req.length) or not http11:   # RFC 9110 10.1.1: not to 1.0
            req.expect_continue = False

    # -- bodies ----------------------------------------------------------------------------
    def _finish(self):
        req = self.request
        parts = self.parts
        req.body = parts[0] if len(parts) == 1 else b"".join(parts)
        self.parts = None
        self.state = _S_HEAD
        return COMPLETE

    def _read_length(self):
        buf, pos = self._bytes(), self.pos
        avail = len(buf) - pos
        if avail <= 0:
            return NEED_DATA
        take = min(avail, self.remain)
        self.parts.append(buf[pos:pos + take])
        self.pos = self.scan = pos + take
        self.remain -= take
        if self.remain:
            return NEED_DATA
        return self._finish()

    def _read_chunked(self):
        buf, pos, limits = self._bytes(), self.pos, self.limits
        state = self.cstate
        try:
            while True:
                if state == _CH_DATA:
                    avail = len(buf) - pos
                    if avail <= 0:
                        return NEED_DATA
                    take = min(avail, self.remain)
                    self.parts.append(buf[pos:pos + take])
                    pos += take
                    self.remain -= take
                    if self.remain == 0:
                        state = _CH_DATA_END
                elif state == _CH_DATA_END:
                    if len(buf) - pos < 2:
                        return NEED_DATA
                    if not buf.startswith(b"\r\n", pos):
                        raise HttpError(400, "chunk data not followed by CRLF")
                    pos += 2
                    state = _CH_SIZE
                else:
                    eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
                    if eol < 0:
                        if len(buf) - pos >= _MAX_CHUNK_LINE:
                            raise HttpError(400, "chunk line too long")
                        if _BARE_LF(buf, pos):
                            raise HttpError(400, "bare LF in chunked framing")
                        return NEED_DATA
                    line = buf[pos:eol]
                    pos = eol + 2
                    if state == _CH_SIZE:
                        m = _CHUNK_LINE(line)
                        if m is None:
                            raise HttpError(400, "bad chunk size line")
                        size = int(m.group(1), 16)
                        if size == 0:
                            state = _CH_TRAILER
                            continue
                        self.have += size
                        if self.have > limits.max_body:
                            raise HttpError(413)
                        self.remain = size
                        state = _CH_DATA
                    else:
                        if not line:               # end of the trailer section
                            self.cstate = _CH_SIZE
                            return self._finish()
                        m = _FIELD_LINE(line)
                        if m is None:
                            raise HttpError(400, "bad trailer field")
                        if m.group(1).lower() in _FORBIDDEN_TRAILERS:
                            raise HttpError(400, "forbidden trailer field")
                        self.ntrailers += 1
                        if self.ntrailers > limits.max_fields or len(line) + 2 > limits.max_field_size:
                            raise HttpError(431)
        finally:
            self.pos = self.scan = pos
            self.cstate = state


def _check_target(method, target):
    """RFC 9112 3.2: origin-form for most, absolute-form for any, authority-form only for
    CONNECT, asterisk-form only for OPTIONS."""
    if method == b"CONNECT":
        ok = _AUTHORITY(target) is not None
    elif target[:1] == b"/":
        ok = True
    elif target == b"*":
        ok = method == b"OPTIONS"
    else:
        ok = _ABSOLUTE(target) is not None
    if not ok:
        raise HttpError(400, "request-target form not allowed")


def split_target(target):
    """Returns (path, query, authority) as bytes; authority is None for origin-form. The
    fragment, which clients should not send, is dropped."""
    authority = None
    if target[:1] != b"/":
        if target == b"*":
            return b"*", b"", None
        sep = target.find(b"://")
        if sep < 0:                        # authority-form (CONNECT)
            return b"", b"", target
        start = sep + 3
        end = len(target)
        for ch in (b"/", b"?", b"#"):
            i = target.find(ch, start)
            if 0 <= i < end:
                end = i
        authority = target[start:end]
        at = authority.rfind(b"@")
        if at >= 0:
            authority = authority[at + 1:]
        target = target[end:]
        if target[:1] != b"/":
            target = b"/" + target
    hash_ = target.find(b"#")
    if hash_ >= 0:
        target = target[:hash_]
    path, _, query = target.partition(b"?")
    return path, query, authority


def decode_path(path):
    """PEP 3333 PATH_INFO: percent-decoded bytes as latin-1 str."""
    if b"%" in path:
        path = unquote_to_bytes(path)
    return path.decode("latin-1")


# -- responses ---------------------------------------------------------------------------
MODE_NONE, MODE_LENGTH, MODE_CHUNKED, MODE_CLOSE = range(4)
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

_STATUS = re.compile(r"[1-9][0-9][0-9] [\t\x20-\x7e\x80-\xff]*").fullmatch
_TOKEN_STR = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE_STR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]").search
# hop-by-hop fields are the server's business (PEP 3333); Connection: close is honoured
_HOP = frozenset(("connection", "keep-alive", "transfer-encoding", "te", "trailer",
                  "upgrade", "proxy-connection"))
SERVER_LINE = "Server: pyfork\r\n"

_date_sec = -1
_date_line = ""


def date_line():
    """`Date: ...\\r\\n`, formatted at most once per second."""
    global _date_sec, _date_line
    now = int(time.time())
    if now != _date_sec:
        _date_line = "Date: " + formatdate(now, usegmt=True) + "\r\n"
        _date_sec = now
    return _date_line


# response header name -> its lower-case form, for names already validated; bounded
_NAMES = {}


def _check_name(name):
    if type(name) is not str or _TOKEN_STR(name) is None:
        raise ValueError(f"invalid header name {name!r}")
    lname = name.lower()
    if len(_NAMES) < 512:
        _NAMES[name] = lname
    return lname


def render_head(status, headers, http11, keep_alive, body_len, is_head):
    """Validate an application's status and headers; decide framing.

    body_len is the whole body's length when known (None otherwise). Returns
    (head bytes, mode, length, keep_alive, send_body); raises ValueError/TypeError on
    invalid input (the caller answers 500 instead)."""
    if type(status) is not str or _STATUS(status) is None:
        raise ValueError(f"invalid status {status!r}")
    code = int(status[:3])
    if code < 200:
        raise ValueError(f"WSGI applications cannot send an informational status {status!r}")
    parts = ["HTTP/1.1 ", status, "\r\n"]
    length = None
    have_date = have_server = False
    names = _NAMES
    for name, value in headers:
        if type(value) is not str or _BAD_VALUE_STR(value) is not None:
            raise ValueError(f"invalid header value {name!r}: {value!r}")
        lname = names.get(name)
        if lname is None:
            lname = _check_name(name)
        if lname in _HOP:
            if lname == "connection" and "close" in value.lower():
                keep_alive = False
            continue
        if lname == "content-length":
            value = value.strip()
            if length is not None or not value.isdigit():
                raise ValueError(f"invalid Content-Length {value!r}")
            length = int(value)
            continue
        if lname == "date":
            have_date = True
        elif lname == "server":
            have_server = True
        parts += (name, ": ", value, "\r\n")
    send_body = not is_head
    if code == 204 or code == 304:
        # RFC 9110 8.6: no Content-Length in 204; a 304 may repeat the GET's length
        mode, send_body = MODE_NONE, False
        if code == 304 and length is not None:
            parts += ("Content-Length: ", str(length), "\r\n")
        length = None
    elif length is not None or body_len is not None:
        mode = MODE_LENGTH
        if length is None:
            length = body_len
        parts += ("Content-Length: ", str(length), "\r\n")
    elif is_head:
        mode = MODE_NONE
    elif http11:
        mode = MODE_CHUNKED
        parts.append("Transfer-Encoding: chunked\r\n")
    else:
        mode = MODE_CLOSE                     # HTTP/1.0 without a length: close-delimited
        keep_alive = False
    if not have_date:
        parts.append(date_line())
    if not have_server:
        parts.append(SERVER_LINE)
    if not keep_alive:
        parts.append("Connection: close\r\n\r\n")
    elif not http11:
        parts.append("Connection: keep-alive\r\n\r\n")
    else:
        parts.append("\r\n")
    return "".join(parts).encode("latin-1"), mode, length, keep_alive, send_body


def chunk(data):
    """One chunk of a chunked response body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(status):
    """A tiny text response the server sends itself; always closes the connection."""
    reason = HTTPStatus(status).phrase
    body = f"{status} {reason}\n".encode("ascii")
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{date_line()}{SERVER_LINE}"
            "Connection: close\r\n\r\n").encode("latin-1") + body
