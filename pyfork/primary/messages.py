"""What the Cluster API sees of workers: handles, messages to and from them, events.

Theory of operation. A ``WorkerHandle`` is the user's object for one worker
(``cluster.workers``, the event callbacks' argument). After fork a worker's channel
carries, besides connections, small messages (pyfork.backend: MSG_READY, MSG_USER with a
JSON payload, MSG_CTL with a JSON object). When the dispatcher reports a channel
readable, ``_on_messages`` reads at most MAX_MSGS_PER_EVENT of them (fairness between
workers) and turns each into a policy event (READY, recycle, drain request) or a Cluster
event (``message``, ``online``). The other way, ``send_to``/``broadcast`` send JSON
values to workers without ever blocking the loop: a full channel drops the message and
says so.

Cluster events (fork, online, ready, message, disconnect, exit) go to the callback given
to the Arbiter, one at a time on the loop's thread; an exception in one is logged and
ignored, so a user callback cannot take the primary down.

``WorkerMessages`` is mixed into pyfork.primary.arbiter.Arbiter and uses its ``backend``,
``procs``, ``by_phys``, ``wake``, ``_feed`` and ``_emit_cb``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from pyfork.primary import lifecycle as P

log = logging.getLogger("pyfork.arbiter")   # the primary's log, wherever the line comes from

MAX_MSGS_PER_EVENT = 256                 # fairness: messages read from one channel per wakeup


class WorkerHandle:
    """The primary's view of one worker (what cluster.workers holds)."""

    def __init__(self, arbiter, wid: int, slot: int):
        self._arb = arbiter
        self.id = wid
        self.slot = slot
        self.pid: Optional[int] = None
        self.state = P.SPAWNING
        self.started = time.monotonic()
        self._disconnected = False

    def send(self, obj) -> bool:
        """Sends a JSON value to the worker. Returns False (and logs) when it cannot
        be delivered now (channel full, worker gone); ValueError when not JSON or too large."""
        return self._arb.send_to(self.id, obj)

    def __repr__(self) -> str:
        return f"<WorkerHandle id={self.id} pid={self.pid} slot={self.slot} state={self.state}>"


class WorkerMessages:
    """Message and event plumbing of the Arbiter (a mixin: see the module docstring)."""

    def _on_messages(self, phys: int) -> None:
        wid = self.by_phys.get(phys)
        p = self.procs.get(wid) if wid is not None else None
        if p is None:
            return
        b = self.backend
        for _ in range(MAX_MSGS_PER_EVENT):
            try:
                msg = b.recv_msg(p.chan, 0)
            except (BlockingIOError, InterruptedError):
                return
            except BrokenPipeError:
                self.wake.chld = True
                return
            except OSError as e:
                log.warning("worker %d: dropped a malformed message: %s", wid, e)
                continue
            for fd in msg.fds:
                os.close(fd)
            try:
                self._on_message(p, msg)
            except Exception:
                log.exception("worker %d: error handling a message of type %d", wid, msg.type)
            if wid not in self.procs:
                return

    def _on_message(self, p, msg) -> None:
        b = self.backend
        if msg.type == b.MSG_READY:
            self._feed(P.Ready(p.wid))
        elif msg.type == b.MSG_USER:
            try:
                obj = json.loads(msg.payload)
            except ValueError:
                log.warning("worker %d: dropped a message that is not JSON (%d bytes)", p.wid, len(msg.payload))
                return
            self._emit("message", p.handle, obj)
        elif msg.type == b.MSG_CTL:
            try:
                obj = json.loads(msg.payload)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                log.warning("worker %d: dropped a malformed control message", p.wid)
            elif obj.get("online"):
                self._emit("online", p.handle)
            elif "recycle" in obj:
                self._feed(P.RecycleRequested(p.wid))
            elif obj.get("drain"):
                self._feed(P.Leaving(p.wid))
            else:
                log.warning("worker %d: unknown control message %.80r", p.wid, obj)
        else:
            log.warning("worker %d: dropped a message of unexpected type %d", p.wid, msg.type)

    def send_to(self, wid: int, obj) -> bool:
        payload = json.dumps(obj, separators=(",", ":")).encode()
        if len(payload) > self.backend.MAX_PAYLOAD:
            raise ValueError(f"message too large: {len(payload)} bytes > {self.backend.MAX_PAYLOAD}")
        p = self.procs.get(wid)
        if p is None:
            log.warning("worker %d is gone; message dropped", wid)
            return False
        try:
            self.backend.send_msg(p.chan, self.backend.MSG_USER, 0, payload)
            return True
        except BlockingIOError:
            log.warning("worker %d: channel full; message dropped", wid)
        except OSError as e:
            log.warning("worker %d: cannot send message: %s", wid, e)
        return False

    def broadcast(self, obj) -> int:
        n = 0
        for wid, p in list(self.procs.items()):
            if p.handle.state == P.READY and self.send_to(wid, obj):
                n += 1
        return n

    # ---- events for the Cluster API ----------------------------------------------------
    def _emit(self, name: str, *args) -> None:
        if self._emit_cb is None:
            return
        try:
            self._emit_cb(name, *args)
        except Exception:
            log.exception("cluster %r callback failed", name)

    def _emit_disconnect(self, handle) -> None:
        """``disconnect`` once per worker: when it is told to drain or, at the latest, on exit."""
        if not handle._disconnected:
            handle._disconnected = True
            self._emit("disconnect", handle)
