"""The application side of a WSGI (PEP 3333) request: environ, start_response, the body.

Theory of operation. pyfork.serve.wsgi.Server owns the sockets and the loop; for each
complete request it runs ``respond(server, conn, req)``, a generator that builds the
environ, calls the application and turns what it returns into framed bytes handed to
``server.send``. It yields only when the connection's output queue is above HIGH_WATER
(or a sendfile() would block), and the loop resumes it when the socket is writable, so a
streaming body never blocks other connections. The common case -- a list body -- becomes
one head-plus-body bytes object and one send(). ``_Response`` holds start_response() and
write() state and the framing decided by http1.render_head; wsgi.file_wrapper bodies on
regular files go out with os.sendfile(). An exception in the application becomes a 500
when no head was sent yet, and a closed connection otherwise (only closing can tell the
client the body is cut short).

Header names become environ keys through a bounded cache; a name with an underscore is
dropped (gunicorn's and nginx's default) so a client cannot spoof another field.
"""

import errno
import io
import os
import socket
import stat
import sys
import time

from . import accesslog, inflight
from .http1 import (MODE_CHUNKED, MODE_LENGTH, chunk, decode_path, error_response, render_head,
                    split_target)

HIGH_WATER = 256 * 1024          # pause a streaming body when this much output is queued
SENDFILE_MAX = 1 << 20           # per sendfile() call, so one big file cannot hog the loop


class FileWrapper:
    """wsgi.file_wrapper: iterates in blocks, and lets the server use sendfile() when
    `filelike` is a regular file with a fileno()."""

    def __init__(self, filelike, blksize=65536):
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read, size = self.filelike.read, self.blksize
        while True:
            data = read(size)
            if not data:
                return
            yield data


class _Response:
    """start_response()/write() state of one request."""

    __slots__ = ("server", "conn", "req", "status", "headers", "head_sent", "mode", "remaining",
                 "keep_alive", "send_body", "sent")

    def __init__(self, server, conn, req):
        self.server = server
        self.conn = conn
        self.req = req
        self.status = None
        self.headers = None
        self.head_sent = False
        self.mode = 0
        self.remaining = 0
        self.keep_alive = req.keep_alive
        self.send_body = True
        self.sent = 0                   # body bytes sent (the access log's B/b)

    def start_response(self, status, headers, exc_info=None):
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        if type(status) is not str:
            raise TypeError(f"status must be str, not {type(status).__name__}")
        if type(headers) is not list:
            raise TypeError(f"headers must be a list, not {type(headers).__name__}")
        self.status = status
        self.headers = headers
        return self.write

    def head(self, body_len):
        """Render the head; the caller sends it (with the first body bytes)."""
        if self.status is None:
            raise AssertionError("the application returned without calling start_response()")
        server = self.server
        req = self.req
        head, self.mode, length, keep_alive, self.send_body = render_head(
            self.status, self.headers, req.version == "1.1",
            # Draining: the last response closes; one with pipelined requests behind it does not.
            self.keep_alive and (not server.rt.draining or self.conn.reader.pending > 0),
            body_len, req.method == "HEAD")
        self.keep_alive = keep_alive
        self.remaining = length if length is not None else 0
        self.head_sent = True
        return head

    def frame(self, data):
        """Body bytes as they go on the wire (may be empty); head first if not yet sent."""
        prefix = b"" if self.head_sent else self.head(None)
        if not self.send_body:
            return prefix
        mode = self.mode
        if mode == MODE_LENGTH:
            if len(data) > self.remaining:         # never send more than we announced
                data = data[:self.remaining]
            self.remaining -= len(data)
        elif mode == MODE_CHUNKED:
            self.sent += len(data)
            data = chunk(data)
            return prefix + data if prefix else data
        self.sent += len(data)
        return prefix + data if prefix else data

    def write(self, data):
        """PEP 3333 write(): sends at once, blocking on this one socket if needed."""
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if type(data) is not bytes:
            data = bytes(data)
        if not data:
            return
        conn = self.conn
        if conn.dead:
            raise ConnectionError("client disconnected")
        self.server.send(conn, self.frame(data))
        self.server.flush_blocking(conn)

    def finish(self):
        """After the body: terminate the framing; decide whether the connection lives on."""
        server = self.server
        conn = self.conn
        if not self.head_sent:
            server.send(conn, self.head(0))
        elif self.send_body:
            if self.mode == MODE_CHUNKED:
                server.send(conn, b"0\r\n\r\n")
            elif self.mode == MODE_LENGTH and self.remaining:
                self.keep_alive = False        # short body: only a close tells the client
        if not self.keep_alive:
            conn.closing = True


def base_environ():
    """The part of the environ that is the same for every request of this worker."""
    return {
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper, "wsgi.input_terminated": True,
        "SCRIPT_NAME": "",
    }


def conn_environ(base_env, sock):
    """The part of the environ that is the same for every request on `sock`."""
    env = base_env.copy()
    try:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            local = sock.getsockname()
            peer = sock.getpeername()
            env["SERVER_NAME"] = local[0]
            env["SERVER_PORT"] = str(local[1])
            env["REMOTE_ADDR"] = peer[0]
            env["REMOTE_PORT"] = str(peer[1])
        else:
            env["SERVER_NAME"] = "localhost"
            env["SERVER_PORT"] = "0"
            env["REMOTE_ADDR"] = ""
    except OSError:                         # peer already gone; the read will tell
        env["SERVER_NAME"] = "localhost"
        env["SERVER_PORT"] = "0"
        env["REMOTE_ADDR"] = ""
    return env


def request_environ(conn_env, req):
    """The environ of one request: `conn_env` plus the request line, fields and body."""
    env = conn_env.copy()
    target = req.target
    path, query, authority = split_target(target)
    env["REQUEST_METHOD"] = req.method
    env["PATH_INFO"] = decode_path(path)
    env["QUERY_STRING"] = query.decode("latin-1")
    env["RAW_URI"] = target.decode("latin-1")
    env["SERVER_PROTOCOL"] = "HTTP/1.1" if req.version == "1.1" else "HTTP/1.0"
    keys = _KEYS
    for name, value in req.headers:
        key = keys.get(name)
        if key is None:
            key = _env_key(name)
        if not key:
            continue                        # underscores: see _env_key
        value = value.decode("latin-1")
        if key in env:
            sep = "; " if key == "HTTP_COOKIE" else ","
            env[key] = env[key] + sep + value
        else:
            env[key] = value
    if authority is not None and authority:
        env["HTTP_HOST"] = authority.decode("latin-1")   # RFC 9112 3.2.2: target wins
    body = req.body
    if req.chunked:
        env.pop("HTTP_TRANSFER_ENCODING", None)          # the app sees a plain body
        env["CONTENT_LENGTH"] = str(len(body))
    env["wsgi.input"] = io.BytesIO(body)
    return env


def respond(server, conn, req):
    """Run the application for one request; a generator that yields while the socket
    cannot take more output. `server` is the wsgi.Server that owns `conn`."""
    rt = server.rt
    rt.request_started()
    inflight.current[0] = req                   # for the hung-worker report (SIGABRT)
    access = server.access
    t0 = time.time() if access is not None else 0.0
    resp = _Response(server, conn, req)
    result = None
    try:
        try:
            env = request_environ(conn.env, req)
            result = server.app(env, resp.start_response)
            if type(result) is list or type(result) is tuple:
                if not resp.head_sent:      # the whole body is known: one send
                    body = b"".join(result)
                    head = resp.head(len(body))
                    if resp.send_body and (resp.mode == MODE_LENGTH):
                        if len(body) > resp.remaining:
                            body = body[:resp.remaining]
                        resp.remaining -= len(body)
                        resp.sent = len(body)
                        server.send_response(conn, head + body, resp.keep_alive)
                    else:
                        server.send_response(conn, head, resp.keep_alive)
                else:
                    for data in result:
                        server.send(conn, resp.frame(_as_bytes(data)))
            elif (type(result) is FileWrapper and not resp.head_sent and not conn.tls
                  and req.method != "HEAD" and _regular_fd(result.filelike) is not None):
                yield from _sendfile(server, conn, resp, result.filelike)
            else:
                for data in result:
                    if data:
                        server.send(conn, resp.frame(_as_bytes(data)))
                        if conn.dead:
                            break
                        if conn.out_len > HIGH_WATER:
                            yield
                            if conn.dead:
                                break
                    if not resp.send_body and resp.head_sent:
                        break                   # HEAD: the headers were all we needed
            if not conn.dead:
                resp.finish()
        except Exception:
            server.log.exception("error in WSGI application (%s %s)",
                             req.method, req.target.decode("latin-1")[:200])
            if not resp.head_sent and not conn.dead:
                server.send(conn, error_response(500))
                conn.closing = True
                resp.status = "500 Internal Server Error"
                resp.headers = None
            else:
                conn.dead = True               # mid-body: only closing can tell the client
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    server.log.exception("error closing the WSGI response iterable")
    finally:
        rt.request_finished()
        if access is not None:
            _log_access(server, access, conn, req, resp, t0)


def _log_access(server, access, conn, req, resp, t0):
    """One access-log line for a request whose response has been queued (never raises)."""
    try:
        r = accesslog.Record()
        r.remote = conn.env.get("REMOTE_ADDR") or "-"
        r.method = req.method
        path, query, _ = split_target(req.target)
        r.path = path.decode("latin-1")
        r.query = query.decode("latin-1")
        r.protocol = "HTTP/1.1" if req.version == "1.1" else "HTTP/1.0"
        status = resp.status
        r.status = int(status[:3]) if status else 500
        r.length = resp.sent
        r.req_headers = req.headers
        r.resp_headers = resp.headers
        r.start = t0
        r.duration = time.time() - t0
        r.environ = conn.env if access.wants_environ else None
        access.log(r)
    except Exception:
        server.log.exception("access log line failed")


def _sendfile(server, conn, resp, filelike):
    """wsgi.file_wrapper on a regular file: the body goes out with os.sendfile()."""
    fd = filelike.fileno()
    try:
        offset = filelike.tell()
    except (AttributeError, OSError):
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    size = max(0, os.fstat(fd).st_size - offset)
    server.send(conn, resp.head(size))
    count = resp.remaining if resp.mode == MODE_LENGTH else 0
    if count > size:
        resp.keep_alive = False           # app announced more than the file holds
    while count > 0 and not conn.dead:
        if conn.out:
            yield                          # the head (or earlier bytes) first
            continue
        try:
            sent = os.sendfile(conn.fd, fd, offset, min(count, SENDFILE_MAX))
        except (BlockingIOError, InterruptedError):
            yield
            continue
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS):
                raise
            conn.dead = True
            break
        if sent == 0:                      # file shrank under us
            break
        offset += sent
        count -= sent
        resp.remaining -= sent
        resp.sent += sent
        conn.deadline = time.monotonic() + server.limits.request_timeout
    try:
        filelike.seek(offset)
    except (AttributeError, OSError):
        pass


def _as_bytes(data):
    if type(data) is bytes:
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"WSGI body items must be bytes, not {type(data).__name__}")


def _regular_fd(filelike):
    try:
        fd = filelike.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    return None


# header name (raw bytes) -> environ key; "" means "not passed to the app". Bounded, so that
# random names from clients cannot grow it without limit.
_KEYS = {}
_KEYS_MAX = 1024


def _env_key(name):
    lname = name.lower()
    if b"_" in name:
        # `Transfer_Encoding` would become HTTP_TRANSFER_ENCODING: dropped, like gunicorn's
        # default header_map=drop and nginx, so a client cannot spoof another field.
        key = ""
    elif lname == b"content-type":
        key = "CONTENT_TYPE"
    elif lname == b"content-length":
        key = "CONTENT_LENGTH"
    else:
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
    if len(_KEYS) < _KEYS_MAX:
        _KEYS[name] = key
    return key
