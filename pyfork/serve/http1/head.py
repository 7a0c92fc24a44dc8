"""HTTP/1.1 request heads: the conformance rules llhttp lacks, and what the fields mean.

Theory of operation. pyfork.serve.http1.RequestReader cuts a head out of the byte stream
and feeds it to llhttp (httptools) through ``RequestHead``, whose callbacks collect the target
and the fields and enforce the field count/size limits as fields complete. What llhttp
accepts but the conformance corpus (gunicorn's parser vectors) refuses is checked here,
after llhttp: the request-target form allowed for the method (``check_target``), our own
request-line grammar for the heads llhttp refuses but gunicorn serves
(``check_request_line``), and ``framing``: Host count, Connection, Content-Length versus
Transfer-Encoding (the request-smuggling combinations), chunked only in HTTP/1.1 and only
as the final coding, Expect: 100-continue. ``split_target``/``decode_path`` turn a
request-target into PEP 3333's PATH_INFO, QUERY_STRING and the authority.

Every check raises ``HttpError(status)``; the server answers with a tiny response and
closes. Nothing here touches a socket.
"""

import re
from urllib.parse import unquote_to_bytes

import httptools


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


# RFC 9110 5.6.2 token; methods additionally exclude lower case (gunicorn: `-bl` is rejected,
# `-BLARGH` accepted) since every registered method is upper case.
TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_METHOD = re.compile(rb"[!$%&'*+\-.^_`|~0-9A-Z]+").fullmatch
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

# header names we must look at, by length first so most names cost one len() and a set probe
_SPECIAL = {b"host": 1, b"expect": 2, b"connection": 3, b"content-length": 4,
            b"transfer-encoding": 5}
_SPECIAL_LENS = frozenset(len(k) for k in _SPECIAL)


class RequestHead:
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


def new_parser(head):
    parser = httptools.HttpRequestParser(head)
    # Let llhttp accept Transfer-Encoding together with Content-Length: we decide framing
    # ourselves and reject the smuggling combinations (TE chunked + CL) below, but accept
    # `Transfer-Encoding: identity` + Content-Length as gunicorn does.
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    return parser


def check_request_line(line):
    """Our request-line grammar, for a line llhttp refused (method outside its table, raw
    obs-text in the target): `method SP target SP HTTP/x.y`. Returns the three parts."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "bad request line")
    method, target, version = parts
    if not (_METHOD(method) and _TARGET_CHARS(target) and _VERSION(version)):
        raise HttpError(400, "bad request line")
    return method, target, version


def framing(req):
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


def check_target(method, target):
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
