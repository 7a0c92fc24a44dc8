"""The primary's signal inbox: handlers that only record, and the pipe that wakes the loop.

Theory of operation (CPython's forkserver, gunicorn's arbiter; STYLE.md principle 8): a
signal handler appends the signal to a queue (SIGCHLD only raises a flag) and returns.
``signal.set_wakeup_fd`` makes the interpreter write a byte to our pipe on every signal;
the dispatcher watches the read end, so its blocking ``run()`` returns and the arbiter's
loop does the work. ``poke()`` writes the same byte for requests made from other threads
(Cluster.reload(), the control socket). The pipe is non-blocking on both ends: a full
pipe already means "wake up", so a failed write loses nothing.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from typing import Dict, Iterable

MAX_QUEUED = 32   # a signal storm beyond this adds nothing: the loop handles one of each kind


class Wakeup:
    """Owns the wakeup pipe, the queue of recorded signals and the handlers it replaced."""

    def __init__(self):
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.signals: deque = deque()   # recorded, not yet handled (never SIGCHLD)
        self.chld = False               # SIGCHLD (or a channel hangup): reap soon
        self._old_handlers: Dict[int, object] = {}
        self._old_wakeup = -1

    def _on_signal(self, signum, frame) -> None:
        # Only records (STYLE.md principle 8); the loop does the work.
        if signum == signal.SIGCHLD:
            self.chld = True
        elif len(self.signals) < MAX_QUEUED:
            self.signals.append(signum)

    def install(self, signums: Iterable[int]) -> None:
        for sig in signums:
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        self._old_wakeup = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)

    def restore(self) -> None:
        """Puts back the handlers and the wakeup fd that install() replaced."""
        if not self._old_handlers:
            return
        try:
            signal.set_wakeup_fd(self._old_wakeup if self._old_wakeup is not None else -1)
        except (ValueError, OSError):
            signal.set_wakeup_fd(-1)
        for sig, h in self._old_handlers.items():
            try:
                signal.signal(sig, h if h is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._old_handlers = {}

    def drain(self) -> None:
        """Empties the pipe (the bytes carry no information)."""
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def poke(self) -> None:
        if self.w >= 0:
            try:
                os.write(self.w, b"\0")
            except OSError:
                pass

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1
