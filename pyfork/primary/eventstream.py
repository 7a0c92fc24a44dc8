"""The primary's event stream: what happened to the cluster, as structured records.

Theory of operation (Node's ``cluster`` events, made into data). The arbiter calls
``EventStream.emit(kind, handle, **fields)`` wherever something worth knowing happens:
a worker forked, came online, became READY, sent a message, was told to drain, exited;
a reload started, completed or aborted; a slot backed off or gave up; the primary
started listening or is shutting down. Each call builds one ``Event`` and hands it, in
order, on the loop's thread, to

* every in-process subscriber (``pyfork.Cluster.subscribe`` / ``Cluster.on``); an
  exception in one is logged and ignored, so a subscriber cannot take the primary down;
* every ``JsonLinesSink``: one JSON object per line, written to a file descriptor
  (``PYFORK_EVENTS=fd://N`` or a file path, and control-socket subscribers).

A sink never blocks the primary: its fd is non-blocking, what the reader has not taken
waits in a buffer of at most MAX_BUFFER bytes, and an event that does not fit is dropped
and counted; when room returns the reader first gets ``{"kind": "dropped", "count": n}``.
A reader that is gone (EPIPE and the like) just closes the sink.

The record kinds and their fields are listed in README.md ("Events"); the field names
are the contract (tests and users match on them, never on log wording).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional

log = logging.getLogger("pyfork.arbiter")

# What a slow reader may have waiting (a few thousand records); beyond it events are
# dropped and counted, never queued without bound.
MAX_BUFFER = 1 << 20


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``worker``/``pid``/``slot`` are set for worker events;
    ``fields`` holds the per-kind values (see README.md, "Events")."""
    kind: str
    time: float                          # time.time() when it was emitted
    worker: Optional[int] = None
    pid: Optional[int] = None
    slot: Optional[int] = None
    fields: Mapping[str, Any] = field(default_factory=dict)
    handle: Any = field(default=None, compare=False, repr=False)   # the WorkerHandle, in process only

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def get(self, key: str, default=None):
        return self.to_dict().get(key, default)

    def to_dict(self) -> Dict[str, Any]:
        """The flat record a JSON-lines reader gets: kind, time, worker, pid, slot, fields."""
        out: Dict[str, Any] = {"kind": self.kind, "time": round(self.time, 6)}
        if self.worker is not None:
            out.update(worker=self.worker, pid=self.pid, slot=self.slot)
        out.update(self.fields)
        return out


def _encode(record: Mapping[str, Any]) -> bytes:
    # default=repr: a message object is JSON by construction, but a field must never
    # make the primary raise here.
    return (json.dumps(record, separators=(",", ":"), default=repr) + "\n").encode()


class JsonLinesSink:
    """Writes records as JSON lines to a non-blocking fd it owns (closed by close())."""

    def __init__(self, fd: int, max_buffer: int = MAX_BUFFER, inherited: Optional[int] = None):
        self.fd = fd
        self.inherited = inherited    # fd://N: the caller's N (a worker closes it, never the primary)
        self.max_buffer = max_buffer
        self.buf = bytearray()
        self.dropped = 0          # events dropped since the last "dropped" record
        self.dropped_total = 0
        self.closed = False
        os.set_blocking(fd, False)

    def write(self, record: Mapping[str, Any]) -> None:
        if self.closed:
            return
        data = _encode(record)
        if self.buf:
            self.flush()
        note = b""
        if self.dropped:     # the reader learns how many it missed before the next one
            note = _encode({"kind": "dropped", "time": round(time.time(), 6), "count": self.dropped})
        if len(self.buf) + len(note) + len(data) > self.max_buffer:
            self.dropped += 1
            self.dropped_total += 1
            return
        self.dropped = 0
        self.buf += note
        self.buf += data
        self.flush()

    def flush(self) -> None:
        """Writes what the fd takes now; never waits."""
        while self.buf and not self.closed:
            try:
                n = os.write(self.fd, self.buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.close()          # the reader is gone: nobody to tell
                return
            del self.buf[:n]

    @property
    def pending(self) -> int:
        return len(self.buf)

    def primary_only_fds(self) -> List[int]:
        """What a forked worker must close: our fd, and an inherited fd://N above stdio
        (else a reader would not see EOF when the primary is gone)."""
        out = [] if self.closed else [self.fd]
        if self.inherited is not None and self.inherited > 2:
            out.append(self.inherited)
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.buf.clear()
            try:
                os.close(self.fd)
            except OSError:
                pass


def open_sink(spec: str) -> JsonLinesSink:
    """``fd://N`` (a copy of inherited fd N: a pipe, a socket, a file) or a file path
    (appended to, created 0600; a FIFO must already have a reader). OSError/ValueError."""
    if spec.startswith("fd://"):
        try:
            n = int(spec[5:], 10)
        except ValueError:
            raise ValueError(f"bad events target {spec!r}: expected fd://N or a path") from None
        if n < 0:
            raise ValueError(f"bad events target {spec!r}: fd must be >= 0")
        fd = os.dup(n)                         # ours to close; the caller's N stays theirs
        os.set_inheritable(fd, False)
        return JsonLinesSink(fd, inherited=n)
    elif spec:
        fd = os.open(spec, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    else:
        raise ValueError("empty events target: expected fd://N or a path")
    return JsonLinesSink(fd)


class EventStream:
    """Fans each Event out to the subscribers and the sinks (see the module docstring)."""

    def __init__(self):
        self.subscribers: List[Callable[[Event], None]] = []
        self.sinks: List[JsonLinesSink] = []

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self.subscribers.append(callback)

    def add_sink(self, sink: JsonLinesSink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink: JsonLinesSink) -> None:
        if sink in self.sinks:
            self.sinks.remove(sink)

    def emit(self, kind: str, handle=None, **fields) -> Event:
        if handle is not None:
            ev = Event(kind, time.time(), handle.id, handle.pid, handle.slot, fields, handle)
        else:
            ev = Event(kind, time.time(), fields=fields)
        for cb in list(self.subscribers):
            try:
                cb(ev)
            except Exception:
                log.exception("event subscriber %r failed on %r", cb, kind)
        if self.sinks:
            record = ev.to_dict()
            for sink in list(self.sinks):
                sink.write(record)
                if sink.closed:
                    self.sinks.remove(sink)
        return ev

    def flush(self) -> None:
        for sink in list(self.sinks):
            if sink.buf:
                sink.flush()
            if sink.closed:
                self.sinks.remove(sink)

    def primary_only_fds(self) -> List[int]:
        return [fd for s in self.sinks for fd in s.primary_only_fds()]

    @property
    def dropped(self) -> int:
        return sum(s.dropped_total for s in self.sinks)

    def close(self) -> None:
        for sink in self.sinks:
            sink.flush()
            sink.close()
        self.sinks.clear()
