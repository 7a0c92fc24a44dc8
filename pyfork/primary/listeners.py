"""The primary's listening sockets: bind every --bind address, hand them to workers, close them.

Theory of operation. The primary binds every address once, before any fork, so an
unbindable address is a startup error (exit 2) and not a crash loop. What happens next
depends on the dispatch policy:

* ``rr`` / ``least``: the dispatcher accepts on these sockets. Workers inherit them too, and
  accept from them only while the dispatcher says so (pf_slot.pull: no worker could start a
  new connection, so it is left in the kernel's queue for the first one that frees room);
  with PYFORK_PULL=0 they get none.
* ``shared``: every worker inherits every listener and the kernel picks (Node SCHED_NONE).
* ``reuseport``: each worker *slot* gets its own SO_REUSEPORT group member. Slot 0 uses
  the sockets bound at startup; the others bind the same real port on first use and keep
  it, so a respawned or replacement worker inherits the same socket and nothing queued
  on it is reset when a worker dies. A slot that goes away releases its sockets, or the
  kernel would keep hashing connections to a socket nobody accepts from.

fd://N listeners are adopted, never closed: they stay the caller's.
"""

from __future__ import annotations

import os
import socket
from typing import Dict, List, Optional

from pyfork.config import BindAddr

BACKLOG = 2048   # when none is given (gunicorn's default); `pyfork serve` passes --backlog,
                 # net.core.somaxconn unless set. The kernel caps it at somaxconn either way.


class BindError(Exception):
    """An address could not be bound; str() is one line for the user."""


def _url(addr: BindAddr, fd: int) -> str:
    if addr.kind == "unix":
        return f"unix:{addr.path}"
    s = socket.socket(fileno=os.dup(fd))
    try:
        name = s.getsockname()
        fam = s.family
    finally:
        s.close()
    if fam == socket.AF_UNIX:
        return f"unix:{name if isinstance(name, str) else name.decode(errors='replace')}"
    host, port = name[0], name[1]
    return f"http://[{host}]:{port}" if fam == socket.AF_INET6 else f"http://{host}:{port}"


def _stop_listening(fd: int) -> None:
    """shutdown() of a listening socket takes it out of the listening state for every fd
    that shares it: later connects are refused (TCP: accept() then fails with EINVAL; a
    unix listener stays readable with accept() at EAGAIN, so the primary ends any pull
    first and the workers stop watching it)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


def _bound_port(fd: int) -> int:
    s = socket.socket(fileno=os.dup(fd))
    try:
        return s.getsockname()[1]
    finally:
        s.close()


class Listeners:
    """Every listening socket of one primary, and which of them each worker slot inherits."""

    def __init__(self, backend, policy: str, backlog: int = BACKLOG, pull: bool = True):
        self.backend = backend
        self.policy = policy
        self.backlog = backlog
        self.pull = pull                            # rr/least: workers get them, to pull
        self.bound: List[tuple] = []                # (BindAddr, fd, adopted); -1: closed with its slot
        self.by_slot: Dict[int, List[int]] = {}     # reuseport: logical slot -> fds
        self.ports: List[int] = []                  # reuseport: the real port of each address
        self._urls: List[str] = []                  # of self.bound, found at bind (a fd may go later)

    def _listen(self, addr: BindAddr, reuseport: bool = False, port: Optional[int] = None) -> int:
        b = self.backend
        if addr.kind == "tcp":
            return b.listen_tcp(addr.host, addr.port if port is None else port, self.backlog, reuseport)
        if addr.kind == "unix":
            return b.listen_unix(addr.path, self.backlog)
        return b.adopt_listener(addr.fd)

    def bind(self, addrs: List[BindAddr]) -> None:
        """Binds every address. Raises BindError; what was bound stays for close()."""
        reuse = self.policy == "reuseport"
        for addr in addrs:
            try:
                fd = self._listen(addr, reuseport=reuse)
            except (OSError, ValueError) as e:
                raise BindError(f"cannot bind {addr.text}: {e}") from None
            self.bound.append((addr, fd, addr.kind == "fd"))
            self._urls.append(_url(addr, fd))
        if reuse:
            # slot 0 uses the listeners bound above; their real ports (0 = any) are
            # what the other slots bind to.
            self.ports = [_bound_port(fd) for _, fd, _ in self.bound]
            self.by_slot[0] = [fd for _, fd, _ in self.bound]

    def fds(self) -> List[int]:
        """The sockets bound at startup (what rr/least dispatch from)."""
        return [fd for _, fd, _ in self.bound]

    def url_list(self) -> List[str]:
        """One URL per address bound at startup (http://HOST:PORT, http://[V6]:PORT, unix:PATH)."""
        return list(self._urls)

    def adopted_urls(self) -> List[str]:
        """The URLs of fd:// (and systemd) listeners: close() leaves those open."""
        return [url for (_, _, adopted), url in zip(self.bound, self._urls) if adopted]

    def urls(self) -> str:
        return ", ".join(self.url_list())

    def primary_fds(self) -> List[int]:
        """Every listener the primary holds (a worker closes those it does not use)."""
        return ([fd for _, fd, _ in self.bound if fd >= 0]
                + [fd for fds in self.by_slot.values() for fd in fds])

    def for_slot(self, slot: int) -> List[int]:
        """The listeners a worker in ``slot`` accepts on (rr/least: during a pull only).
        Raises OSError when a reuseport slot's sockets cannot be created."""
        if self.policy in ("rr", "least"):
            return self.fds() if self.pull else []
        if self.policy != "reuseport":
            return self.fds()
        fds = self.by_slot.get(slot)
        if fds is None:
            fds = []
            try:
                for (addr, _, _), port in zip(self.bound, self.ports):
                    fds.append(self._listen(addr, reuseport=True, port=port))
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            self.by_slot[slot] = fds
        return fds

    def release_slot(self, slot: int) -> None:
        """reuseport: a slot with no worker must not keep a listener in the SO_REUSEPORT
        group, or the kernel keeps hashing connections to a socket nobody accepts from
        (a respawn later creates a new one)."""
        fds = self.by_slot.pop(slot, [])
        for fd in fds:
            os.close(fd)
        if fds:
            self.bound = [(a, -1 if fd in fds else fd, ad) for a, fd, ad in self.bound]

    def close(self) -> None:
        """Closes every listener we own and unlinks unix socket paths. rr/least: shuts each
        one down first, because the workers hold copies (for a pull): with only ours closed
        it would go on listening, and queueing connections, until the last worker exits."""
        for slot in list(self.by_slot):
            self.release_slot(slot)
        for addr, fd, adopted in self.bound:
            if adopted or fd < 0:
                continue   # fd://N stays the caller's; -1 = closed with its reuseport slot
            if self.policy in ("rr", "least"):
                _stop_listening(fd)
            os.close(fd)
            if addr.kind == "unix":
                try:
                    os.unlink(addr.path)
                except OSError:
                    pass
        self.bound = []
        self._urls = []
