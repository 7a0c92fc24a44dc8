"""Recycling by memory and by age: which READY workers should be replaced, and why.

Theory of operation: the arbiter calls ``Recycler.check(serving, now)`` on its tick
(about once a second) with the READY workers that serve a slot; it gets back the
workers to recycle as ``(wid, cause, info)`` and feeds each to the lifecycle as
``RecycleRequested(wid, cause, info)``. The lifecycle does the rest exactly as for
``--max-requests``: the replacement starts first and the old worker drains only once it
is READY, so no request fails. Asking again while a replacement is under way is
harmless (the lifecycle ignores it), so this module keeps no "already asked" state
beyond what hysteresis needs.

* ``--max-worker-memory MB``: each worker's resident set size is read from
  ``/proc/PID/statm`` (one small read per worker, at most once per SAMPLE_PERIOD). A
  worker counts as over the limit only after OVER_SAMPLES samples in a row above it,
  so one large response buffered for a moment does not replace a worker.
* Hysteresis per slot: when a slot's memory recycles come closer together than
  FLAP_WINDOW (the app's footprint right after boot is near or above the limit), the
  next one waits ``min(HOLD_BASE * 2^k, HOLD_CAP)`` with k counting such recycles in a
  row, and the log says the limit may be below the app's footprint. A slot whose
  recycles are FLAP_WINDOW apart or more starts again from k = 0.
* ``--max-worker-lifetime S``: a worker is recycled once it has lived S seconds plus
  its own jitter, drawn once at its start from [0, jitter], so workers forked together
  are not all replaced in the same second (gunicorn's max_requests_jitter, for age).

Sans-IO except for ``rss_bytes`` (the one function that reads /proc), which is a
parameter so tests can feed sizes.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

log = logging.getLogger("pyfork.arbiter")

MB = 1 << 20                 # --max-worker-memory counts MiB (what ps and top show as MB)
SAMPLE_PERIOD = 1.0          # the issue: "about once a second"
OVER_SAMPLES = 3             # consecutive samples over the limit before a recycle (~3 s)
FLAP_WINDOW = 60.0           # memory recycles of one slot closer than this are flapping
HOLD_BASE = 5.0              # first hold-off of a flapping slot, doubled per flap ...
HOLD_CAP = 300.0             # ... up to five minutes (the worker keeps serving meanwhile)

try:
    PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError):   # pragma: no cover - every Linux has it
    PAGE_SIZE = 4096


def rss_bytes(pid: int) -> Optional[int]:
    """Resident set size of ``pid`` in bytes (statm field 2, in pages); None if it is gone."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def hold_delay(k: int) -> float:
    """Hold-off before the k-th flapping memory recycle of a slot (k >= 1)."""
    return min(HOLD_BASE * (2 ** min(k - 1, 32)), HOLD_CAP)


@dataclass
class _Worker:
    started: float
    deadline: Optional[float]        # lifetime + this worker's jitter, or None
    over: int = 0                    # consecutive samples over the memory limit
    asked: bool = False              # a memory recycle was asked (asking again is not a flap)


@dataclass
class _Slot:
    last_memory: Optional[float] = None   # when its last memory recycle was asked
    flaps: int = 0
    hold_until: Optional[float] = None
    warned: bool = False


@dataclass
class Recycler:
    max_memory_mb: int = 0                 # 0 = off
    max_lifetime: float = 0.0              # seconds, 0 = off
    lifetime_jitter: float = 0.0           # seconds
    rng: random.Random = field(default_factory=random.Random)
    rss: Callable[[int], Optional[int]] = rss_bytes
    workers: Dict[int, _Worker] = field(default_factory=dict)
    slots: Dict[int, _Slot] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)   # cause -> recycles started
    next_sample: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.max_memory_mb > 0 or self.max_lifetime > 0

    def worker_started(self, wid: int, now: float) -> None:
        deadline = None
        if self.max_lifetime > 0:
            deadline = now + self.max_lifetime + self.rng.uniform(0.0, self.lifetime_jitter)
        self.workers[wid] = _Worker(started=now, deadline=deadline)

    def worker_gone(self, wid: int) -> None:
        self.workers.pop(wid, None)

    def recycled(self, cause: str) -> None:
        """The lifecycle started a replacement (its "recycle" note): count it by cause."""
        self.counts[cause] = self.counts.get(cause, 0) + 1

    def check(self, serving: Iterable[Tuple[int, int, int]], now: float) -> List[Tuple[int, str, dict]]:
        """``serving``: (wid, pid, slot) of READY workers serving a slot. Returns the
        ``(wid, cause, info)`` to recycle now."""
        if not self.enabled or now < self.next_sample:
            return []
        self.next_sample = now + SAMPLE_PERIOD * 0.9    # the tick is ~1 s; never skip one
        out = []
        for wid, pid, slot in serving:
            w = self.workers.get(wid)
            if w is None:
                continue
            if w.deadline is not None and now >= w.deadline:
                out.append((wid, "lifetime", {"age": round(now - w.started, 3)}))
                continue
            if self.max_memory_mb > 0:
                hit = self._memory(w, pid, slot, now)
                if hit is not None:
                    out.append((wid, "memory", hit))
        return out

    def _memory(self, w: _Worker, pid: int, slot_index: int, now: float) -> Optional[dict]:
        rss = self.rss(pid)
        if rss is None:
            return None
        if rss <= self.max_memory_mb * MB:
            w.over = 0
            return None
        w.over += 1
        if w.over < OVER_SAMPLES:
            return None
        info = {"rss_mb": round(rss / MB, 1), "limit_mb": self.max_memory_mb}
        if w.asked:                      # its replacement is still booting: ask again
            return info
        slot = self.slots.setdefault(slot_index, _Slot())
        if slot.hold_until is not None:
            if now < slot.hold_until:
                return None
            slot.hold_until = None
        elif slot.last_memory is not None and now - slot.last_memory < FLAP_WINDOW:
            slot.flaps += 1
            delay = hold_delay(slot.flaps)
            slot.hold_until = now + delay
            log.warning("slot %d: worker over --max-worker-memory %d MB again %.0f s after the last memory "
                        "recycle (#%d in a row); next one in %.0f s%s", slot_index, self.max_memory_mb,
                        now - slot.last_memory, slot.flaps, delay,
                        "" if slot.warned else "; is the limit below the app's footprint after boot?")
            slot.warned = True
            return None
        else:
            slot.flaps = 0
        slot.last_memory = now
        w.asked = True
        return info
