"""systemd integration without libsystemd: sd_notify datagrams and socket activation.

Theory of operation. Both protocols are a few lines of environment and one datagram
(sd_notify(3), sd_listen_fds(3)), so pyfork speaks them itself:

* **Notifications.** When ``$NOTIFY_SOCKET`` is set (a path, or ``@name`` for the
  abstract namespace) the primary sends newline-separated ``KEY=VALUE`` datagrams on an
  AF_UNIX/SOCK_DGRAM socket. ``Notifier`` follows the primary's event stream (it is a
  subscriber): ``READY=1`` (with ``MAINPID``) once every worker slot has a READY worker,
  never before; at a rolling restart ``RELOADING=1`` with ``MONOTONIC_USEC`` (what
  ``Type=notify-reload`` expects), then ``READY=1`` when it completed or was aborted (the
  old workers serve either way); ``STOPPING=1`` when a stop begins; ``STATUS=`` with the
  worker counts whenever they change. With ``$WATCHDOG_USEC`` set (and ``$WATCHDOG_PID``
  unset or ours) ``tick`` sends ``WATCHDOG=1`` every half period, called from the
  primary's loop, so a primary whose loop is stuck stops pinging and systemd restarts
  it. Sending never blocks and never raises: a full or missing socket loses that one
  message (logged once).
* **Socket activation.** When ``$LISTEN_PID`` is our pid, fds 3 .. 3+$LISTEN_FDS-1 are
  listening sockets systemd opened for us, named by ``$LISTEN_FDNAMES`` (colon
  separated). ``listen_fds`` returns them; the CLI serves on them (as ``fd://N``)
  instead of the default address.

Both read their variables once, in the primary, and remove them from ``os.environ``
before the first fork, so workers and the app's subprocesses neither notify systemd nor
claim its sockets (sd_notify's and sd_listen_fds' ``unset_environment``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, List, Optional, Tuple

from pyfork.primary.hooks import all_slots_ready

log = logging.getLogger("pyfork.systemd")

LISTEN_FDS_START = 3      # SD_LISTEN_FDS_START


def listen_fds(environ=None) -> List[Tuple[int, str]]:
    """Socket activation: [(fd, name)] passed to this process, else []. Unsets the variables.
    A malformed $LISTEN_FDS raises ValueError (a startup error)."""
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not pid or not count:
        return []
    try:
        if int(pid) != os.getpid():
            return []            # meant for another process (we were started by it)
        n = int(count)
    except ValueError:
        raise ValueError(f"bad socket activation variables: LISTEN_PID={pid!r} LISTEN_FDS={count!r}") from None
    if not 0 <= n <= 1024:
        raise ValueError(f"bad LISTEN_FDS={count!r}")
    labels = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)    # the primary adopts it; workers get what their policy gives
        out.append((fd, labels[i] if i < len(labels) and labels[i] else "unknown"))
    return out


def _address(spec: str):
    if spec.startswith("@"):
        return "\0" + spec[1:]          # abstract namespace
    return spec


class Notifier:
    """sd_notify over $NOTIFY_SOCKET, driven by the primary's events (see the module docstring)."""

    def __init__(self, status: Callable[[], dict], environ=None, clock=time.monotonic):
        env = os.environ if environ is None else environ
        spec = env.pop("NOTIFY_SOCKET", None)
        usec = env.pop("WATCHDOG_USEC", None)
        wpid = env.pop("WATCHDOG_PID", None)
        self.status = status
        self.clock = clock
        self.addr = _address(spec) if spec and spec[0] in "/@" else None
        self.sock: Optional[socket.socket] = None
        self.watchdog: Optional[float] = None    # seconds between pings
        self.next_ping = 0.0
        self.ready = False
        self.stopping = False
        self.last_status = ""
        self.failed = False
        if spec and self.addr is None:
            log.warning("NOTIFY_SOCKET=%r is neither a path nor @abstract; not notifying systemd", spec)
        if self.addr is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            try:
                if usec and (not wpid or int(wpid) == os.getpid()) and int(usec) > 0:
                    self.watchdog = int(usec) / 1e6 / 2     # sd_watchdog_enabled(3): ping at half the period
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number; no watchdog pings", usec)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def send(self, *fields: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto("\n".join(fields).encode(), self.addr)
            return True
        except OSError as e:
            if not self.failed:
                self.failed = True
                log.warning("cannot notify systemd at %s: %s", self.addr.replace("\0", "@"), e)
            return False

    def _status_line(self) -> str:
        st = self.status() or {}
        workers = st.get("workers", [])
        ready = sum(1 for w in workers if w.get("state") == "ready")
        text = f"STATUS={ready} of {st.get('workers_wanted', 0)} workers ready"
        if st.get("reloading"):
            text += ", reloading"
        if st.get("stopping"):
            text += ", stopping"
        return text

    def _update_status(self) -> None:
        line = self._status_line()
        if line != self.last_status:
            self.last_status = line
            self.send(line)

    def on_event(self, ev) -> None:
        """Event-stream subscriber."""
        if self.sock is None:
            return
        kind = ev.kind
        if kind == "ready" and not self.ready and not self.stopping and all_slots_ready(self.status()):
            self.ready = True
            self.last_status = self._status_line()
            self.send("READY=1", f"MAINPID={os.getpid()}", self.last_status)
            return
        if kind == "reload" and self.ready:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.last_status = self._status_line()
            self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", self.last_status)
            return
        if kind in ("reload_complete", "reload_aborted") and self.ready and not self.stopping:
            self.last_status = self._status_line()
            self.send("READY=1", self.last_status)
            return
        if kind == "stop" and not self.stopping:
            self.stopping = True
            self.last_status = self._status_line()
            self.send("STOPPING=1", self.last_status)
            return
        if kind in ("ready", "exit", "scale", "gave_up"):
            self._update_status()

    def next_due(self) -> Optional[float]:
        return self.next_ping if self.watchdog is not None else None

    def tick(self, now: float) -> None:
        """Called from the primary's loop: WATCHDOG=1 when due (proof the loop runs)."""
        if self.watchdog is not None and now >= self.next_ping:
            self.next_ping = now + self.watchdog
            self.send("WATCHDOG=1")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
