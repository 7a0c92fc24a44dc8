"""Worker and slot states, their moves as data, the records the policy keeps, the timing math.

Theory of operation (h11's ``_state.py``, s6-supervise): every state change of a worker
or a slot goes through ``move(table, state, what, label)``; the tables below list every
allowed move, so an undefined one raises ``LifecycleError`` instead of being silently
ignored. ``WorkerRec`` and ``SlotRec`` are the policy's records of one forked process and
of one of the N positions the primary keeps filled. ``backoff_delay`` is the respawn
delay after a rapid exit; ``fmt_secs``/``fmt_ms``/``fmt_dur`` print durations the way the
policy's log lines show them. pyfork.primary.lifecycle.Lifecycle drives all of this; pyfork.primary.lifecycle
re-exports every name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# ---- states -----------------------------------------------------------------
SPAWNING, READY, DRAINING, EXITED = "spawning", "ready", "draining", "exited"
RUNNING, BACKOFF, GAVE_UP = "running", "backoff", "gave_up"

# Worker moves: (state, what happened) -> new state.
WORKER_MOVES = {
    (SPAWNING, "ready"): READY,
    (SPAWNING, "drain"): DRAINING,   # stop or scale-down while still importing
    (SPAWNING, "exit"): EXITED,      # a boot failure: counts toward max_restarts
    (READY, "drain"): DRAINING,
    (READY, "exit"): EXITED,         # died while serving: always respawned, never a give-up
    (DRAINING, "ready"): DRAINING,   # told to drain before it said READY
    (DRAINING, "drain"): DRAINING,
    (DRAINING, "exit"): EXITED,
}

# Slot moves: (state, what happened) -> new state.
#
# Only a *boot failure* (an exit before READY: the app does not import, a hook
# raises, it hangs past ready_timeout) can make a slot give up: that is a bug a
# respawn cannot fix, and gunicorn also halts on worker boot errors. A worker
# that reached READY and then died (the OOM killer, an operator's kill -9, a
# request of death) is always respawned, as gunicorn, Node's cluster docs and
# systemd's Restart=always do: giving up there turns outside kills into an
# outage (issue 11: 16 SIGKILLs in 10 s under load made pyfork exit 3). Its
# only brake is the backoff when it lived less than min_uptime (PM2's
# min_uptime + exp_backoff_restart_delay), so a request of death that kills
# every new worker at once still cannot become a fork bomb.
SLOT_MOVES = {
    (RUNNING, "stable_exit"): RUNNING,   # READY worker lived >= min_uptime: respawn now, k = 0
    (RUNNING, "rapid_exit"): BACKOFF,    # READY worker lived < min_uptime: respawn after min(base*2^k, cap)
    (RUNNING, "boot_failure"): BACKOFF,  # exit before READY: the same backoff, counted toward max_restarts
    (RUNNING, "give_up"): GAVE_UP,       # max_restarts boot failures in a row
    (BACKOFF, "due"): RUNNING,
    (GAVE_UP, "cooled_down"): RUNNING,   # give_up_cooldown passed while another slot serves: retry
    (GAVE_UP, "revive"): RUNNING,        # HUP gives a given-up slot another chance at once
    (BACKOFF, "revive"): BACKOFF,
    (RUNNING, "revive"): RUNNING,
}

# Backoff constants. base 0.1 s doubling with a 10 s cap: the article's
# production cluster backs off 200 ms, 400 ms, 800 ms ... after rapid crash
# #1, #2, #3 (Math.pow(2, count) * 100); systemd's RestartSec/StartLimit and
# s6-supervise's one-second minimum between respawns bound the same loop. The
# cap keeps a slot that crashes for a while from waiting minutes once fixed.
BACKOFF_BASE = 0.1
BACKOFF_CAP = 10.0
# A slot that gave up while other slots serve tries again after this many
# seconds, from scratch (systemd refuses starts past StartLimitBurst= only until
# StartLimitIntervalSec= has passed; supervisord's FATAL, which stays dead, is
# what issue 11 saw as an outage). A minute keeps a broken app to a few forks
# and tracebacks per minute. When every slot has given up the primary exits
# with code 3 instead (nothing serves; a supervisor such as systemd takes over).
GIVE_UP_COOLDOWN = 60.0
# After QUIT (immediate stop) workers get SIGQUIT; stragglers get SIGKILL after
# this many seconds (gunicorn escalates the same way, after its own timeout).
IMMEDIATE_GRACE = 2.0

# A hung worker gets SIGABRT first (it writes every thread's traceback: pyfork.worker.hangreport)
# and SIGKILL this many seconds later. faulthandler writes at once, from C; the rest lets
# the Python handler name the stuck request (gunicorn's sync worker also gets SIGABRT on
# timeout, then SIGKILL from its arbiter's next murder pass).
ABORT_GRACE = 2.0


class LifecycleError(RuntimeError):
    """An event that makes no sense in the current state (a bug in the caller)."""


def backoff_delay(k: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Delay before respawning after rapid exit number ``k`` (1-based): min(base*2^k, cap)."""
    if k <= 0:
        return 0.0
    if k > 64:  # 2**k overflows floats long after the cap is reached
        return cap
    return min(base * (2 ** k), cap)


# ---- records ------------------------------------------------------------------
@dataclass
class WorkerRec:
    wid: int
    slot: int
    generation: int
    started: float
    pid: Optional[int] = None
    state: str = SPAWNING
    ready_at: Optional[float] = None
    drain_at: Optional[float] = None
    purpose: str = "serve"          # serve | reload | recycle
    killed: bool = False
    abort_at: Optional[float] = None  # hung: when it got SIGABRT (SIGKILL follows ABORT_GRACE later)

    def label(self) -> str:
        return f"worker {self.wid} (pid {self.pid})"


@dataclass
class SlotRec:
    index: int
    state: str = RUNNING
    worker: Optional[int] = None     # wid serving this slot
    candidate: Optional[int] = None  # wid of its replacement, not READY yet
    crashes: int = 0                 # rapid exits in a row, boot failures included (k of the backoff)
    boot_failures: int = 0           # exits before READY in a row (toward max_restarts)
    due: float = 0.0                 # BACKOFF: when to respawn
    retry_at: Optional[float] = None  # GAVE_UP: when to try again (None: only on HUP)
    restarts: int = 0                # respawns so far (for status)
    recycle_failures: int = 0
    recycle_due: Optional[float] = None


def move(table, state: str, what: str, label: str) -> str:
    try:
        return table[(state, what)]
    except KeyError:
        raise LifecycleError(f"{label}: no move for {what!r} in state {state!r}") from None


# ---- how log lines show durations ---------------------------------------------
def fmt_secs(x: float) -> str:
    return f"{x:.1f} s"


def fmt_dur(x: float) -> str:
    return fmt_ms(x) if x < 1.0 else fmt_secs(x)


def fmt_ms(x: float) -> str:
    return f"{int(round(x * 1000))} ms"
