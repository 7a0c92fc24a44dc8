"""Dispatcher.run, the primary's hot loop, pure backend (csrc/dispatch_loop.c).

Theory of operation: each turn first does the bookkeeping that needs no
word from the kernel (_tick: expire the EMFILE pause, retry transient send
failures, flush pending fds, the stop/drain pass, put listeners in or out
of the poll set, owe HANGUP/DRAINED events), returns if any event is owed,
and otherwise sleeps in epoll for exactly as long as the earliest of: the
caller's deadline, the EMFILE pause end, the 10 ms recheck while fds are
stalled. Readiness is handled per kind:
  listener   accept until EAGAIN or accept_batch, then flush to workers;
             EMFILE/ENFILE spend the reserve fd on one connection, then pause;
  channel    EPOLLOUT clears "busy"; CREDIT messages are eaten here; any
             other message is left unread and reported; EOF = HANGUP;
  watch      reported with the caller's tag.
Everything is level-triggered, so anything left comes back next turn. _Loop
is a mixin of Dispatcher (dispatch.py), whose __init__ sets the state used.
"""

import errno
import os
import select
import socket
import time

from pyfork._pure.fdpass import (
    _HDR, HDR_SIZE, MAX_FDS, MSG_CREDIT, MSG_MAGIC, _close_all, _recv, _wrap,
)
from pyfork._pure.internal import _BLK_NONE, _BLK_OUT, _EPOLLIN, _RECHECK_S

# accept() errors that concern one connection, not the listener: the Linux
# accept(2) man page says to treat "already-pending network errors" like
# EAGAIN and retry (the same list as dispatch_loop.c).
_ACCEPT_SOFT = frozenset(e for e in (
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, getattr(errno, "ENONET", None), errno.EHOSTUNREACH, errno.EOPNOTSUPP,
    errno.ENETUNREACH, errno.ETIMEDOUT) if e is not None)

_ACC_AGAIN, _ACC_MORE, _ACC_PAUSE, _ACC_DEAD = range(4)
_CREDITS_PER_WAKEUP = 64  # a chatty worker cannot starve the others
_CHAN_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_ACCEPT_DEAD = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT))


class _Loop:
    """Dispatcher methods that accept, read channels and run the loop."""

    # -- accepting ------------------------------------------------------------
    def _pause(self):
        self._pause_until = time.monotonic() + self._pause_s

    def _took(self, lst, fd):
        conn = _wrap(fd, socket.AF_INET if lst.tcp else socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.setblocking(False)  # as accept4(SOCK_NONBLOCK) in C
            if lst.nodelay_each:
                # Nagle off: small responses would wait for the delayed ACK.
                try:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # already reset by the peer: the worker will see it
        finally:
            conn.detach()
        self._pend.append((fd, False))
        self._st["accepted"] += 1

    def _reserve_open(self):
        if self._reserve < 0 and self._reserve_wanted:
            try:
                self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass  # still exhausted: retried next turn

    def _on_emfile(self, lst):
        # libuv's reserve-fd trick, serving rather than dropping: with nothing
        # in hand to free, spend the reserve fd to accept ONE connection (the
        # client at the head of the backlog gets served), then pause the
        # listeners so a level-triggered listener cannot spin us.
        self._st["fd_exhaustion"] += 1
        if not self._pend and self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
            try:
                fd, _ = lst.sock._accept()
            except OSError:
                pass
            else:
                self._took(lst, fd)
                self._flush()  # our copy closes once a worker has it
            self._reserve_open()
        self._pause()

    def _accept_some(self, lst, budget):
        """Accepts up to budget connections (fewer when the ring fills)."""
        sock = lst.sock
        for _ in range(budget):
            if len(self._pend) >= self._max_pending:
                return _ACC_MORE
            try:
                fd, _ = sock._accept()  # accept4(SOCK_CLOEXEC); EINTR retried
            except BlockingIOError:
                return _ACC_AGAIN
            except OSError as exc:
                code = exc.errno
                if code in (errno.EMFILE, errno.ENFILE):
                    self._on_emfile(lst)
                    return _ACC_PAUSE
                self._st["accept_errors"] += 1
                if code in _ACCEPT_SOFT:
                    continue
                if code in _ACCEPT_DEAD:
                    # Not a listening socket any more: polling it again would
                    # report the same error forever.
                    lst.dead = True
                    return _ACC_DEAD
                self._pause()  # ENOBUFS, ENOMEM: retrying at once would spin
                return _ACC_PAUSE
            self._took(lst, fd)
        return _ACC_MORE

    def _on_listener(self, fd):
        lst = self._find_listener(fd)
        if lst is None or not lst.in_poll or not self._accepting:
            return
        self._accept_some(lst, self._accept_batch)
        self._flush()
        # Stalled or paused: the other listeners in this batch wait too.
        if self._pend or self._pause_until:
            self._accepting = False

    def _listener_poll(self, lst, on):
        if on and not lst.in_poll and not lst.dead:
            try:
                self._ep.register(lst.fd, _EPOLLIN)
                lst.in_poll = True
            except OSError:
                pass  # the caller closed it without removing it
        elif (not on or lst.dead) and lst.in_poll:
            self._unregister(lst.fd)
            lst.in_poll = False

    def _sync_listeners(self):
        """Listeners are polled only while nothing waits for a worker
        (back-pressure), outside an EMFILE pause, and never after
        stop_accepting."""
        self._accepting = not self._stopping and not self._pause_until and not self._pend
        for lst in self._listeners:
            self._listener_poll(lst, self._accepting)

    def _drain_step(self):
        if self._pause_until:
            return
        done = True
        for lst in list(self._listeners):
            if lst.at_eagain or lst.dead:
                continue
            r = self._accept_some(lst, self._max_pending)
            self._flush()
            if r in (_ACC_AGAIN, _ACC_DEAD):
                lst.at_eagain = True
            else:
                done = False
        if done and not self._pend:
            self._drained = True
            self._drained_unreported = True
        elif not done and len(self._pend) < self._max_pending and not self._pause_until:
            self._more = True  # backlog left and room for it: no sleep

    # -- worker channels --------------------------------------------------------
    def _eat_credit(self, sock):
        # Closed counts live on the scoreboard: the message only wakes us.
        try:
            msg = _recv(sock, MAX_FDS)
        except OSError:
            return  # consumed either way; fds already closed
        _close_all(msg.fds)

    def _read_chan(self, s):
        w = self._workers[s]
        for _ in range(_CREDITS_PER_WAKEUP):
            try:
                head = w.sock.recv(HDR_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ENOMEM, errno.ENOBUFS):
                    return
                head = b""  # a socket error such as ECONNRESET: gone
            if not head:
                # EOF (no datagram is empty: the header is 16 bytes).
                self._mark_gone(s)
                return
            if len(head) == HDR_SIZE:
                magic, mtype = _HDR.unpack_from(head)[:2]
                if magic == MSG_MAGIC and mtype == MSG_CREDIT:
                    self._eat_credit(w.sock)
                    continue
            # Anything else is the caller's to recv_msg; left in the channel.
            self._emit("message", s, 0)
            return

    def _on_chan(self, s, events):
        w = self._workers[s]
        if not w.in_epoll:
            return  # went GONE earlier in this batch
        if events & select.EPOLLOUT and w.out_armed:
            if w.blocked == _BLK_OUT:
                w.blocked = _BLK_NONE
            self._chan_events(w, 0)
        if events & _CHAN_READ:
            self._read_chan(s)

    def _on_watch(self, fd):
        for wfd, tag in self._watches:
            if wfd == fd:
                self._emit("watch", -1, tag)
                return

    # -- the loop ---------------------------------------------------------------
    def _emit_owed(self):
        """HANGUP and DRAINED are remembered, not level-triggered."""
        if self._n_hup:
            for s in range(self._hi):
                w = self._workers[s]
                if w.hup_pending and self._emit("hangup", s, 0):
                    w.hup_pending = False
                    self._n_hup -= 1
        if self._drained_unreported and self._emit("drained", -1, 0):
            self._drained_unreported = False

    def _tick(self, now):
        self._more = False
        if self._recheck_at and now >= self._recheck_at:
            self._clear_retry()
        if self._pause_until and now >= self._pause_until:
            self._pause_until = 0.0
        if self._pend:
            self._flush()
        self._reserve_open()  # after the flush freed what it could
        if self._stopping and not self._drained:
            self._drain_step()
        self._sync_listeners()
        self._emit_owed()

    def _wait(self, now, deadline):
        """Seconds epoll may sleep (-1 = no limit): until the earliest thing
        that needs us without the kernel's help."""
        if self._more:
            return 0
        w = -1 if deadline is None else max(0.0, deadline - now)
        for t in (self._pause_until, self._recheck_at):
            if t and (w < 0 or t - now < w):
                w = max(0.0, t - now)
        # Stalled with someone who could take: poll for freed room, not spin.
        if self._pend and self._n_ready > 0 and (w < 0 or w > _RECHECK_S):
            w = _RECHECK_S
        return w

    def run(self, timeout=None):
        """Runs the loop until there are events or timeout seconds passed (None
        = no limit). Returns a list of Event; [] on timeout."""
        self._check()
        if timeout is None:
            deadline = None
        else:
            timeout = float(timeout)
            if not timeout >= 0:  # NaN too
                raise ValueError("timeout must be >= 0 or None, got %r" % timeout)
        now = time.monotonic()
        if timeout is not None:
            deadline = now + timeout
        out = self._out = []
        polled = False
        try:
            while True:
                self._tick(now)
                if out or (polled and deadline is not None and now >= deadline):
                    break
                ready = self._ep.poll(self._wait(now, deadline))
                polled = True
                self._st["wakeups"] += 1
                for fd, events in ready:
                    s = self._by_chan.get(fd)
                    if s is not None:
                        self._on_chan(s, events)
                    elif self._find_listener(fd) is not None:
                        self._on_listener(fd)
                    else:
                        self._on_watch(fd)
                now = time.monotonic()
        finally:
            self._out = None
        return out
