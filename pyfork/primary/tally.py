"""Cluster-wide counters that outlive the workers they count: the primary's tally.

Theory of operation. A worker's own numbers live in its scoreboard line (requests
handled) and in the kernel (CPU time, memory); both vanish with the process. A counter
that a monitoring system reads must never go back, so when a worker is reaped the
primary folds what it had into its *slot* (the exit event carries ``handled`` and
``durations`` from the scoreboard and ``cpu`` from wait4's rusage). ``Tally`` subscribes to the primary's event
stream (pyfork.primary.eventstream) and keeps:

* ``requests[slot]`` / ``cpu[slot]``: what reaped workers of that slot handled / used;
* ``accepted``: connections reaped workers accepted themselves (shared, reuseport);
* ``durations[slot]``: their request-duration histogram (per-bucket counts and the sum
  in ns, pyfork.scoreboard.SlotView.durations), added bucket by bucket;
* ``restarts[cause]``: workers replaced, by why they went (README "Metrics"):
  ``crash`` (exited, code != 0 or an unasked exit), ``signal`` (a signal pyfork did not
  send, or an outside SIGTERM), ``timeout`` (hung or never READY), ``max_requests``,
  ``memory``, ``lifetime`` (recycling), ``reload`` (HUP), ``scale`` (TTOU / scale down).
  Exits during a stop are not restarts.

The cause is learned from the notes that come before the exit (``recycle``, ``replace``,
``kill``, ``leaving``, ``scale``), so the arbiter only reports what happened and this
module decides what to call it. Live workers are added at read time (``totals``).
Everything runs on the primary's loop thread, only when an event happens: nothing here
is on the per-connection path.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping

from pyfork.scoreboard import HIST_BOUNDS_NS, HIST_BUCKETS

RESTART_CAUSES = ("crash", "signal", "timeout", "max_requests", "memory", "lifetime", "reload", "scale")
_RECYCLE_CAUSES = ("max_requests", "memory", "lifetime")
_TIMEOUT_KILLS = ("hung", "ready_timeout")


class Tally:
    def __init__(self):
        self.requests: Dict[int, int] = {}
        self.cpu: Dict[int, float] = {}
        self.accepted = 0
        self.durations: Dict[int, List[int]] = {}   # slot -> bucket counts..., sum_ns
        self.restarts: Dict[str, int] = {c: 0 for c in RESTART_CAUSES}
        self._why: Dict[int, str] = {}          # wid -> the cause its exit will count as
        self.limit_rejections = 0               # 503s because of --limit-concurrency, all workers
        self._stopping = False
        self._scaling_down = False

    # ---- fed by the event stream --------------------------------------------------
    def on_event(self, ev) -> None:
        kind, f, wid = ev.kind, ev.fields, ev.worker
        if kind == "exit":
            self._on_exit(wid, ev.slot, f)
        elif kind == "recycle" and wid is not None:
            cause = f.get("cause") or f.get("reason")
            self._why.setdefault(wid, cause if cause in _RECYCLE_CAUSES else "max_requests")
        elif kind == "replace" and f.get("purpose") == "reload" and f.get("old") is not None:
            self._why.setdefault(f["old"], "reload")
        elif kind == "kill" and wid is not None and f.get("reason") in _TIMEOUT_KILLS:
            self._why[wid] = "timeout"
        elif kind == "leaving" and wid is not None:
            self._why.setdefault(wid, "signal")
        elif kind == "scale":
            self._scaling_down = f.get("to", 0) < f.get("from", 0)
        elif kind == "disconnect" and wid is not None and self._scaling_down:
            self._why.setdefault(wid, "scale")
        elif kind == "stop":
            self._stopping = True
        elif kind == "limit_rejected":
            self.limit_rejections += int(f.get("count") or 0)
        if kind not in ("scale", "disconnect"):
            self._scaling_down = False     # a scale-down's drains follow its note at once

    def _on_exit(self, wid, slot, f: Mapping) -> None:
        if slot is not None:
            self.requests[slot] = self.requests.get(slot, 0) + int(f.get("handled") or 0)
            self.cpu[slot] = self.cpu.get(slot, 0.0) + float(f.get("cpu") or 0.0)
            self.accepted += int(f.get("accepted") or 0)
            add_durations(self.durations.setdefault(slot, [0] * (HIST_BUCKETS + 1)), f.get("durations"))
        why = self._why.pop(wid, None)
        cause = f.get("cause")
        if self._stopping or cause in ("stop", "stop_timeout"):
            return
        if why is None:
            if cause == "crash":
                why = "signal" if f.get("signal") is not None else "crash"
            elif cause == "exit":
                why = "crash"               # it stopped by itself: nobody asked it to
            else:
                return                      # drained for a reason already counted elsewhere
        self.restarts[why] = self.restarts.get(why, 0) + 1

    # ---- read ---------------------------------------------------------------------
    def totals(self, live: Iterable[Mapping]) -> dict:
        """Folded counts plus the live workers' (rows of Arbiter.status: slot, handled,
        cpu, durations): requests and CPU seconds per slot, restarts per cause, and the
        request-duration histogram of the whole cluster (``request_duration``: cumulative
        counts by upper bound in seconds, as Prometheus' ``le``, the sum and the count), and
        the connections workers accepted themselves (``worker_accepted``)."""
        requests = dict(self.requests)
        cpu = dict(self.cpu)
        accepted = self.accepted
        hist = [0] * (HIST_BUCKETS + 1)
        for folded in self.durations.values():
            add_durations(hist, {"counts": folded[:HIST_BUCKETS], "sum_ns": folded[HIST_BUCKETS]})
        for row in live:
            s = row["slot"]
            requests[s] = requests.get(s, 0) + int(row.get("handled") or 0)
            cpu[s] = cpu.get(s, 0.0) + float(row.get("cpu") or 0.0)
            accepted += int(row.get("accepted") or 0)
            add_durations(hist, row.get("durations"))
        return {"requests": {str(k): v for k, v in sorted(requests.items())},
                "cpu_seconds": {str(k): round(v, 6) for k, v in sorted(cpu.items())},
                "restarts": dict(self.restarts), "limit_concurrency_rejections": self.limit_rejections,
                "request_duration": cumulative(hist), "worker_accepted": accepted}


def add_durations(into: List[int], d) -> None:
    """Adds one scoreboard histogram (``{"counts": [per bucket], "sum_ns": n}``, as the exit
    event and the status rows carry it; None = nothing) to ``into`` (counts..., sum_ns)."""
    if not d:
        return
    for i, n in enumerate(d["counts"][:HIST_BUCKETS]):
        into[i] += int(n)
    into[HIST_BUCKETS] += int(d["sum_ns"])


def cumulative(hist: List[int]) -> dict:
    """``{"le": {"0.001": n, ..., "+Inf": count}, "sum_seconds": s, "count": count}`` from
    per-bucket counts and sum_ns: what Prometheus' histogram type shows."""
    le, n = {}, 0
    for bound, c in zip(HIST_BOUNDS_NS + (None,), hist[:HIST_BUCKETS]):
        n += c
        le["+Inf" if bound is None else repr(bound / 1e9)] = n
    return {"le": le, "sum_seconds": hist[HIST_BUCKETS] / 1e9, "count": n}
