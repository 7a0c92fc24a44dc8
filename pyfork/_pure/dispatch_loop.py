"""Dispatcher.run, the primary's hot loop, pure backend (csrc/dispatch_loop.c).

Theory of operation: each turn first does the bookkeeping that needs no
word from the kernel (_tick: expire the EMFILE pause, retry transient send
failures, take back prefetched connections, flush pending fds, withdraw
CREDIT requests once nothing waits, the stop/drain pass, put listeners in or
out of the poll set, owe HANGUP/DRAINED events), returns if any event is owed,
and otherwise sleeps in epoll for exactly as long as the earliest of: the
caller's deadline, the EMFILE pause end, the 10 ms recheck while fds are
stalled, the next take-back of prefetched connections (dispatch_send.py).
Readiness is handled per kind:
  listener   accept until EAGAIN or accept_batch, then flush to workers;
             EMFILE/ENFILE spend the reserve fd on one connection, then pause;
  channel    EPOLLOUT clears "busy"; CREDIT messages are eaten here, PARK
             messages parked (park.py); any other message is left unread and
             reported; EOF = HANGUP;
  parked     a parked connection's next request: to the ring (park.py);
  watch      reported with the caller's tag.
Everything is level-triggered, so anything left comes back next turn. run(d,
timeout) is the one function other modules call; all of them take the
dispatcher's State (internal.py) as ``d``, as the C ones take pf_dispatcher.
"""

import errno
import os
import select
import socket
import time

from pyfork._api import (
    ACCEPT_CONTINUE, ACCEPT_DEAD, ACCEPT_FD_EXHAUSTED, MAX_FDS, MSG_CREDIT, MSG_PARK, Event,
)
from pyfork._pure import park
from pyfork._pure.dispatch_send import (
    chan_events, clear_retry, flush, forget_credits, mark_gone, pull_end, pull_over, pull_start,
    take_back_due)
from pyfork._pure.fdpass import HDR, HDR_SIZE, MSG_MAGIC, recv_on
from pyfork._pure.internal import (
    BLK_NONE, BLK_OUT, EPOLLIN, RECHECK_S, close_all, find_listener, unregister, wrap_fd,
)

_ACC_AGAIN, _ACC_MORE, _ACC_PAUSE, _ACC_DEAD = range(4)
_CREDITS_PER_WAKEUP = 64  # a chatty worker cannot starve the others
_CHAN_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


def _emit(d, kind, slot, tag):
    """Queues an event for the caller; False outside run (the condition is
    level-triggered or remembered, so it is reported next run)."""
    if d.out is None:
        return False
    d.out.append(Event(kind, slot, tag))
    return True


# ---- accepting ------------------------------------------------------------

def _pause(d):
    d.pause_until = time.monotonic() + d.pause_s


def _took(d, lst, fd):
    conn = wrap_fd(fd, socket.AF_INET if lst.tcp else socket.AF_UNIX, socket.SOCK_STREAM)
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
    d.pend.append((fd, False))
    d.st["accepted"] += 1


def _reserve_open(d):
    if d.reserve < 0 and d.reserve_wanted:
        try:
            d.reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # still exhausted: retried next turn


def _on_emfile(d, lst):
    # libuv's reserve-fd trick, serving rather than dropping: with nothing
    # in hand to free, spend the reserve fd to accept ONE connection (the
    # client at the head of the backlog gets served), then pause the
    # listeners so a level-triggered listener cannot spin us.
    d.st["fd_exhaustion"] += 1
    if not d.pend and d.reserve >= 0:
        os.close(d.reserve)
        d.reserve = -1
        try:
            fd, _ = lst.sock._accept()
        except OSError:
            pass
        else:
            _took(d, lst, fd)
            flush(d)  # our copy closes once a worker has it
        _reserve_open(d)
    _pause(d)


def _accept_some(d, lst, budget):
    """Accepts up to budget connections (fewer when the ring fills); the
    errno classes are pyfork._api's, as pf__accept_some switches on them."""
    accept = lst.sock._accept   # accept4(SOCK_CLOEXEC); EINTR retried
    pend = d.pend
    max_pending = d.cfg.max_pending
    for _ in range(budget):
        if len(pend) >= max_pending:
            return _ACC_MORE
        try:
            fd, _ = accept()
        except BlockingIOError:
            return _ACC_AGAIN
        except OSError as exc:
            code = exc.errno
            if code in ACCEPT_FD_EXHAUSTED:
                _on_emfile(d, lst)
                return _ACC_PAUSE
            d.st["accept_errors"] += 1
            if code in ACCEPT_CONTINUE:
                continue
            if code in ACCEPT_DEAD:
                lst.dead = True
                return _ACC_DEAD
            _pause(d)  # ENOBUFS, ENOMEM: retrying at once would spin
            return _ACC_PAUSE
        _took(d, lst, fd)
    return _ACC_MORE


def _on_listener(d, lst):
    if not lst.in_poll or not d.accepting:
        return
    if d.pull_on and not d.pend and pull_start(d):
        d.accepting = False     # nobody can start it: the workers accept
        return
    _accept_some(d, lst, d.cfg.accept_batch)
    flush(d)
    # Stalled or paused: the other listeners in this batch wait too.
    if d.pend or d.pause_until:
        d.accepting = False


def _listener_poll(d, lst, on):
    if on and not lst.in_poll and not lst.dead:
        try:
            d.ep.register(lst.fd, EPOLLIN)
            lst.in_poll = True
        except OSError:
            pass  # the caller closed it without removing it
    elif (not on or lst.dead) and lst.in_poll:
        unregister(d, lst.fd)
        lst.in_poll = False


def _sync_listeners(d):
    """Listeners are polled only while nothing waits for a worker
    (back-pressure), outside an EMFILE pause and a pull, and never after
    stop_accepting."""
    d.accepting = on = not d.stopping and not d.pulling and not d.pause_until and not d.pend
    for lst in d.listeners:
        _listener_poll(d, lst, on)


def _drain_step(d):
    if d.pause_until:
        return
    done = True
    for lst in list(d.listeners):
        if lst.at_eagain or lst.dead:
            continue
        r = _accept_some(d, lst, d.cfg.max_pending)
        flush(d)
        if r in (_ACC_AGAIN, _ACC_DEAD):
            lst.at_eagain = True
        else:
            done = False
    if done and not d.pend and not park.waiting(d):    # nothing held, parked ones included
        d.drained = True
        d.drained_unreported = True
    elif not done and len(d.pend) < d.cfg.max_pending and not d.pause_until:
        d.more = True  # backlog left and room for it: no sleep


# ---- worker channels --------------------------------------------------------

def _eat_credit(sock):
    # Closed counts live on the scoreboard: the message only wakes us.
    try:
        msg = recv_on(sock, MAX_FDS)
    except OSError:
        return  # consumed either way; fds already closed
    close_all(msg.fds)


def _read_chan(d, s):
    w = d.workers[s]
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
            mark_gone(d, s)
            return
        if len(head) == HDR_SIZE:
            magic, mtype = HDR.unpack_from(head)[:2]
            if magic == MSG_MAGIC and mtype == MSG_CREDIT:
                _eat_credit(w.sock)
                continue
            if magic == MSG_MAGIC and mtype == MSG_PARK:
                park.recv(d, s)
                continue
        # Anything else is the caller's to recv_msg; left in the channel.
        _emit(d, "message", s, 0)
        return


def _on_chan(d, s, events):
    w = d.workers[s]
    if not w.in_epoll:
        return  # went GONE earlier in this batch
    if events & select.EPOLLOUT and w.out_armed:
        if w.blocked == BLK_OUT:
            w.blocked = BLK_NONE
        chan_events(d, w, 0)
    if events & _CHAN_READ:
        _read_chan(d, s)


def _on_watch(d, fd):
    for wfd, tag in d.watches:
        if wfd == fd:
            _emit(d, "watch", -1, tag)
            return


# ---- the loop -------------------------------------------------------------------

def _emit_owed(d):
    """HANGUP and DRAINED are remembered, not level-triggered."""
    if d.n_hup:
        for s in range(d.hi):
            w = d.workers[s]
            if w.hup_pending and _emit(d, "hangup", s, 0):
                w.hup_pending = False
                d.n_hup -= 1
    if d.drained_unreported and _emit(d, "drained", -1, 0):
        d.drained_unreported = False


def _tick(d, now):
    d.more = False
    if d.recheck_at and now >= d.recheck_at:
        clear_retry(d)
    if d.pause_until and now >= d.pause_until:
        d.pause_until = 0.0
    take_back_due(d)
    park.tick(d, now)
    if d.pend:
        flush(d)
    if park.waiting(d):
        # they move in park.tick, which ran before this flush made room: look again at once
        if len(d.pend) < d.cfg.max_pending:
            d.more = True
    elif not d.pend and not d.rescue_wait:
        forget_credits(d)
    _reserve_open(d)  # after the flush freed what it could
    if d.pulling and (d.stopping or d.pend or park.waiting(d) or pull_over(d, now)):
        pull_end(d)
    if d.stopping and not d.drained:
        _drain_step(d)
    _sync_listeners(d)
    _emit_owed(d)


def _wait(d, now, deadline):
    """Seconds epoll may sleep (-1 = no limit): until the earliest thing
    that needs us without the kernel's help."""
    if d.more:
        return 0
    w = -1 if deadline is None else max(0.0, deadline - now)
    for t in (d.pause_until, d.recheck_at, d.takeback_at, park.due(d),
              d.pull_look_at if d.pulling else 0.0):
        if t and (w < 0 or t - now < w):
            w = max(0.0, t - now)
    # Stalled with someone who could take: poll for freed room, not spin.
    if d.pend and d.n_ready > 0 and (w < 0 or w > RECHECK_S):
        w = RECHECK_S
    return w


def run(d, timeout):
    """Runs the loop until there are events or timeout seconds passed (None =
    no limit; checked by the caller). Returns a list of Event; [] on timeout."""
    now = time.monotonic()
    deadline = None if timeout is None else now + timeout
    out = d.out = []
    polled = False
    by_chan = d.by_chan
    poll = d.ep.poll
    st = d.st
    try:
        while True:
            _tick(d, now)
            if out or (polled and deadline is not None and now >= deadline):
                break
            ready = poll(_wait(d, now, deadline))
            polled = True
            st["wakeups"] += 1
            for fd, events in ready:
                s = by_chan.get(fd)
                if s is not None:
                    _on_chan(d, s, events)
                    continue
                lst = find_listener(d, fd)
                if lst is not None:
                    _on_listener(d, lst)
                elif park.is_parked(d, fd):
                    park.on_event(d, fd, events)
                else:
                    _on_watch(d, fd)
            now = time.monotonic()
    finally:
        d.out = None
    return out
