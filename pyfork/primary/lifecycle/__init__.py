"""The worker lifecycle: a sans-IO state machine (no fork, no kill, no clock).

  events.py   the events the arbiter feeds in and the actions it gets back
  states.py   worker and slot states, the move tables, records, backoff math
  causes.py   what an exit code or a signal most likely means, for the log
  machine.py  ``Lifecycle.handle(event, now) -> [actions]``

Every public name is importable from ``pyfork.primary.lifecycle``.
"""

from pyfork.primary.lifecycle.events import (
    Activate, CloseListeners, Drain, Drained, Exit, Exited, Forked, Kill, Leaving, Log, RecycleRequested, Ready,
    ReleaseSlot, Reload, Scale, Spawn, Start, Stop, StopAccepting, Tick,
)
from pyfork.primary.lifecycle.causes import describe_exit
from pyfork.primary.lifecycle.machine import Lifecycle
from pyfork.primary.lifecycle.states import (
    ABORT_GRACE, BACKOFF, BACKOFF_BASE, BACKOFF_CAP, DRAINING, EXITED, GAVE_UP, GIVE_UP_COOLDOWN, IMMEDIATE_GRACE, READY,
    RUNNING, SLOT_MOVES, SPAWNING, WORKER_MOVES, LifecycleError, SlotRec, WorkerRec, backoff_delay, move,
)

__all__ = [
    "Lifecycle", "Activate", "CloseListeners", "Drain", "Drained", "Exit", "Exited", "Forked", "Kill", "Leaving",
    "Log", "RecycleRequested", "Ready", "ReleaseSlot", "Reload", "Scale", "Spawn", "Start", "Stop",
    "StopAccepting", "Tick", "ABORT_GRACE", "BACKOFF", "BACKOFF_BASE", "BACKOFF_CAP", "DRAINING", "EXITED",
    "GAVE_UP", "GIVE_UP_COOLDOWN", "IMMEDIATE_GRACE", "READY", "RUNNING", "SLOT_MOVES", "SPAWNING",
    "WORKER_MOVES", "LifecycleError", "SlotRec", "WorkerRec", "backoff_delay", "describe_exit", "move",
]
