"""What both dispatch backends share: messages, events, argument checks, the public names.

Theory of operation: pyfork._core (the C core through cffi) and pyfork._pure
(its pure-Python twin) are two implementations of one interface, and
pyfork.backend hands out either. What that interface is, as opposed to how
each side implements it, lives here once:
  - the wire and state constants of csrc/pyfork.h (the C binding checks at
    import that its compiled core has the same values);
  - the Message and Event tuples both sides return;
  - the checks of Python arguments, so a bad one is the same ValueError with
    the same words on both sides, and the dispatcher's limits (those of
    pf__config_ok in csrc/dispatch.c);
  - the accept(2) errno classes that csrc/dispatch_loop.c switches on, for the
    pure loop and for a worker that accepts for itself;
  - PUBLIC_NAMES: every backend's ``__all__``, and nothing more is public on
    either (tests/test_backend_api.py holds both to it).
Standard library only, so pyfork.scoreboard can use it without loading a backend.
"""

import errno
import operator
import resource
from typing import NamedTuple

# ---- csrc/pyfork.h ----------------------------------------------------------

MAX_FDS = 32            # PF_MAX_FDS: fds per message (batching limit)
MAX_PAYLOAD = 65536     # PF_MAX_PAYLOAD: bytes after the header
MSG_CONN, MSG_READY, MSG_CREDIT, MSG_DRAIN, MSG_USER, MSG_CTL, MSG_PARK = 1, 2, 3, 4, 5, 6, 7
STATE_FREE, STATE_SPAWNING, STATE_READY, STATE_DRAINING, STATE_GONE = 0, 1, 2, 3, 4
SLOT_SIZE = 256         # sizeof(pf_slot): four cache lines per worker slot (the first is all dispatch reads)
U32_MAX = 0xFFFFFFFF

PUBLIC_NAMES = (
    "BACKEND", "MAX_FDS", "MAX_PAYLOAD", "SLOT_SIZE", "Message", "Event", "Dispatcher",
    "send_msg", "recv_msg", "Receiver", "SlotWriter", "tcp_cork",
    "listen_tcp", "listen_unix", "adopt_listener",
    "MSG_CONN", "MSG_READY", "MSG_CREDIT", "MSG_DRAIN", "MSG_USER", "MSG_CTL", "MSG_PARK",
    "STATE_FREE", "STATE_SPAWNING", "STATE_READY", "STATE_DRAINING", "STATE_GONE",
)

__all__ = [
    "MAX_FDS", "MAX_PAYLOAD", "SLOT_SIZE", "U32_MAX", "PUBLIC_NAMES",
    "MSG_CONN", "MSG_READY", "MSG_CREDIT", "MSG_DRAIN", "MSG_USER", "MSG_CTL", "MSG_PARK",
    "STATE_FREE", "STATE_SPAWNING", "STATE_READY", "STATE_DRAINING", "STATE_GONE",
    "Message", "Event", "index_arg", "ranged_arg", "u32_arg", "check_backlog",
    "check_timeout", "POLICIES", "EMFILE_PAUSE_MS", "check_pause_ms", "DispatcherConfig",
    "dispatcher_config", "ACCEPT_CONTINUE", "ACCEPT_FD_EXHAUSTED", "ACCEPT_DEAD",
    "PARK_MAX", "check_parking",
]


class Message(NamedTuple):
    type: int
    arg: int
    payload: bytes
    fds: list


class Event(NamedTuple):
    kind: str   # "watch", "message", "hangup", "drained"
    slot: int   # worker slot, or -1
    tag: int    # "watch": the tag given to Dispatcher.watch


# ---- argument checks ----------------------------------------------------------

def index_arg(name, value):
    """value as an int (anything with __index__), else ValueError naming it."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError("%s must be an integer, got %r" % (name, value)) from None


def ranged_arg(name, value, lo, hi):
    value = index_arg(name, value)
    if not lo <= value <= hi:
        raise ValueError("%s must be %d..%d, got %d" % (name, lo, hi, value))
    return value


def u32_arg(name, value):
    """A message's arg or a watch tag: the C side stores a uint32_t."""
    value = index_arg(name, value)
    if not 0 <= value <= U32_MAX:
        raise ValueError("%s must be 0..2**32-1, got %d" % (name, value))
    return value


def check_backlog(backlog):
    backlog = index_arg("backlog", backlog)
    if backlog < 1:
        raise ValueError("backlog must be >= 1, got %d" % backlog)
    return backlog


def check_timeout(timeout):
    """Dispatcher.run's timeout: None (no limit) or seconds >= 0, as a float."""
    if timeout is None:
        return None
    timeout = float(timeout)
    if not timeout >= 0:  # NaN too
        raise ValueError("timeout must be >= 0 or None, got %r" % timeout)
    return timeout


# ---- the dispatcher's configuration (pf_config) ----------------------------------

POLICIES = ("rr", "least")   # index = PF_POLICY_RR, PF_POLICY_LEAST
# After EMFILE/ENFILE (and ENOBUFS/ENOMEM) accepting pauses this long: long
# enough that a level-triggered listener cannot spin a core, short enough
# that clients see a delay rather than an outage once fds are free again.
EMFILE_PAUSE_MS = 100
# The per-worker open-connection cap (max_inflight: sent - closed) is a safety
# bound only: back-pressure is on work (a connection goes only to a worker that
# can start it now, scoreboard capacity), and an idle kept-alive or WebSocket
# connection costs a worker memory, not a slot (issue 18: a cap of 1000 locked
# new clients out behind 2,000 idle ones). What does bound a worker's open
# connections is its fd limit: past it, the kernel closes the fds of a channel
# message it cannot install (MSG_CTRUNC) and those clients are cut. So the
# default is the fd limit workers inherit (RLIMIT_NOFILE soft) less
# NOFILE_HEADROOM for the worker's own fds (channel, wakeup pipe, epoll, logs,
# the app's files and sockets), at most MAX_INFLIGHT: 20,000 gives 19,872;
# the common 1024 gives 896 (the old fixed cap was 1000).
MAX_INFLIGHT = 100_000
NOFILE_HEADROOM = 128


def default_max_inflight():
    """The open-connection cap per worker for this process's fd limit (see above)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_INFLIGHT
    return max(1, min(MAX_INFLIGHT, soft - NOFILE_HEADROOM))


def check_pause_ms(emfile_pause_ms):
    # >= 1 so EMFILE can never become a spin; <= 60 s (longer is an outage).
    return ranged_arg("emfile_pause_ms", emfile_pause_ms, 1, 60000)


class DispatcherConfig(NamedTuple):
    capacity: int
    policy: int          # index into POLICIES
    max_inflight: int
    max_listeners: int
    max_watch: int
    max_pending: int
    accept_batch: int
    emfile_pause_ms: int


def dispatcher_config(capacity, policy, max_inflight, max_listeners, max_watch,
                      max_pending, accept_batch, emfile_pause_ms):
    """Dispatcher()'s arguments checked against csrc/dispatch.c's limits."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError("unknown policy %r: expected 'rr' or 'least'" % (policy,))
    capacity = ranged_arg("capacity", capacity, 1, 4096)
    if max_inflight is None:
        max_inflight = default_max_inflight()
    max_inflight = ranged_arg("max_inflight", max_inflight, 1, 1 << 20)
    max_listeners = ranged_arg("max_listeners", max_listeners, 1, 64)
    max_watch = ranged_arg("max_watch", max_watch, 0, 64)
    max_pending = ranged_arg("max_pending", max_pending, 1, 65536)
    accept_batch = ranged_arg("accept_batch", accept_batch, 1, max_pending)
    return DispatcherConfig(capacity, POLICIES.index(policy), max_inflight, max_listeners,
                            max_watch, max_pending, accept_batch,
                            check_pause_ms(emfile_pause_ms))


# ---- parking (csrc/park.c) --------------------------------------------------------
PARK_MAX = 1 << 20               # table entries (PF__PARK_MAX)
PARK_MAX_TIMEOUT = 86400.0       # seconds (PF__PARK_MAX_TIMEOUT_MS)


def check_parking(max_parked, idle_timeout):
    """Dispatcher.set_parking's arguments: (entries, timeout in whole ms >= 1)."""
    max_parked = ranged_arg("max_parked", max_parked, 0, PARK_MAX)
    try:
        idle_timeout = float(idle_timeout)
    except (TypeError, ValueError):
        raise ValueError("idle_timeout must be seconds, got %r" % (idle_timeout,)) from None
    if not 0 < idle_timeout <= PARK_MAX_TIMEOUT:   # NaN too
        raise ValueError("idle_timeout must be > 0 and <= %g s, got %r"
                         % (PARK_MAX_TIMEOUT, idle_timeout))
    return max_parked, max(1, int(round(idle_timeout * 1000)))


# ---- accept(2) errno triage (csrc/dispatch_loop.c, pf__accept_some) ----------------
# EAGAIN: the backlog is empty. Anything not named below (ENOBUFS, ENOMEM):
# retrying at once would spin, so pause for emfile_pause_ms.

# Errors of one connection, not of the listener. accept(2): "Linux accept()
# passes already-pending network errors on the new socket as an error code
# from accept() ... treat them like EAGAIN by retrying".
ACCEPT_CONTINUE = frozenset(e for e in (
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, getattr(errno, "ENONET", None), errno.EHOSTUNREACH, errno.EOPNOTSUPP,
    errno.ENETUNREACH, errno.ETIMEDOUT) if e is not None)
# Out of fds: libuv's reserve-fd trick serves the client at the head of the
# backlog, then accepting pauses.
ACCEPT_FD_EXHAUSTED = frozenset((errno.EMFILE, errno.ENFILE))
# Not a listening socket any more (closed, shut down): polling it again would
# report the same error forever.
ACCEPT_DEAD = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT))
