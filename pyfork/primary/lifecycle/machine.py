"""Worker lifecycle policy: a sans-IO state machine (no fork, no kill, no clock).

Theory of operation (h11's ``_state.py`` style): the arbiter feeds events
(``Started``, ``Ready``, ``Exited``, ``Tick``, ``Reload``, ``Stop`` ...) to
``Lifecycle.handle(event, now)`` and gets back a list of actions (``Spawn``,
``Drain``, ``Kill``, ``Activate``, ``Log``, ``Exit`` ...) that it carries out.
Time is a parameter, so backoff, hung-worker detection and timeouts are tested
with an injected clock and no sleeping.

Two kinds of things have state:

* a **worker** (one forked process, identified by its 1-based id, which grows
  on every fork as in Node): SPAWNING -> READY -> DRAINING -> EXITED, moves
  listed as data in ``WORKER_MOVES``;
* a **slot** (one of the N positions the primary keeps filled): RUNNING,
  BACKOFF (waiting to respawn after a rapid exit) or GAVE_UP, moves listed in
  ``SLOT_MOVES``. Only boot failures (exits before READY) make a slot give up;
  a worker that died after READY is always respawned (states.py says why); a
  slot that gave up retries after ``give_up_cooldown`` while another slot
  serves. A slot holds its serving worker and at most one *candidate* (a
  replacement started by a rolling restart or by max_requests recycling;
  the old worker is drained only once the candidate is READY, as nginx does
  on reload). A replaced worker becomes *retiring*: it drains and its exit
  respawns nothing.

An undefined move raises ``LifecycleError`` instead of being silently ignored.

Layout: the events and actions are in events.py, the states, move tables, records and
backoff math in states.py, the words for exit causes in causes.py; this module holds the
state machine (``Lifecycle``); the package re-exports them all, so
``pyfork.primary.lifecycle`` is the one name callers use.
"""

from __future__ import annotations

import signal
from typing import Dict, List, Optional

from pyfork.primary.lifecycle.events import (
    Activate, CloseListeners, Drain, Drained, Exit, Exited, Forked, Kill, Leaving, Log, RecycleRequested, Ready,
    ReleaseSlot, Reload, Scale, Spawn, Start, Stop, StopAccepting, Tick,
)
from pyfork.primary.lifecycle.states import (
    ABORT_GRACE, BACKOFF, BACKOFF_BASE, BACKOFF_CAP, DRAINING, GAVE_UP, GIVE_UP_COOLDOWN, IMMEDIATE_GRACE, READY,
    RUNNING, SLOT_MOVES, SPAWNING, WORKER_MOVES, SlotRec, WorkerRec, backoff_delay, fmt_dur, fmt_ms,
    fmt_secs, move,
)
from pyfork.primary.lifecycle.causes import describe_exit
from pyfork.primary.lifecycle.events import Note   # what the arbiter's event stream reports

# RecycleRequested.cause -> the log's words
RECYCLE_WHY = {"max_requests": "reached max_requests", "memory": "is over max_worker_memory",
               "lifetime": "reached max_worker_lifetime"}


class Lifecycle:
    """The whole lifecycle of a primary's workers. ``handle(event, now)`` -> actions.

    Limits and their precedent:

    * ``min_uptime`` (1 s): a READY worker that dies sooner than this after its
      fork is respawned after ``min(base*2^k, cap)`` (base 0.1 s, cap 10 s) instead
      of at once; k counts such rapid exits in a row and resets when a worker
      lives longer (the article's CRASH_LOOP_THRESHOLD_MS = 1000; PM2's
      min_uptime with exp_backoff_restart_delay). It never makes a slot give up:
      the worker had booted, so a respawn can work (gunicorn respawns any worker
      that dies after booting, for ever).
    * ``max_restarts`` (5): boot failures (exits before READY) in a row before
      a slot gives up (the article's MAX_RESTART_ATTEMPTS = 5; PM2's
      max_restarts; gunicorn halts on the first boot error). 0 behaves as 1.
      A worker reaching READY resets the count. When every slot has given up the
      primary exits with code 3 (gunicorn's HaltServer on a worker boot error
      uses 3 too).
    * ``give_up_cooldown`` (60 s, 0 = never): a slot that gave up tries again,
      from scratch, once this long has passed and another slot serves (a
      READY worker); HUP revives it at once. states.GIVE_UP_COOLDOWN cites why.
    * ``timeout`` (30 s, 0 = off): no heartbeat for that long -> SIGABRT (the worker
      logs its tracebacks), SIGKILL ``ABORT_GRACE`` (2 s) later, and replace
      (gunicorn's --timeout, same default, and its SIGABRT).
    * ``ready_timeout`` (30 s): a worker not READY that long after fork is
      killed; a rolling restart whose replacement is not READY in time aborts
      and the old workers keep serving (nginx keeps old workers until new ones
      are up).
    * ``graceful_timeout`` (30 s): a draining worker is killed after it
      (gunicorn's --graceful-timeout, same default).
    """

    def __init__(self, *, min_uptime: float = 1.0, max_restarts: int = 5, timeout: float = 30.0,
                 graceful_timeout: float = 30.0, ready_timeout: float = 30.0,
                 backoff_base: float = BACKOFF_BASE, backoff_cap: float = BACKOFF_CAP,
                 give_up_cooldown: float = GIVE_UP_COOLDOWN, max_workers: int = 1024):
        self.min_uptime = min_uptime
        self.max_restarts = max(1, max_restarts)
        self.give_up_cooldown = give_up_cooldown
        self.timeout = timeout
        self.graceful_timeout = graceful_timeout
        self.ready_timeout = ready_timeout
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_workers = max_workers
        self.workers: Dict[int, WorkerRec] = {}
        self.slots: Dict[int, SlotRec] = {}
        self.generation = 0
        self.next_wid = 1
        self.reloading = False
        self.reload_wait: Optional[int] = None    # wid of the candidate we wait for
        self.reload_deadline: Optional[float] = None
        self.stopping = False
        self.graceful = True
        self.exit_code = 0
        self.drained = False
        self.stop_deadline: Optional[float] = None
        self.killed_all = False
        self.exited = False
        self._out: List[object] = []

    # ---- helpers ------------------------------------------------------------------
    def _log(self, level: str, msg: str) -> None:
        self._out.append(Log(level, msg))

    def _note(self, kind: str, wid: Optional[int] = None, **data) -> None:
        self._out.append(Note(kind, wid, data))

    def _spawn(self, slot: SlotRec, now: float, purpose: str = "serve") -> WorkerRec:
        wid = self.next_wid
        self.next_wid += 1
        w = WorkerRec(wid=wid, slot=slot.index, generation=self.generation, started=now, purpose=purpose)
        self.workers[wid] = w
        if purpose == "serve":
            slot.worker = wid
        else:
            slot.candidate = wid
        self._out.append(Spawn(wid, slot.index, self.generation))
        return w

    def _drain(self, w: WorkerRec, now: float) -> None:
        if w.state == DRAINING:
            return
        w.state = move(WORKER_MOVES, w.state, "drain", w.label())
        w.drain_at = now
        self._out.append(Drain(w.wid))

    def _kill(self, w: WorkerRec, sig: int) -> None:
        self._out.append(Kill(w.wid, sig))
        if sig == signal.SIGKILL:
            w.killed = True

    def live(self) -> List[WorkerRec]:
        return list(self.workers.values())

    def live_count(self) -> int:
        return len(self.workers)

    def serving(self) -> int:
        """Workers that are READY (get connections)."""
        return sum(1 for w in self.workers.values() if w.state == READY)

    def _slot_serves(self, slot: SlotRec) -> bool:
        w = self.workers.get(slot.worker) if slot.worker is not None else None
        return w is not None and w.state == READY

    # ---- entry point ----------------------------------------------------------------
    def handle(self, event, now: float) -> list:
        self._out = []
        name = type(event).__name__
        getattr(self, "_on_" + name)(event, now)
        self._check_exit(now)
        out, self._out = self._out, []
        return out

    def _check_exit(self, now: float) -> None:
        if self.exited or not self.stopping:
            return
        if not self.workers:
            self.exited = True
            self._log("info", f"all workers gone; exiting with code {self.exit_code}")
            self._out.append(Exit(self.exit_code))

    # ---- events ---------------------------------------------------------------------
    def _on_Start(self, ev: Start, now: float) -> None:
        for i in range(ev.n):
            slot = SlotRec(index=i)
            self.slots[i] = slot
            self._spawn(slot, now)

    def _on_Forked(self, ev: Forked, now: float) -> None:
        w = self.workers.get(ev.wid)
        if w is not None:
            w.pid = ev.pid

    def _on_Ready(self, ev: Ready, now: float) -> None:
        w = self.workers.get(ev.wid)
        if w is None:
            return
        w.state = move(WORKER_MOVES, w.state, "ready", w.label())
        w.ready_at = now
        if w.state != READY:       # told to drain meanwhile: never gets connections
            return
        self._out.append(Activate(w.wid))
        self._log("info", f"{w.label()} ready in {fmt_dur(now - w.started)}")
        slot = self.slots.get(w.slot)
        if slot is not None:
            slot.boot_failures = 0      # it booted: the app imports again
        if slot is not None and slot.candidate == w.wid:
            old = self.workers.get(slot.worker) if slot.worker is not None else None
            slot.worker, slot.candidate = w.wid, None
            if w.purpose == "recycle":
                slot.recycle_failures = 0
                slot.recycle_due = None
            if old is not None:
                self._log("info", f"{w.label()} replaces {old.label()} in slot {slot.index} ({w.purpose}); "
                          f"draining worker {old.wid}")
                self._note("replace", w.wid, old=old.wid, slot=slot.index, purpose=w.purpose)
                self._drain(old, now)
        if self.reloading and (self.reload_wait == w.wid or self.reload_wait is None):
            # our candidate is up, or a recycle the reload was waiting for finished
            self.reload_wait = None
            self.reload_deadline = None
            self._reload_next(now)
        self._retry_given_up(now)       # a slot may have waited for someone to serve

    def _on_Exited(self, ev: Exited, now: float) -> None:
        w = self.workers.pop(ev.wid, None)
        if w is None:
            return
        w.state = move(WORKER_MOVES, w.state, "exit", w.label())
        uptime = now - w.started
        if ev.code is None and ev.signal is None:
            head = f"worker {w.wid} could not be forked"
        else:
            head = (f"{w.label()} exited code={ev.code} signal={ev.signal} after {fmt_secs(uptime)}: "
                    + describe_exit(ev.code, ev.signal, killed_by_pyfork=w.killed))
        slot = self.slots.get(w.slot)
        if slot is None or (slot.worker != w.wid and slot.candidate != w.wid):
            # retiring (replaced, scaled down) or the slot is gone
            self._log("info", head + ("" if w.drain_at is not None else " (retired)"))
            return
        if self.stopping:
            self._log("info", head)
            if slot.worker == w.wid:
                slot.worker = None
            if slot.candidate == w.wid:
                slot.candidate = None
            return
        if slot.candidate == w.wid:
            slot.candidate = None
            self._candidate_failed(slot, w, head, now)
            return
        # the slot's serving worker
        slot.worker = None
        if slot.candidate is not None:
            # its replacement is already starting: promote it
            cand = self.workers[slot.candidate]
            slot.worker, slot.candidate = cand.wid, None
            cand.purpose = "serve" if not (self.reloading and self.reload_wait == cand.wid) else cand.purpose
            self._log("warning", f"{head}; its replacement worker {cand.wid} is starting")
            return
        if w.ready_at is None:
            self._boot_failed(slot, w, head, now)
        elif uptime >= self.min_uptime:
            slot.state = move(SLOT_MOVES, slot.state, "stable_exit", f"slot {slot.index}")
            slot.crashes = 0
            slot.restarts += 1
            self._log("warning", f"{head}; respawning now")
            self._spawn(slot, now)
        else:
            # died after READY but soon after its fork: always respawned, after a backoff
            slot.crashes += 1
            delay = backoff_delay(slot.crashes, self.backoff_base, self.backoff_cap)
            slot.state = move(SLOT_MOVES, slot.state, "rapid_exit", f"slot {slot.index}")
            slot.due = now + delay
            self._log("warning", f"{head}; up less than min_uptime {fmt_secs(self.min_uptime)} "
                      f"(#{slot.crashes} in a row): respawning in {fmt_ms(delay)}")
            self._note("backoff", w.wid, slot=slot.index, crashes=slot.crashes, delay=delay)

    def _boot_failed(self, slot: SlotRec, w: WorkerRec, head: str, now: float) -> None:
        """An exit before READY: backoff, and after max_restarts in a row the slot gives up."""
        slot.crashes += 1
        slot.boot_failures += 1
        n = slot.boot_failures
        if n < self.max_restarts:
            delay = backoff_delay(slot.crashes, self.backoff_base, self.backoff_cap)
            slot.state = move(SLOT_MOVES, slot.state, "boot_failure", f"slot {slot.index}")
            slot.due = now + delay
            self._log("warning", f"{head}; boot failure #{n} (exit before READY), respawning in {fmt_ms(delay)}")
            self._note("backoff", w.wid, slot=slot.index, crashes=slot.crashes, delay=delay)
            return
        slot.state = move(SLOT_MOVES, slot.state, "give_up", f"slot {slot.index}")
        self._out.append(ReleaseSlot(slot.index))
        if self.give_up_cooldown > 0:
            slot.retry_at = now + self.give_up_cooldown
            then = f"it tries again in {fmt_secs(self.give_up_cooldown)} if another slot serves"
        else:
            slot.retry_at = None
            then = "it stays down (give_up_cooldown 0)"
        self._log("error", f"{head}; boot failure #{n}: slot {slot.index} GIVES UP after {n} boot failures "
                  f"in a row (max_restarts {self.max_restarts}); {then}; fix the app, then HUP")
        self._note("gave_up", w.wid, slot=slot.index, crashes=n)
        if self.slots and all(s.state == GAVE_UP for s in self.slots.values()):
            self._log("error", "every worker slot has given up; stopping with exit code 3")
            self._begin_stop(now, graceful=True, code=3)

    def _retry_given_up(self, now: float) -> None:
        """Given-up slots whose cool-down is over start again, from scratch, while another slot
        serves. When none serves the app is broken everywhere: they stay down, so that the last
        slot to give up stops the primary with exit code 3 instead of slots taking turns."""
        if self.stopping:
            return
        due = [s for s in self.slots.values() if s.state == GAVE_UP and s.retry_at is not None
               and now >= s.retry_at]
        if not due or not any(self._slot_serves(s) for s in self.slots.values()):
            return
        for slot in due:
            slot.state = move(SLOT_MOVES, slot.state, "cooled_down", f"slot {slot.index}")
            slot.retry_at = None
            slot.crashes = slot.boot_failures = 0
            slot.restarts += 1
            self._log("warning", f"slot {slot.index} gave up {fmt_secs(self.give_up_cooldown)} ago; "
                      "trying it again")
            self._note("revive", slot=slot.index)
            self._spawn(slot, now)

    def _candidate_failed(self, slot: SlotRec, w: WorkerRec, head: str, now: float) -> None:
        why = "before READY" if w.ready_at is None else "while starting"
        if w.purpose == "reload":
            if self.reloading and self.reload_wait == w.wid:
                self.reloading = False
                self.reload_wait = None
                self.reload_deadline = None
                self._log("error", f"{head}; reload ABORTED: replacement for slot {slot.index} exited {why}; "
                          "old workers keep serving")
                self._note("reload_aborted", w.wid, slot=slot.index, reason="exited", generation=self.generation)
            else:
                self._log("warning", head)
            return
        # recycle candidate: the old worker keeps serving; retry with backoff
        if self.reloading and self.reload_wait is None:
            self._reload_next(now)      # the reload waited for this slot; it is free now
        slot.recycle_failures += 1
        n = slot.recycle_failures
        if n >= self.max_restarts:
            slot.recycle_due = None
            self._log("error", f"{head}; recycling slot {slot.index} failed {n} times in a row; "
                      "the old worker keeps serving and will not be recycled")
            return
        delay = backoff_delay(n, self.backoff_base, self.backoff_cap)
        slot.recycle_due = now + delay
        self._log("warning", f"{head}; recycle replacement failed (#{n}); old worker keeps serving, "
                  f"retrying in {fmt_ms(delay)}")

    def _on_RecycleRequested(self, ev: RecycleRequested, now: float) -> None:
        w = self.workers.get(ev.wid)
        if w is None or self.stopping:
            return
        slot = self.slots.get(w.slot)
        if slot is None or slot.worker != w.wid or w.state != READY:
            return
        if slot.candidate is not None or slot.recycle_due is not None:
            return
        if slot.recycle_failures >= self.max_restarts:
            return
        detail = "".join(f", {k} {v}" for k, v in ev.info.items())
        self._log("info", f"{w.label()} {RECYCLE_WHY.get(ev.cause, ev.cause)}{detail}; starting its replacement first")
        self._note("recycle", w.wid, slot=slot.index, cause=ev.cause, **ev.info)
        self._spawn(slot, now, purpose="recycle")

    def _on_Leaving(self, ev: Leaving, now: float) -> None:
        w = self.workers.get(ev.wid)
        if w is None or w.state == DRAINING:
            return
        slot = self.slots.get(w.slot)
        self._log("info", f"{w.label()} got SIGTERM; draining it")
        self._note("leaving", w.wid)
        self._drain(w, now)
        if slot is None or self.stopping:
            return
        if slot.worker == w.wid:
            slot.worker = None
            if slot.candidate is not None:
                slot.worker, slot.candidate = slot.candidate, None
            else:
                slot.restarts += 1
                self._spawn(slot, now)
        elif slot.candidate == w.wid:
            slot.candidate = None

    def _on_Tick(self, ev: Tick, now: float) -> None:
        # timers of slots
        if not self.stopping:
            for slot in list(self.slots.values()):
                if slot.state == BACKOFF and now >= slot.due:
                    slot.state = move(SLOT_MOVES, slot.state, "due", f"slot {slot.index}")
                    slot.restarts += 1
                    self._spawn(slot, now)
                if (slot.recycle_due is not None and now >= slot.recycle_due and slot.candidate is None
                        and slot.worker is not None):
                    slot.recycle_due = None
                    w = self.workers[slot.worker]
                    if w.state == READY:
                        self._log("info", f"retrying recycle of {w.label()}")
                        self._spawn(slot, now, purpose="recycle")
            self._retry_given_up(now)
        # per-worker timers (a stop whose deadline passed kills everyone below: no SIGABRT first)
        stop_due = self.stopping and self.stop_deadline is not None and now >= self.stop_deadline
        for w in list(self.workers.values()):
            if w.killed:
                continue
            if w.state == SPAWNING and now - w.started >= self.ready_timeout:
                self._log("error", f"{w.label()} not READY after {fmt_secs(now - w.started)} "
                          f"(ready timeout {fmt_secs(self.ready_timeout)}); killing it")
                self._note("kill", w.wid, reason="ready_timeout")
                self._kill(w, signal.SIGKILL)
                if self.reloading and self.reload_wait == w.wid:
                    self.reloading = False
                    self.reload_wait = None
                    self._log("error", f"reload ABORTED: replacement worker {w.wid} never became READY; "
                              "old workers keep serving")
                    self._note("reload_aborted", w.wid, slot=w.slot, reason="ready_timeout",
                               generation=self.generation)
                continue
            if w.abort_at is not None:
                if now - w.abort_at >= ABORT_GRACE:
                    self._kill(w, signal.SIGKILL)       # its tracebacks are in the log by now
                continue
            if self.timeout > 0 and w.state in (READY, DRAINING) and not stop_due:
                beat = max(ev.beats.get(w.wid) or 0.0, w.ready_at or 0.0)
                if now - beat >= self.timeout:
                    self._log("error", f"{w.label()} hung: no heartbeat for {fmt_secs(now - beat)} "
                              f"(timeout {fmt_secs(self.timeout)}); SIGABRT for its tracebacks, "
                              f"SIGKILL in {fmt_secs(ABORT_GRACE)}")
                    self._note("kill", w.wid, reason="hung", silence=round(now - beat, 3))
                    self._kill(w, signal.SIGABRT)
                    w.abort_at = now
                    continue
            if (w.state == DRAINING and not self.stopping and w.drain_at is not None
                    and now - w.drain_at >= self.graceful_timeout):
                self._log("warning", f"{w.label()} still draining after {fmt_secs(now - w.drain_at)}; killing it")
                self._note("kill", w.wid, reason="drain_timeout")
                self._kill(w, signal.SIGKILL)
        # stop deadline
        if self.stopping and not self.killed_all and self.stop_deadline is not None and now >= self.stop_deadline:
            self.killed_all = True
            left = [w for w in self.workers.values() if not w.killed]
            if left:
                what = "graceful timeout" if self.graceful else "immediate stop"
                self._log("warning", f"{what}: killing {len(left)} worker(s) still running: "
                          + ", ".join(w.label() for w in left))
                for w in left:
                    self._note("kill", w.wid, reason="stop_timeout" if self.graceful else "stop")
                for w in left:
                    self._kill(w, signal.SIGKILL)

    def _on_Reload(self, ev: Reload, now: float) -> None:
        if self.stopping:
            self._log("warning", "reload ignored: stopping")
            return
        self.generation += 1
        for slot in self.slots.values():
            if slot.state == GAVE_UP:
                slot.state = move(SLOT_MOVES, slot.state, "revive", f"slot {slot.index}")
                slot.crashes = slot.boot_failures = 0
                slot.retry_at = None
                self._log("info", f"reload: slot {slot.index} had given up; trying it again")
                self._note("revive", slot=slot.index)
                self._spawn(slot, now)
            slot.recycle_failures = 0
        if self.reloading:
            self._log("info", f"reload requested again (generation {self.generation}); "
                      "workers started before it will be replaced too")
            return
        self.reloading = True
        self._log("info", f"reload (generation {self.generation}): replacing workers one at a time, oldest first")
        self._note("reload", generation=self.generation)
        self._reload_next(now)

    def _reload_next(self, now: float) -> None:
        todo = []
        for slot in self.slots.values():
            if slot.worker is None or slot.candidate is not None:
                continue
            w = self.workers[slot.worker]
            if w.state == READY and w.generation < self.generation:
                todo.append((w.started, w.wid, slot))
        if not todo:
            busy = [s.index for s in self.slots.values() if s.candidate is not None and s.worker is not None
                    and self.workers[s.worker].generation < self.generation]
            if busy:
                # a recycle is replacing these slots' workers: continue when it is done
                self.reload_wait = None
                return
            self.reloading = False
            self._log("info", f"reload complete (generation {self.generation})")
            self._note("reload_complete", generation=self.generation)
            return
        todo.sort(key=lambda t: (t[0], t[1]))
        slot = todo[0][2]
        cand = self._spawn(slot, now, purpose="reload")
        self.reload_wait = cand.wid
        self.reload_deadline = now + self.ready_timeout

    def _on_Scale(self, ev: Scale, now: float) -> None:
        if self.stopping:
            return
        n = max(1, min(ev.n, self.max_workers))
        cur = len(self.slots)
        if ev.n > self.max_workers:
            self._log("warning", f"cannot scale to {ev.n} workers: at most {self.max_workers} "
                      "(dispatcher capacity); restart with more --workers")
        if n == cur:
            return
        self._log("info", f"scaling from {cur} to {n} workers")
        self._note("scale", **{"from": cur, "to": n})
        if n > cur:
            free = [i for i in range(n + cur) if i not in self.slots]
            for i in free[: n - cur]:
                slot = SlotRec(index=i)
                self.slots[i] = slot
                self._spawn(slot, now)
            return
        # remove slots that serve nothing first, then the highest index
        not_running = [s for s in self.slots.values() if s.state != RUNNING]
        running = sorted((s for s in self.slots.values() if s.state == RUNNING), key=lambda s: -s.index)
        victims = (sorted(not_running, key=lambda s: -s.index) + running)[: cur - n]
        for slot in victims:
            del self.slots[slot.index]
            for wid in (slot.candidate, slot.worker):
                if wid is None:
                    continue
                w = self.workers[wid]
                self._drain(w, now)
                if self.reloading and self.reload_wait == wid:
                    self.reload_wait = None
                    self._reload_next(now)
            self._out.append(ReleaseSlot(slot.index))
        if self.slots and all(s.state == GAVE_UP for s in self.slots.values()):
            self._log("error", "every remaining worker slot has given up; stopping with exit code 3")
            self._begin_stop(now, graceful=True, code=3)

    def _on_Stop(self, ev: Stop, now: float) -> None:
        if self.stopping:
            if self.graceful and not ev.graceful:
                self._log("warning", "stopping at once")
                self._note("stop", graceful=False, workers=len(self.workers), code=self.exit_code)
                self.graceful = False
                self.stop_deadline = min(self.stop_deadline or now, now + IMMEDIATE_GRACE)
                for w in self.workers.values():
                    if not w.killed:
                        self._kill(w, signal.SIGQUIT)
                self._out.append(CloseListeners())
            return
        self._begin_stop(now, ev.graceful, ev.code)

    def _begin_stop(self, now: float, graceful: bool, code: int) -> None:
        self.stopping = True
        self.graceful = graceful
        self.exit_code = code
        self.reloading = False
        self.reload_wait = None
        n = len(self.workers)
        if graceful:
            self.stop_deadline = now + self.graceful_timeout
            self._log("info", f"graceful stop: no new connections; waiting up to {fmt_secs(self.graceful_timeout)} "
                      f"for {n} worker(s) to finish")
            self._note("stop", graceful=True, workers=n, code=code)
            self._out.append(StopAccepting())
        else:
            self.stop_deadline = now + IMMEDIATE_GRACE
            self._log("info", f"immediate stop of {n} worker(s)")
            self._note("stop", graceful=False, workers=n, code=code)
            for w in self.workers.values():
                self._kill(w, signal.SIGQUIT)
            self._out.append(CloseListeners())

    def _on_Drained(self, ev: Drained, now: float) -> None:
        if not self.stopping or self.drained:
            return
        self.drained = True
        if not self.graceful:
            return
        # The backlog queued before the stop is taken: a client from now on is refused.
        self._out.append(CloseListeners())
        for w in list(self.workers.values()):
            if w.state != DRAINING:
                self._drain(w, now)

    # ---- timers -------------------------------------------------------------------
    def next_deadline(self, now: float) -> Optional[float]:
        """Earliest time a Tick could act (the arbiter also ticks periodically for heartbeats)."""
        times = []
        for slot in self.slots.values():
            if slot.state == BACKOFF and not self.stopping:
                times.append(slot.due)
            # a cool-down already over waits for a READY worker (Ready retries it), not a timer
            if slot.state == GAVE_UP and slot.retry_at is not None and slot.retry_at > now and not self.stopping:
                times.append(slot.retry_at)
            if slot.recycle_due is not None:
                times.append(slot.recycle_due)
        for w in self.workers.values():
            if w.state == SPAWNING and not w.killed:
                times.append(w.started + self.ready_timeout)
            if w.abort_at is not None and not w.killed:
                times.append(w.abort_at + ABORT_GRACE)
        if self.stopping and self.stop_deadline is not None and not self.killed_all:
            times.append(self.stop_deadline)
        return min(times) if times else None

    def slot_of(self, wid: int) -> Optional[SlotRec]:
        w = self.workers.get(wid)
        return self.slots.get(w.slot) if w is not None else None
