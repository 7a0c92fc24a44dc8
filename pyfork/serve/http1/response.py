"""HTTP/1.1 response heads: validate what the application sends, decide the body framing.

Theory of operation. ``render_head`` turns a WSGI status and header list into the bytes of
a response head, refusing CR/LF injection and malformed names or statuses (the caller
answers 500 instead), dropping hop-by-hop fields that are the server's business (PEP 3333)
and choosing how the body is delimited: Content-Length when known, chunked for HTTP/1.1,
close-delimited for HTTP/1.0, none for HEAD/204/304. ``error_response`` is the tiny
response the server sends itself before closing. The Date line is formatted at most once
a second. Nothing here touches a socket.
"""

import re
import time
from http import HTTPStatus

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
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")     # time.gmtime's tm_wday order
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(t: int) -> str:
    """`t` (whole seconds, years 1-9999) as an IMF-fixdate (RFC 9110 5.6.7), "Sun, 06 Nov
    1994 08:49:37 GMT": what email.utils.formatdate(t, usegmt=True) gives, in English
    whatever the locale. Not that function, because email.utils brings email, datetime
    and calendar into every process (the demo over WSGI: primary RSS 20.0 -> 19.6 MB,
    worker RSS 17.4 -> 16.9 MB)."""
    y, mon, day, h, m, sec, wday = time.gmtime(t)[:7]
    return f"{_DAYS[wday]}, {day:02d} {_MONTHS[mon - 1]} {y:04d} {h:02d}:{m:02d}:{sec:02d} GMT"


def date_line():
    """`Date: ...\\r\\n`, formatted at most once per second."""
    global _date_sec, _date_line
    now = int(time.time())
    if now != _date_sec:
        _date_line = "Date: " + http_date(now) + "\r\n"
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
