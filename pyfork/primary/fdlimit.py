"""The primary's file descriptor limit: raise RLIMIT_NOFILE's soft limit to the hard limit.

Theory of operation: every open connection costs an fd in the worker that serves it (and,
for a moment, in the primary that accepted it), and distributions still start services
with a soft limit of 1024, which a chat or long-poll app passes at a thousand clients.
The hard limit is the administrator's choice; the soft one is only a default. So the
primary raises soft to hard once at start, as nginx's worker_rlimit_nofile and Node
(src/node.cc, at startup) do, and workers inherit it through fork. A hard limit of
RLIM_INFINITY is capped at fs.nr_open, the most setrlimit accepts for NOFILE.
Running out anyway is handled where it happens: accept() on EMFILE pauses instead of
spinning (csrc/dispatch_loop.c, pyfork.worker.runtime.Acceptor).
"""

from __future__ import annotations

import resource
from typing import NamedTuple

NR_OPEN_PATH = "/proc/sys/fs/nr_open"
NR_OPEN_FALLBACK = 1 << 20     # the kernel's default fs.nr_open


class NoFile(NamedTuple):
    before: int     # the soft limit found at start
    soft: int       # the soft limit now
    hard: int       # the hard limit (RLIM_INFINITY shown as fs.nr_open)

    def as_dict(self) -> dict:
        return {"before": self.before, "soft": self.soft, "hard": self.hard}


def _nr_open() -> int:
    try:
        with open(NR_OPEN_PATH) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return NR_OPEN_FALLBACK


def raise_nofile() -> NoFile:
    """Raises the soft RLIMIT_NOFILE to the hard limit; returns what it found and did.
    Never raises: a refusal (a container's seccomp policy, say) leaves the limit as it is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    before = _nr_open() if soft == resource.RLIM_INFINITY else soft
    if before >= target:
        return NoFile(before, before, target)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError):
        return NoFile(before, before, target)
    return NoFile(before, target, target)
