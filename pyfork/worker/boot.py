"""The child's start-up: from the fork in the arbiter to ``interface.serve``.

Theory of operation. The arbiter builds a ``WorkerSpec`` just before it forks
(inside ``spawn_worker``) and calls ``main(spec)`` in the child, which never
returns: it ends in ``os._exit``, as CPython's forkserver children do, so no
primary-side atexit/finalizer runs twice. ``main``:

1. fork hygiene (``_hygiene``): clear the wakeup fd and the primary's signal
   handlers; close every fd the primary opened after it started (sibling
   channels, the held peer ends, the dispatcher's epoll, the control socket,
   accepted fds pending in the primary) except this worker's channel and its
   listeners (every policy: rr/least accept on them during a pull); PR_SET_PDEATHSIG(SIGKILL) then a
   getppid() check, so a worker never outlives its primary (channel EOF is the
   second line of defence). Before the primary's listeners are closed their
   address family is read once: when they all share one, the Worker builds the
   sockets it is handed with that family instead of asking the kernel per fd;
2. signals (``_install_signals``): SIGTERM asks the primary to drain us,
   SIGQUIT exits at once, SIGINT/SIGHUP/SIGTTIN/SIGTTOU are ignored (Ctrl-C and
   job control hit the whole process group; the primary orchestrates); the
   scheduling class the primary started with (it runs SCHED_BATCH, pyfork.primary.sched);
3. the user's ``post_fork(worker)`` hook, then the app import (a failure is
   logged with its traceback and exits with code 4 before READY, which the
   primary counts as a rapid crash), then the interface lookup;
4. ``interface.serve(app, runtime)``; READY goes over the channel when the
   interface first asks for connections (its setup, e.g. the ASGI lifespan
   startup, is done by then), or when it calls ``rt.ready()``.

The runtime itself (``Worker``, ``current()``) lives in pyfork.worker; this
module only gets a child from the fork to its interface.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import signal
import socket
import traceback
from typing import List, Optional

from pyfork.primary import hygiene, sched
from pyfork.worker import hangreport
from pyfork.worker import hooks as worker_hooks
from pyfork.worker.runtime import EXIT_LOAD_ERROR, EXIT_ORPHANED, Worker, flush_output, set_current

log = logging.getLogger("pyfork.worker")

PR_SET_PDEATHSIG = 1

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


class WorkerSpec:
    """Everything the child needs, built by the arbiter just before fork."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _open_fds() -> List[int]:
    try:
        return [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:  # pragma: no cover - no /proc
        return list(range(3, 1024))


def _listener_family(fds) -> Optional[int]:
    """The address family every listener in ``fds`` shares, or None (none, or mixed)."""
    families = set()
    for fd in fds:
        try:
            probe = socket.socket(fileno=fd)
        except OSError:
            return None
        try:
            families.add(int(probe.family))
        finally:
            probe.detach()
    return families.pop() if len(families) == 1 else None


def _hygiene(spec) -> Optional[int]:
    """Fork hygiene (see the module docstring). Returns the listeners' shared family."""
    # 1. signals: the primary's handlers and its wakeup fd must not fire here.
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    for sig in spec.primary_signals:
        signal.signal(sig, signal.SIG_DFL)
    # The primary runs SCHED_BATCH (pyfork.primary.sched); the app runs as the user started it.
    sched.restore_after_fork()
    # Every connection this worker gets was accepted on one of these (the primary's, or
    # for reuseport our own): read their family while they are open.
    family = _listener_family(spec.listeners or spec.listener_fds)
    # 2. fds: everything the primary opened since it started, except ours.
    keep = {0, 1, 2, spec.chan, *spec.listeners}
    close = (set(_open_fds()) - set(spec.baseline_fds)) | set(spec.primary_fds)
    for fd in sorted(close - keep):
        try:
            os.close(fd)
        except OSError:
            pass
    # --user/--group: before any user code, and before PR_SET_PDEATHSIG, which a
    # change of credentials clears (pyfork.primary.hygiene).
    if getattr(spec, "run_as", None) is not None:
        hygiene.drop_privileges(*spec.run_as)
    if getattr(spec, "title", None):
        hygiene.set_title(spec.title)
    # 3. die with the primary: PR_SET_PDEATHSIG, then close the race where it
    # died between fork() and prctl() (we would already be reparented).
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != spec.primary_pid:
        os._exit(EXIT_ORPHANED)
    return family


def preload(interface) -> None:
    """Primary side, once before the first fork: the interface module's `preload()`, when it
    has one, imports what each of its workers would import after the fork, so the workers
    share those pages (copy-on-write) instead of each holding a private copy. A failure
    here is not the primary's: the worker that needs the module reports it."""
    pre = getattr(interface, "preload", None)
    if pre is None:
        return
    try:
        pre()
    except Exception as e:  # noqa: BLE001 - optional saving; workers import (and report) anyway
        log.debug("preload for %s skipped: %r", getattr(interface, "NAME", interface), e)


def freeze_before_fork() -> None:
    """Primary side, just before each fork: gc.freeze() moves every object the primary
    holds to the collector's permanent generation, in the primary and so in the child.

    Why: a full collection in a worker walks every object it tracks and writes to each
    one's GC header, so the first one copies every inherited page that holds an object:
    the pages preload() and the primary's imports share become the worker's own. Measured
    (2 workers, wrk -c32 `Connection: close`): the demo over ASGI after 30,000 requests,
    worker USS 9.3 -> 5.3 MB; the bench app after 60,000, 12.6 -> 5.7 MB on uvloop and
    12.8 -> 6.4 MB on asyncio's loop; after 2,000 requests (no full collection yet), and
    for WSGI (no cyclic garbage, so no full collection), it changes nothing. Frozen objects
    are never collected in the primary either: what is garbage there at the fork stays, a
    small one-off (the primary's loop runs in C and makes little). Python's gc docs
    recommend this before fork for the same reason."""
    gc.freeze()


def _install_signals(w: Worker) -> None:
    r, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    w.use_wakeup_pipe(r, wfd)

    def on_term(signum, frame):   # only records; tick() acts
        w.note_sigterm()

    def on_quit(signum, frame):
        os._exit(0)

    def ignore(signum, frame):
        pass

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGQUIT, on_quit)
    # No-op handlers rather than SIG_IGN: handlers reset to default across exec,
    # so subprocesses the app runs still get Ctrl-C normally.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, ignore)
    signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)


def _resolve_interface(app, name):
    import pyfork.serve
    return pyfork.serve.resolve(app, name)


def _boot(spec) -> int:
    family = _hygiene(spec)
    w = Worker(wid=spec.wid, slot=spec.slot, chan=spec.chan, backend=spec.backend, board_slot=spec.board_slot,
               policy=spec.policy, listeners=spec.listeners, max_requests=spec.max_requests,
               primary_pid=spec.primary_pid, conn_family=family)
    set_current(w)
    _install_signals(w)
    worker_hooks.set_worker_abort(getattr(spec, "worker_abort", None))
    # SIGABRT report (then the worker_abort hook), SIGUSR1 reopen
    hangreport.install(w.id, w.pid, spec.board_slot, abort_hook=lambda: worker_hooks.run_worker_abort(w))
    spec.board_slot.set_pid(w.pid)
    w.say_online()
    where = f"worker {w.id} (pid {w.pid})"
    if spec.post_fork is not None:
        try:
            spec.post_fork(w)
        except Exception:
            log.error("%s: post_fork hook failed:\n%s", where, traceback.format_exc().rstrip())
            return EXIT_LOAD_ERROR
    app = spec.target
    if isinstance(app, str):
        from pyfork import applib
        try:
            app = applib.load_app(app)
        except applib.AppImportError as e:
            cause = e.__cause__
            tb = "".join(traceback.format_exception(cause)).rstrip() if cause is not None else ""
            log.error("%s: %s%s", where, e, ("\n" + tb) if tb else "")
            return EXIT_LOAD_ERROR
    try:
        iface = _resolve_interface(app, spec.interface)
    except Exception:
        log.error("%s: no interface for the app:\n%s", where, traceback.format_exc().rstrip())
        return EXIT_LOAD_ERROR
    # What the dispatcher may send us at once (before READY, which the interface sends).
    # An app may declare its own, as it may declare its interface (pyfork.embed.worker_body).
    declared = getattr(app, "pyfork_capacity", None)
    w.set_capacity(declared if isinstance(declared, int) and declared >= 1 else iface.CAPACITY)
    # READY goes out when the interface first asks for connections (Worker.ready()).
    spec.board_slot.heartbeat()
    iface.serve(app, w)
    return 0


def main(spec) -> None:
    """Child entry point; never returns."""
    code = 1
    try:
        code = _boot(spec)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        try:
            log.error("worker %s (pid %d) died:\n%s", getattr(spec, "wid", "?"), os.getpid(),
                      traceback.format_exc().rstrip())
        except BaseException:
            pass
        code = 1
    finally:
        flush_output()
        os._exit(code)
