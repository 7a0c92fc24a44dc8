"""The primary's CPU scheduling class: SCHED_BATCH, so that accepting never
preempts a busy worker.

Why: with every core busy (a saturating `Connection: close` load), a normally
scheduled primary that slept in epoll_wait preempts a worker the moment a
connection arrives, accepts one or two, sends them and sleeps again: two
context switches per wake-up, about half a wake-up per connection, and it is
the biggest part of the primary's cost per connection. Under SCHED_BATCH
(sched(7): "mildly disfavored in scheduling decisions", i.e. no wake-up
preemption) it runs when a core is free or a time slice ends, and then takes
the whole backlog in one pass: measured here, half the primary CPU per
connection and more requests/s (bench/README.md). With an idle core it still
runs at once, so latency at light load does not change; its share of CPU
(weight of nice 0) does not change either.

Workers get the scheduling class the primary started with back right after
fork (SCHED_BATCH is inherited, and the app's code should run as the user
launched it). Only a primary that started as SCHED_OTHER is changed: one run
under chrt (batch, idle, a real-time class) is left as it is. PYFORK_PRIMARY_SCHED
=normal turns this off.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("pyfork.arbiter")

ENV = "PYFORK_PRIMARY_SCHED"

_restore_in_child = None   # the policy a forked worker goes back to, or None


def primary_batch() -> bool:
    """Puts the calling (primary) process under SCHED_BATCH; True if it did."""
    global _restore_in_child
    wanted = os.environ.get(ENV, "batch")
    if wanted not in ("batch", "normal"):
        raise ValueError(f"{ENV} must be batch or normal, not {wanted!r}")
    if wanted == "normal" or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as e:   # a seccomp'd or exotic kernel: run as we are
        log.info("could not switch the primary to SCHED_BATCH (%s); running as SCHED_OTHER", e)
        return False
    _restore_in_child = os.SCHED_OTHER
    return True


def restore_after_fork() -> None:
    """In a forked worker: the scheduling class the primary started with."""
    if _restore_in_child is not None:
        try:
            os.sched_setscheduler(0, _restore_in_child, os.sched_param(0))
        except OSError:
            pass


def primary_normal() -> None:
    """Undoes primary_batch() (for a Cluster run embedded in a longer-lived process)."""
    global _restore_in_child
    if _restore_in_child is not None:
        restore_after_fork()
        _restore_in_child = None
