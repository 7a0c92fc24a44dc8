"""A listener served in the primary's loop through the dispatcher's watched fds.

Theory of operation. The control socket and the /metrics listener are both small servers
that must never block the primary: the listening socket and each client are watched fds of
the dispatcher (``disp.watch(fd, tag)``), so ``disp.run`` returns a watch event when one is
readable and the arbiter hands its tag here. This class owns the socket-serving part they
share: accepting until the kernel has nothing more (at most ``max_clients`` per wake-up),
errno triage on accept (a client that went away before we took it is skipped, anything else
is logged and left for the next wake-up), a tag per client from the owner's tag range,
watch/unwatch, one non-blocking read per readable event (the watch is level-triggered, so
what is left is read at the next one), dropping a client, and expiring idle ones.

What the bytes mean stays with the owner (``WatchedServer.on_data``): JSON lines for the
control socket, one HTTP GET for /metrics. The owner binds the listening socket (how is its
business) and hands it over: from then on this class closes it, and unlinks its Unix path.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Callable, Dict, Optional, Protocol

log = logging.getLogger("pyfork.watched")

# The pending client failed before we took it (libuv's uv__server_io skips ECONNABORTED;
# Linux's accept(2) also passes on a pending connection's protocol error as EPROTO): take the
# next one. Any other error is logged and retried at the next wake-up.
_ACCEPT_SKIP = (errno.ECONNABORTED, errno.EPROTO)


class Client:
    """One accepted client: its socket, its watch tag, a buffer for the owner's protocol,
    and when it last counted as active (``time.monotonic()``; the owner decides what
    refreshes it)."""
    __slots__ = ("tag", "sock", "buf", "seen")

    def __init__(self, tag: int, sock: socket.socket, now: float):
        self.tag = tag
        self.sock = sock
        self.buf = b""
        self.seen = now


class WatchedServer(Protocol):
    """What the owner of a WatchedListener supplies: its protocol."""

    def vet(self, sock: socket.socket) -> Optional[str]:
        """Why a freshly accepted client may not stay (e.g. a foreign uid), or None."""

    def refuse(self, sock: socket.socket, why: str) -> None:
        """Tells a refused client why if the protocol can, then closes ``sock``."""

    def on_data(self, client: Client, data: bytes) -> None:
        """Bytes from a client (never empty); may call ``drop(client.tag)``."""

    def on_drop(self, client: Client) -> None:
        """The client is being dropped: release what the owner keeps for it."""


class WatchedListener:
    """Serves one listening socket's clients through ``disp``'s watched fds.

    ``sock`` is a bound, listening, non-blocking socket, owned from here on (closed, even
    when this raises); ``path`` is its Unix path to unlink when it is closed, or None.
    ``tag`` is the listener's watch tag; clients get tags ``tag+1 .. tag+client_tags``,
    reused round-robin, so the owner's range must not overlap any other watcher's."""

    def __init__(self, name: str, sock: socket.socket, path: Optional[str], disp, server: WatchedServer,
                 *, tag: int, client_tags: int, max_clients: int, idle_timeout: float, recv_size: int):
        self.name = name
        self.sock = sock
        self.path = path
        self.disp = disp
        self.server = server
        self.tag = tag
        self.client_tags = client_tags
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.recv_size = recv_size
        self.clients: Dict[int, Client] = {}
        self._next = 0
        try:
            disp.watch(sock.fileno(), tag)
        except BaseException:
            self._close_listener()
            raise

    def owns(self, tag: int) -> bool:
        return self.tag <= tag <= self.tag + self.client_tags

    # ---- events from the loop ------------------------------------------------
    def on_readable(self, tag: int) -> None:
        if tag == self.tag:
            self._accept()
            return
        c = self.clients.get(tag)
        if c is None:
            return
        try:
            data = c.sock.recv(self.recv_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.drop(tag)
            return
        if not data:
            self.drop(tag)
            return
        self.server.on_data(c, data)

    def _accept(self) -> None:
        for _ in range(self.max_clients):
            try:
                s, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _ACCEPT_SKIP:
                    continue
                log.warning("%s: accept failed: %s", self.name, e)
                return
            s.setblocking(False)
            why = self.server.vet(s)
            if why is None and len(self.clients) >= self.max_clients:
                why = f"too many {self.name} clients"
            if why is None:
                tag = self._new_tag()
                try:
                    self.disp.watch(s.fileno(), tag)
                except OSError as e:
                    why = f"busy: {e}"
                else:
                    self.clients[tag] = Client(tag, s, time.monotonic())
                    continue
            self.server.refuse(s, why)

    def _new_tag(self) -> int:
        # At most max_clients tags are live, far fewer than the range: this ends at once.
        while True:
            tag = self.tag + 1 + self._next
            self._next = (self._next + 1) % self.client_tags
            if tag not in self.clients:
                return tag

    # ---- dropping -------------------------------------------------------------
    def drop(self, tag: int) -> None:
        c = self.clients.pop(tag, None)
        if c is None:
            return
        self.server.on_drop(c)
        try:
            self.disp.unwatch(c.sock.fileno())
        except (OSError, ValueError):
            pass
        c.sock.close()

    def expire(self, now: float, keep: Callable[[int], bool] = lambda tag: False) -> None:
        """Drops every client idle longer than idle_timeout, except those ``keep(tag)`` holds."""
        for tag, c in list(self.clients.items()):
            if now - c.seen > self.idle_timeout and not keep(tag):
                self.drop(tag)

    def close(self) -> None:
        """Drops every client, then stops watching, closes and unlinks the listener."""
        for tag in list(self.clients):
            self.drop(tag)
        try:
            self.disp.unwatch(self.sock.fileno())
        except (OSError, ValueError):
            pass
        self._close_listener()

    def _close_listener(self) -> None:
        self.sock.close()
        if self.path is not None:
            try:
                os.unlink(self.path)
            except OSError:
                pass
