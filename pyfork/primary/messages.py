"""Messages between the primary and its workers, and the user's handle on a worker.

Theory of operation. After fork a worker's channel carries, besides connections, small
messages (pyfork.backend: MSG_READY, MSG_USER with a JSON payload, MSG_CTL with a JSON
object). When the dispatcher reports a channel readable, the arbiter hands the worker to
``WorkerChannels.read``, which reads at most MAX_MSGS_PER_EVENT of them (fairness between
workers) and turns each into a lifecycle event (READY, recycle, drain request), given to
the ``feed`` callable, or a stream event (``message``, ``online``, ``bad_message``),
given to the EventStream (pyfork.primary.eventstream). The other way, ``send`` puts a
JSON value on a worker's channel without ever blocking the loop: a full channel drops
the message and says so.

Everything this needs is given to it explicitly: the backend (message framing), the
event stream and the lifecycle's ``feed``; the arbiter owns the worker table and passes
the worker a message concerns.

A ``WorkerHandle`` is the user's object for one worker (``cluster.workers``, the
event callbacks' argument); ``send`` goes through the callable it was built with.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import time
from typing import Callable, Optional

from pyfork.primary import lifecycle as P

log = logging.getLogger("pyfork.arbiter")   # the primary's log, wherever the line comes from

_HDR = struct.Struct("<IHHII")           # pf_msg_hdr (csrc/pyfork.h): magic, type, nfds, len, arg
MAX_MSGS_PER_EVENT = 256                 # fairness: messages read from one channel per wakeup


class WorkerHandle:
    """The primary's view of one worker (what cluster.workers holds)."""

    def __init__(self, wid: int, slot: int, send: Callable[[int, object], bool]):
        self.id = wid
        self.slot = slot
        self.pid: Optional[int] = None
        self.state = P.SPAWNING
        self.started = time.monotonic()
        self.disconnected = False        # the 'disconnect' event was emitted (once per worker)
        self._send = send

    def send(self, obj) -> bool:
        """Sends a JSON value to the worker. Returns False (and logs) when it cannot
        be delivered now (channel full, worker gone); ValueError when not JSON or too large."""
        return self._send(self.id, obj)

    def __repr__(self) -> str:
        return f"<WorkerHandle id={self.id} pid={self.pid} slot={self.slot} state={self.state}>"


class WorkerChannels:
    """Reads and writes the message side of worker channels (see the module docstring)."""

    def __init__(self, backend, events, feed: Callable[[object], None]):
        self.backend = backend
        self.events = events        # pyfork.primary.eventstream.EventStream
        self.feed = feed            # gives a lifecycle event to the arbiter's Lifecycle

    def read(self, wid: int, chan: int, handle: WorkerHandle) -> bool:
        """Reads what worker ``wid`` sent on ``chan``. Returns True when the channel hung
        up (the worker is exiting: reap soon)."""
        b = self.backend
        peek = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, chan)
        try:
            return self._read(wid, chan, handle, peek)
        finally:
            peek.detach()           # the channel is the dispatcher's

    def _read(self, wid: int, chan: int, handle: WorkerHandle, peek) -> bool:
        b = self.backend
        for _ in range(MAX_MSGS_PER_EVENT):
            # MSG_PARK carries connections the dispatcher parks itself (csrc/park.c): leave
            # it in the channel for the dispatcher's loop, which reports what follows it.
            try:
                head = peek.recv(_HDR.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                head = b""          # recv_msg below says what it is
            if len(head) == _HDR.size and _HDR.unpack(head)[1] == b.MSG_PARK:
                return False
            try:
                msg = b.recv_msg(chan, 0)
            except (BlockingIOError, InterruptedError):
                return False
            except BrokenPipeError:
                return True
            except OSError as e:
                log.warning("worker %d: dropped a malformed message: %s", wid, e)
                self.events.emit("bad_message", handle, reason="malformed", error=str(e))
                continue
            for fd in msg.fds:
                os.close(fd)
            try:
                self._dispatch(wid, handle, msg)
            except Exception:
                log.exception("worker %d: error handling a message of type %d", wid, msg.type)
        return False

    def _bad(self, handle: WorkerHandle, reason: str, text: str) -> None:
        log.warning("worker %d: %s", handle.id, text)
        self.events.emit("bad_message", handle, reason=reason)

    def _dispatch(self, wid: int, handle: WorkerHandle, msg) -> None:
        b = self.backend
        if msg.type == b.MSG_READY:
            self.feed(P.Ready(wid))
        elif msg.type == b.MSG_USER:
            try:
                obj = json.loads(msg.payload)
            except ValueError:
                self._bad(handle, "not_json", f"dropped a message that is not JSON ({len(msg.payload)} bytes)")
                return
            self.events.emit("message", handle, message=obj)
        elif msg.type == b.MSG_CTL:
            try:
                obj = json.loads(msg.payload)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                self._bad(handle, "bad_control", "dropped a malformed control message")
            elif obj.get("online"):
                self.events.emit("online", handle)
            elif "recycle" in obj:
                self.feed(P.RecycleRequested(wid))
            elif obj.get("drain"):
                self.feed(P.Leaving(wid))
            elif "rejected" in obj:
                self._on_rejected(handle, obj["rejected"])
            else:
                self._bad(handle, "unknown_control", f"unknown control message {obj!r:.80}")
        else:
            self._bad(handle, "unexpected_type", f"dropped a message of unexpected type {msg.type}")

    def _on_rejected(self, handle: WorkerHandle, count) -> None:
        """--limit-concurrency: the worker answered ``count`` requests with 503 since its
        last tick (it reports at most once a second, so one log line per second at most)."""
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            self._bad(handle, "bad_control", f"dropped a malformed rejection count {count!r:.40}")
            return
        log.warning("worker %d: --limit-concurrency reached: %d request(s) answered 503", handle.id, count)
        self.events.emit("limit_rejected", handle, count=count)

    def send(self, wid: int, chan: Optional[int], obj) -> bool:
        """Puts ``obj`` (JSON) on worker ``wid``'s channel (None: the worker is gone)."""
        payload = json.dumps(obj, separators=(",", ":")).encode()
        if len(payload) > self.backend.MAX_PAYLOAD:
            raise ValueError(f"message too large: {len(payload)} bytes > {self.backend.MAX_PAYLOAD}")
        if chan is None:
            log.warning("worker %d is gone; message dropped", wid)
            return False
        try:
            self.backend.send_msg(chan, self.backend.MSG_USER, 0, payload)
            return True
        except BlockingIOError:
            log.warning("worker %d: channel full; message dropped", wid)
        except OSError as e:
            log.warning("worker %d: cannot send message: %s", wid, e)
        return False
