"""What the kernel knows about a worker, read by the primary at no cost to the worker.

Theory of operation: /proc/<pid>/stat holds a process's CPU time (utime, stime, in
clock ticks) and resident set size (in pages); one read() per worker per status or
scrape. A process that is gone reads as None (its CPU time is folded in from wait4's
rusage when it is reaped: pyfork.primary.tally).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_and_rss(pid: int) -> Optional[Tuple[float, int]]:
    """(CPU seconds user+system, RSS bytes) of ``pid``, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data.rsplit(b")", 1)[-1].split()
    try:
        # proc(5): utime=14, stime=15, rss=24; fields[0] here is field 3 (state).
        cpu = (int(fields[11]) + int(fields[12])) / _TICKS
        rss = int(fields[21]) * _PAGE
    except (IndexError, ValueError):
        return None
    return cpu, rss
