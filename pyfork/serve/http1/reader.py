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

Layout: this module holds Limits and the reader (finding heads, feeding llhttp, Content-Length
and chunked bodies); the head checks and field semantics are in head.py, the response side
in response.py (see the package docstring).
"""

import os
import re

from httptools.parser.errors import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserInvalidURLError,
    HttpParserUpgrade,
)

from .head import (
    TCHAR, HttpError, Request, RequestHead, check_request_line, check_target, framing, new_parser,
)

__all__ = ["Limits", "RequestReader", "NEED_DATA", "HEAD", "COMPLETE"]


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


NEED_DATA = "need-data"
HEAD = "head"            # head parsed, body still to come (caller may send 100 / 503 now)
COMPLETE = "complete"    # reader.request is complete (body included)

_S_HEAD, _S_LENGTH, _S_CHUNKED, _S_ERROR = range(4)
_CH_SIZE, _CH_DATA, _CH_DATA_END, _CH_TRAILER = range(4)

# incremental checks of an incomplete head: it must start with `token SP`
_METHOD_PREFIX = re.compile(rb"[" + TCHAR + rb"]*").match
_METHOD_MAX = 64   # longest registered method is 17 bytes; a longer token is not HTTP

# RFC 9112 7.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS val ] )
_QSTRING = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})(?:[ \t]*;[ \t]*[" + TCHAR + rb"]+(?:[ \t]*=[ \t]*(?:[" + TCHAR +
    rb"]+|" + _QSTRING + rb"))?)*").fullmatch
_FIELD_LINE = re.compile(rb"([" + TCHAR + rb"]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)").fullmatch
_BARE_LF = re.compile(rb"(?<!\r)\n").search
_MAX_CHUNK_LINE = 4096   # size line incl. extensions; nginx/gunicorn use a few KiB

# RFC 9110 6.5.1: fields that must not appear in trailers (framing, routing, auth, controls)
_FORBIDDEN_TRAILERS = frozenset((
    b"content-length", b"transfer-encoding", b"host", b"trailer", b"te", b"connection",
    b"keep-alive", b"upgrade", b"expect", b"range", b"max-forwards", b"authorization",
    b"proxy-authorization", b"cookie", b"content-encoding", b"content-range",
))


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
        self.head = RequestHead(limits)
        self.parser = new_parser(self.head)
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
            check_target(method, target)

        req = Request(method.decode("ascii"), target, version, head.headers)
        framing(req)
        if upgraded or not head.complete:
            # llhttp is mid-body, reading until EOF, or paused on an upgrade: start afresh
            self.parser = new_parser(head)
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
        method, target, version = check_request_line(line)
        head = self.head
        head.reset()
        parser = self.parser = new_parser(head)
        upgraded = False
        try:
            parser.feed_data(b"PUT / " + version + rest)
        except HttpParserUpgrade:
            upgraded = True
        except HttpParserError:
            raise HttpError(head.status, "malformed head") from None
        head.url = target
        return method, upgraded

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
