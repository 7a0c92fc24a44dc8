"""The control socket: status and commands over a Unix socket, and its client.

Theory of operation. ``--control PATH`` makes the primary listen on a Unix
stream socket created with mode 0600 (umask set around bind, so there is no
window where it is wider). Every client's uid is checked with SO_PEERCRED: only
the primary's own uid (and root, who could ptrace it anyway) may talk. The
listener and every client are watched fds of the dispatcher, so the primary
never blocks on a client: reads and writes are non-blocking, a request line is
at most MAX_LINE bytes, at most MAX_CLIENTS are connected, an idle client is
dropped after IDLE_TIMEOUT, and a client that does not read its reply is
dropped rather than waited for.

Protocol: one JSON object per line, one JSON reply per line.
  {"cmd": "status"}                -> {"ok": true, "workers": [...], ...}
  {"cmd": "reload"}                -> {"ok": true}        (same as SIGHUP)
  {"cmd": "scale", "n": 3}         -> {"ok": true}        (1..max workers)
  {"cmd": "stop", "graceful": true}-> {"ok": true}        (same as SIGTERM)
  {"cmd": "events"}                -> {"ok": true, <status>}, then one JSON line per event
                                      (pyfork.primary.eventstream; README "Events") until
                                      either side closes
Anything else gets {"ok": false, "error": "..."} and changes nothing.
An events subscriber is never waited for: its lines queue in a bounded buffer and
what does not fit is dropped and counted (a {"kind": "dropped"} line says how many).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import struct
import time
from typing import Iterator

from pyfork.primary import lifecycle as P
from pyfork.primary.eventstream import JsonLinesSink

log = logging.getLogger("pyfork.control")

MAX_LINE = 4096        # a request is a few dozen bytes; anything longer is garbage
MAX_CLIENTS = 8        # concurrent clients (watched fds are a fixed-size table in the dispatcher)
IDLE_TIMEOUT = 10.0    # seconds a connected client may stay silent
TAG_CONTROL = 1
FIRST_CLIENT_TAG = 2
_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


class _Client:
    __slots__ = ("sock", "buf", "seen", "sink")

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.seen = time.monotonic()
        self.sink = None          # a JsonLinesSink once it asked for events


class ControlServer:
    def __init__(self, path: str, arbiter):
        self.path = path
        self.arb = arbiter
        self.clients = {}
        self._next_tag = FIRST_CLIENT_TAG
        self.sock = self._listen(path)
        try:
            arbiter.disp.watch(self.sock.fileno(), TAG_CONTROL)
        except BaseException:
            self._close_listener()
            raise

    @staticmethod
    def _listen(path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)    # stale socket from a primary that died
            else:
                raise OSError(errno.EADDRINUSE, f"another primary is listening on {path}")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        except BaseException:
            s.close()
            raise
        finally:
            os.umask(old)
        try:
            os.chmod(path, 0o600)
            s.listen(MAX_CLIENTS)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    # ---- events from the loop ------------------------------------------------
    def on_readable(self, tag: int) -> None:
        if tag == TAG_CONTROL:
            self._accept()
        else:
            c = self.clients.get(tag)
            if c is not None:
                self._read(tag, c)

    def _accept(self) -> None:
        for _ in range(MAX_CLIENTS):
            try:
                s, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("control: accept failed: %s", e)
                return
            s.setblocking(False)
            try:
                uid = peer_uid(s)
            except OSError:
                uid = -1
            if uid not in (os.geteuid(), 0):
                log.warning("control: refused a client with uid %d", uid)
                self._reply_and_close(s, {"ok": False, "error": f"permission denied for uid {uid}"})
                continue
            if len(self.clients) >= MAX_CLIENTS:
                self._reply_and_close(s, {"ok": False, "error": "too many control clients"})
                continue
            tag = self._next_tag
            self._next_tag = FIRST_CLIENT_TAG + (self._next_tag - FIRST_CLIENT_TAG + 1) % (2 ** 31)
            try:
                self.arb.disp.watch(s.fileno(), tag)
            except OSError as e:
                self._reply_and_close(s, {"ok": False, "error": f"busy: {e}"})
                continue
            self.clients[tag] = _Client(s)

    def _read(self, tag: int, c: _Client) -> None:
        while True:
            try:
                data = c.sock.recv(MAX_LINE + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(tag)
                return
            if not data:
                self._drop(tag)
                return
            c.buf += data
            c.seen = time.monotonic()
            while b"\n" in c.buf:
                line, c.buf = c.buf.split(b"\n", 1)
                if c.sink is not None:
                    continue          # a subscriber only listens
                reply = self.execute(line)
                if not self._send(tag, c, reply):
                    return
                if reply.get("events"):
                    self._subscribe(c)
            if len(c.buf) > MAX_LINE:
                self._send(tag, c, {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
                self._drop(tag)
                return

    def _send(self, tag: int, c: _Client, obj) -> bool:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        try:
            n = c.sock.send(data)
        except OSError:
            n = -1
        if n != len(data):
            log.warning("control: client does not take its reply; dropping it")
            self._drop(tag)
            return False
        return True

    @staticmethod
    def _reply_and_close(s: socket.socket, obj) -> None:
        try:
            s.send((json.dumps(obj) + "\n").encode())
        except OSError:
            pass
        s.close()

    def _subscribe(self, c: _Client) -> None:
        # The sink writes to its own copy of the fd, so closing either never closes the other.
        c.sink = JsonLinesSink(os.dup(c.sock.fileno()))
        self.arb.events.add_sink(c.sink)

    def _drop(self, tag: int) -> None:
        c = self.clients.pop(tag, None)
        if c is None:
            return
        if c.sink is not None:
            self.arb.events.remove_sink(c.sink)
            c.sink.close()
        try:
            self.arb.disp.unwatch(c.sock.fileno())
        except (OSError, ValueError):
            pass
        c.sock.close()

    def expire(self, now: float) -> None:
        for tag, c in list(self.clients.items()):
            if c.sink is not None and c.sink.closed:
                self._drop(tag)           # its reader went away
            elif c.sink is None and now - c.seen > IDLE_TIMEOUT:
                self._drop(tag)

    # ---- commands --------------------------------------------------------------
    def execute(self, line: bytes) -> dict:
        """One request line -> reply. Never raises; garbage changes nothing."""
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return {"ok": False, "error": "request is not JSON"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'expected an object like {"cmd": "status"}'}
        cmd = req["cmd"]
        arb = self.arb
        if cmd == "status":
            return {"ok": True, **arb.status()}
        if cmd == "reload":
            arb.request(P.Reload())
            return {"ok": True}
        if cmd == "scale":
            n = req.get("n")
            top = arb.policy.max_workers if arb.policy else 1
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
                return {"ok": False, "error": f"scale needs an integer n in 1..{top}"}
            arb.request(P.Scale(n))
            return {"ok": True}
        if cmd == "stop":
            graceful = req.get("graceful", True)
            if not isinstance(graceful, bool):
                return {"ok": False, "error": "graceful must be true or false"}
            arb.request(P.Stop(graceful=graceful))
            return {"ok": True}
        if cmd == "events":
            return {"ok": True, "events": True, **arb.status()}
        return {"ok": False, "error": f"unknown command {cmd[:40]!r}; expected status, reload, scale, stop or events"}

    # ---- teardown ------------------------------------------------------------
    def _close_listener(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def close(self) -> None:
        for tag in list(self.clients):
            self._drop(tag)
        try:
            self.arb.disp.unwatch(self.sock.fileno())
        except (OSError, ValueError):
            pass
        self._close_listener()


# ---- client side (pyfork status) ----------------------------------------------------
def request(path: str, obj: dict, timeout: float = 5.0) -> dict:
    """Sends one request to a control socket and returns the reply (OSError / ValueError on failure)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall((json.dumps(obj) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > 64 * 1024 * 1024:
                raise ValueError("reply too large")
    line = buf.split(b"\n", 1)[0]
    if not line:
        raise ValueError("no reply")
    return json.loads(line)


def follow_events(path: str, timeout: float = 5.0) -> Iterator[dict]:
    """Subscribes to a primary's events: yields the reply (its status), then each event
    record until the primary closes the connection. ``timeout`` is for connecting and
    the reply; after that it waits for events as long as the caller iterates."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(b'{"cmd": "events"}\n')
        buf = b""
        first = True
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                rec = json.loads(line)
                if first:
                    first = False
                    if not rec.get("ok"):
                        raise ValueError(rec.get("error") or "events refused")
                    s.settimeout(None)
                yield rec
            chunk = s.recv(65536)
            if not chunk:
                return
            buf += chunk
