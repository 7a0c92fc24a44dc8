"""The control socket: status and commands over a Unix socket, and its client.

Theory of operation. ``--control PATH`` makes the primary listen on a Unix
stream socket created with mode 0600 (umask set around bind, so there is no
window where it is wider). Every client's uid is checked with SO_PEERCRED: only
the primary's own uid (and root, who could ptrace it anyway) may talk. The
listener and every client are watched fds of the dispatcher, served by a
pyfork.primary.watched.WatchedListener, so the primary never blocks on a
client: reads and writes are non-blocking, a request line is at most MAX_LINE
bytes, at most MAX_CLIENTS are connected, an idle client is dropped after
IDLE_TIMEOUT, and a client that does not read its reply is dropped rather than
waited for.

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
from typing import Dict, Iterator, Optional

from pyfork.primary import lifecycle as P
from pyfork.primary.eventstream import JsonLinesSink
from pyfork.primary.watched import Client, WatchedListener

log = logging.getLogger("pyfork.control")

MAX_LINE = 4096        # a request is a few dozen bytes; anything longer is garbage
MAX_CLIENTS = 8        # concurrent clients (watched fds are a fixed-size table in the dispatcher)
IDLE_TIMEOUT = 10.0    # seconds a connected client may stay silent
TAG_CONTROL = 1        # the listener's watch tag; its clients take the CLIENT_TAGS after it
CLIENT_TAGS = 2 ** 31  # (pyfork.primary.metrics' tags are above these)
_UCRED = struct.Struct("3i")   # struct ucred: pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid


class ControlServer:
    """The control socket's protocol; serving its clients is a WatchedListener's job."""

    def __init__(self, path: str, arbiter):
        self.path = path
        self.arb = arbiter
        self.sinks: Dict[int, JsonLinesSink] = {}     # by tag: the clients that asked for events
        self.listener = WatchedListener("control", self._listen(path), path, arbiter.disp, self,
                                        tag=TAG_CONTROL, client_tags=CLIENT_TAGS, max_clients=MAX_CLIENTS,
                                        idle_timeout=IDLE_TIMEOUT, recv_size=MAX_LINE + 1)

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
        self.listener.on_readable(tag)

    # ---- WatchedServer: what the listener asks of the protocol ----------------
    def vet(self, sock: socket.socket) -> Optional[str]:
        try:
            uid = peer_uid(sock)
        except OSError:
            uid = -1
        if uid in (os.geteuid(), 0):
            return None
        log.warning("control: refused a client with uid %d", uid)
        return f"permission denied for uid {uid}"

    def refuse(self, sock: socket.socket, why: str) -> None:
        try:
            sock.send((json.dumps({"ok": False, "error": why}) + "\n").encode())
        except OSError:
            pass
        sock.close()

    def on_data(self, c: Client, data: bytes) -> None:
        c.buf += data
        c.seen = time.monotonic()        # a client that talks is not idle
        while b"\n" in c.buf:
            line, c.buf = c.buf.split(b"\n", 1)
            if c.tag in self.sinks:
                continue          # a subscriber only listens
            reply = self.execute(line)
            if not self._send(c, reply):
                return
            if reply.get("events"):
                self._subscribe(c)
        if len(c.buf) > MAX_LINE:
            self._send(c, {"ok": False, "error": f"request line longer than {MAX_LINE} bytes"})
            self.listener.drop(c.tag)

    def on_drop(self, c: Client) -> None:
        sink = self.sinks.pop(c.tag, None)
        if sink is not None:
            self.arb.events.remove_sink(sink)
            sink.close()

    def _send(self, c: Client, obj) -> bool:
        data = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
        try:
            n = c.sock.send(data)
        except OSError:
            n = -1
        if n != len(data):
            log.warning("control: client does not take its reply; dropping it")
            self.listener.drop(c.tag)
            return False
        return True

    def _subscribe(self, c: Client) -> None:
        # The sink writes to its own copy of the fd, so closing either never closes the other.
        sink = JsonLinesSink(os.dup(c.sock.fileno()))
        self.sinks[c.tag] = sink
        self.arb.events.add_sink(sink)

    def expire(self, now: float) -> None:
        for tag, sink in list(self.sinks.items()):
            if sink.closed:
                self.listener.drop(tag)           # its reader went away
        self.listener.expire(now, keep=self.sinks.__contains__)   # a subscriber is never idle

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
    def close(self) -> None:
        self.listener.close()


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
