"""The words between the arbiter and the policy: events in, actions out (sans-IO).

Theory of operation (h11's ``_events.py``): the arbiter feeds the events below to
``pyfork.primary.lifecycle.Lifecycle.handle(event, now)`` and carries out the actions it gets back,
in order. Both are frozen dataclasses -- plain data, compared by value, so a policy test
is a list of events and the exact list of actions expected. Nothing here does anything.
pyfork.primary.lifecycle re-exports every name (``P.Start``, ``P.Spawn`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional


# ---- events (fed by the arbiter) -----------------------------------------------
@dataclass(frozen=True)
class Start:
    """Fill ``n`` slots (the first event)."""
    n: int


@dataclass(frozen=True)
class Forked:
    """Spawn(wid) produced process ``pid``."""
    wid: int
    pid: int


@dataclass(frozen=True)
class Ready:
    """Worker said READY over its channel."""
    wid: int


@dataclass(frozen=True)
class Exited:
    """Worker was reaped (code or signal set), or fork failed (both None)."""
    wid: int
    code: Optional[int] = None
    signal: Optional[int] = None


@dataclass(frozen=True)
class RecycleRequested:
    """Replace worker ``wid`` gracefully: it reached its max_requests (+ jitter), or the
    primary's recycler (pyfork.primary.recycling) found it over --max-worker-memory or past
    --max-worker-lifetime. ``cause`` is "max_requests", "memory" or "lifetime"; ``info``
    goes into the "recycle" note as is (e.g. rss_mb, age)."""
    wid: int
    cause: str = "max_requests"
    info: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Leaving:
    """Worker got SIGTERM from someone else and asks to be drained."""
    wid: int


@dataclass(frozen=True)
class Tick:
    """Time passed. ``beats`` maps wid -> last heartbeat (same clock as ``now``)."""
    beats: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Reload:
    """HUP: replace every worker, oldest first, replacement READY before drain."""


@dataclass(frozen=True)
class Scale:
    n: int


@dataclass(frozen=True)
class Stop:
    graceful: bool = True
    code: int = 0


@dataclass(frozen=True)
class Drained:
    """The dispatcher accepted the backlog to EAGAIN and sent every pending fd."""


# ---- actions (carried out by the arbiter) -----------------------------------------
@dataclass(frozen=True)
class Spawn:
    wid: int
    slot: int
    generation: int


@dataclass(frozen=True)
class Activate:
    """Mark the worker READY in the dispatcher (it may now get connections)."""
    wid: int


@dataclass(frozen=True)
class Drain:
    wid: int


@dataclass(frozen=True)
class Kill:
    wid: int
    sig: int


@dataclass(frozen=True)
class StopAccepting:
    pass


@dataclass(frozen=True)
class CloseListeners:
    """A stop has taken the last connection the listeners had queued (or is immediate):
    close them, so a client that connects from now on is refused at once and can try
    another host, instead of waiting in the backlog until the primary exits and then
    being reset."""


@dataclass(frozen=True)
class ReleaseSlot:
    """The slot is gone (scale-down) or gave up: per-slot resources (reuseport listeners) can go."""
    slot: int


@dataclass(frozen=True)
class Log:
    level: str   # "info" | "warning" | "error"
    message: str


@dataclass(frozen=True)
class Exit:
    code: int


@dataclass(frozen=True)
class Note:
    """A decision worth telling the outside, as data (the arbiter emits it on its event
    stream, pyfork.primary.eventstream): ``kind`` and its fields, about worker ``wid``
    when there is one. Log actions say the same in words for people."""
    kind: str
    wid: Optional[int] = None
    data: Mapping[str, object] = field(default_factory=dict)
