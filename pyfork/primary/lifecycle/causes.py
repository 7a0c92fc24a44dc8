"""Why a worker exited, in plain words for the log (sans-IO: a table and one function).

Theory of operation: the arbiter reaps a worker and feeds ``Exited(wid, code, signal)``;
the lifecycle's log line says what that status most likely means, so an operator reading
"exited code=None signal=9" does not have to know that 9 is SIGKILL and that the OOM
killer sends it. A worker that dies of an exception prints its own traceback before it
exits (pyfork.worker.boot logs a failed app import and any uncaught error), so the hint
points there instead of repeating it.
"""

from __future__ import annotations

import signal
from typing import Optional

from pyfork.worker.runtime import EXIT_LOAD_ERROR

_NATIVE = "a crash in native code: a C extension or the interpreter"

# Signal -> the likely sender or reason (signal(7); the OOM killer sends SIGKILL, see
# the kernel's mm/oom_kill.c; `dmesg` or `journalctl -k` says when it did).
SIGNAL_HINTS = {
    signal.SIGKILL: "the OOM killer or an operator?",
    signal.SIGSEGV: _NATIVE,
    signal.SIGBUS: _NATIVE,
    signal.SIGILL: _NATIVE,
    signal.SIGFPE: _NATIVE,
    signal.SIGABRT: "abort(): a failed assertion or a fatal error in native code",
    signal.SIGTERM: "sent by someone else before the worker installed its handler",
    signal.SIGINT: "sent by someone else before the worker installed its handler",
    signal.SIGQUIT: "an immediate stop",
    signal.SIGPIPE: "wrote to a closed pipe",
    signal.SIGXCPU: "over its CPU time limit, RLIMIT_CPU",
    signal.SIGXFSZ: "over its file size limit, RLIMIT_FSIZE",
}

# Exit code -> what the worker meant by it (pyfork.worker.runtime's codes).
EXIT_HINTS = {
    0: "it stopped by itself",
    1: "an uncaught error or sys.exit(1); a traceback, if any, is in the log above",
    EXIT_LOAD_ERROR: "the app, its post_fork hook or its interface failed to load; traceback in the log above",
}


def describe_exit(code: Optional[int], sig: Optional[int], killed_by_pyfork: bool = False) -> str:
    """``killed by SIGKILL (the OOM killer or an operator?)``, ``exit code 4 (...)`` and so on."""
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        if killed_by_pyfork and sig == signal.SIGKILL:
            hint = "sent by pyfork, reason above"
        else:
            hint = SIGNAL_HINTS.get(sig, "a signal it does not handle")
        return f"killed by {name} ({hint})"
    if code is None:
        return "never started (fork failed, reason above)"
    hint = EXIT_HINTS.get(code)
    return f"exit code {code}" + (f" ({hint})" if hint else "")
