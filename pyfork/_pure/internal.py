"""The pure backend's internals shared by its modules (csrc/pf_internal.h).

Theory of operation: as in C, a dispatcher is one state object whose tables
are sized at creation (``State``, struct pf_dispatcher), and the code over it
is split by job into module-level functions that take it as their first
argument, named after the C ones:
  dispatch.py       the Dispatcher class: lifetime and the table API (dispatch.c);
  dispatch_send.py  flush, mark_gone, clear_retry, chan_events (dispatch_send.c);
  dispatch_loop.py  run: epoll, accept triage, EMFILE, credits, drain (dispatch_loop.c).
What more than one module needs lives here under plain names: the state and
its per-worker and per-listener records, the poll masks and timers, and the
fd helpers every _pure module uses. Nothing here is public API: the
backend's names are those of pyfork/_pure/__init__.py.
"""

import errno
import os
import select
import socket
from collections import deque

from pyfork._api import STATE_FREE

# While fds wait for a worker, re-check this often even without a CREDIT: a
# worker written against the raw protocol may never send one, and a close can
# race the want_credit flag. 100 wakeups/s while stalled is not a spin.
RECHECK_S = 0.010
# least: a request running this long counts as one more connection in flight
# (PF__LEAST_AGE_MS in csrc/pf_internal.h, where the number is explained).
LEAST_AGE_NS = 5_000_000
# Prefetch with take-back (PF__PREFETCH_MAX / _US, PF__TAKEBACK_US, PF__RESCUE_US in
# csrc/pf_internal.h, where the numbers are explained): when no worker can start one, up to
# PREFETCH_MAX may wait behind a request younger than PREFETCH_NS (or an idle worker's next
# one); they are taken back once that request is TAKEBACK_NS old, or RESCUE_NS when another
# worker would start them sooner.
PREFETCH_MAX = 8
PREFETCH_NS = 500_000
TAKEBACK_NS = 1_000_000
RESCUE_NS = 250_000
TAKEBACK_IDLE_NS = 10_000_000    # PF__TAKEBACK_IDLE_US: an idle worker that does not read

EPOLLIN = select.EPOLLIN
BLK_NONE, BLK_OUT, BLK_RETRY = 0, 1, 2      # why a READY worker is skipped (PF__BLK_*)
CHAN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP  # a channel's poll mask (+EPOLLOUT when busy)


# ---- fd helpers ---------------------------------------------------------------

def oserror(code):
    """The OSError the C core's -code becomes (BrokenPipeError for EPIPE, ...)."""
    return OSError(code, os.strerror(code))


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def wrap_fd(fd, family=-1, type=-1):
    """A socket object over an existing fd that behaves like the raw fd: no
    timeout, so Python neither changes O_NONBLOCK nor polls before a call,
    whatever socket.setdefaulttimeout() an application set (with a default
    timeout a full channel would block the loop instead of EAGAIN). Known
    family/type skip the getsockname/getsockopt probes."""
    proto = -1 if family == -1 else 0
    if socket.getdefaulttimeout() is None:
        return socket.socket(family, type, proto, fileno=fd)
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(None)
    try:
        return socket.socket(family, type, proto, fileno=fd)
    finally:
        socket.setdefaulttimeout(saved)


def borrow_fd(fd):
    """A socket object over fd that does not own it: callers must detach()."""
    if fd < 0:
        raise oserror(errno.EBADF)  # as the syscall on -1 in C
    # A wrong family guess only matters for address calls we never make.
    return wrap_fd(fd, socket.AF_UNIX, socket.SOCK_SEQPACKET)


# ---- the dispatcher's state (struct pf_dispatcher) ------------------------------------

class Worker:
    """One slot of the worker table (pf__worker)."""

    __slots__ = ("chan", "peer", "sock", "psock", "state", "blocked", "in_epoll",
                 "out_armed", "hup_pending", "sent", "behind", "idle_seen_ns", "barred_since",
                 "asked", "idle_mark")

    def __init__(self):
        self.reset()

    def reset(self):
        self.chan = self.peer = -1      # primary end (in epoll while not GONE), kept worker end
        self.sock = self.psock = None   # socket objects over chan and peer
        self.state = STATE_FREE
        self.blocked = BLK_NONE
        self.in_epoll = self.out_armed = self.hup_pending = False
        self.sent = 0                   # fds sent since add_worker
        self.behind = False             # prefetched connections may wait in its channel
        self.idle_seen_ns = 0           # take-back scan first saw it idle with some queued
        self.barred_since = None        # taken back from: no prefetch while busy_since is this
        self.asked = False              # we set its want_credit since the last forget_credits
        self.idle_mark = 0              # pulling: 1 + handled + taken + accepted when last seen idle


class Listener:
    """One listener (pf__listener)."""

    __slots__ = ("fd", "sock", "tcp", "nodelay_each", "in_poll", "at_eagain", "dead")

    def __init__(self, fd, sock, tcp, nodelay_each):
        self.fd, self.sock, self.tcp, self.nodelay_each = fd, sock, tcp, nodelay_each
        # in the poll set; stop_accepting found its backlog empty; accept
        # said EBADF/EINVAL/ENOTSOCK (never polled again)
        self.in_poll = self.at_eagain = self.dead = False


class State:
    """Everything one dispatcher has, sized at creation from its checked
    pyfork._api.DispatcherConfig. dispatch.py's Dispatcher fills in the OS
    resources (epoll, the scoreboard mapping, the reserve fd)."""

    __slots__ = (
        "cfg", "least", "pause_s", "ep", "reserve", "reserve_wanted", "map", "view", "board",
        "slots", "workers", "by_chan", "hi", "n_ready", "rr_next", "n_hup", "listeners",
        "watches", "pend", "accepting", "stopping", "pull_on", "pulling", "pull_look_at", "drained",
        "drained_unreported",
        "more", "pause_until", "recheck_at", "n_behind", "takeback_at", "rescue_wait", "n_asked",
        "out", "st", "park")

    def __init__(self, cfg, least):
        self.cfg = cfg
        self.least = least
        self.pause_s = cfg.emfile_pause_ms / 1000.0
        self.ep = None              # select.epoll
        self.reserve = -1           # /dev/null, spent to accept one connection on EMFILE
        self.reserve_wanted = False  # reopen it when spent (only if it opened once)
        self.map = self.view = self.board = None  # MAP_SHARED scoreboard and its views
        self.slots = []             # scoreboard.SlotView per slot
        self.workers = [Worker() for _ in range(cfg.capacity)]
        self.by_chan = {}           # chan fd -> slot
        self.hi = 0                 # slots >= hi were never used: scans stop there
        self.n_ready = 0
        self.rr_next = 0
        self.n_hup = 0              # workers owed a HANGUP event
        self.listeners = []         # [Listener], order as in C (swap-remove)
        self.watches = []           # [[fd, tag]]
        self.pend = deque()         # deque of (fd, recovered), at most max_pending
        self.accepting = True       # listeners are (wanted) in the poll set
        self.stopping = False       # stop_accepting was called
        self.pull_on = False        # set_pull: the workers can pull
        self.pulling = False        # pull set on the workers' lines: they accept, we do not
        self.pull_look_at = 0.0     # pulling: the next look at whether it is still needed
        self.drained = False        # ... and the final pass is done
        self.drained_unreported = False
        self.more = False           # a drain pass or parked ones have work left: poll, no sleep
        self.pause_until = 0.0      # EMFILE pause end (monotonic s), 0 = none
        self.recheck_at = 0.0       # BLK_RETRY flags clear then, 0 = none
        self.n_behind = 0           # workers with behind set
        self.takeback_at = 0.0      # earliest take-back due (monotonic s), 0 = none
        self.rescue_wait = False    # take_back_due left a prefetched one waiting for a CREDIT
        self.n_asked = 0            # workers with asked set
        self.out = None             # the run call's event list
        self.st = dict.fromkeys(("accepted", "dispatched", "redispatched", "busy_skips",
                                 "fd_exhaustion", "accept_errors", "dropped", "wakeups",
                                 "parks", "unparks", "park_closed", "pulls"), 0)
        self.park = None            # park.Parking once set_parking sized it


def find_listener(d, fd):
    for lst in d.listeners:
        if lst.fd == fd:
            return lst
    return None


def unregister(d, fd):
    """Takes fd out of the poll set; one the caller closed already is gone
    from it by itself."""
    try:
        d.ep.unregister(fd)
    except (OSError, ValueError):
        pass
