"""The pure-Python twin of the C dispatch core (csrc/pyfork.h), same interface as pyfork._core.

Theory of operation. A channel is one AF_UNIX SOCK_SEQPACKET socketpair per
worker; a message is one datagram: a 16-byte header (magic, type, nfds, len,
arg) plus payload, with 0..MAX_FDS fds in a single SCM_RIGHTS cmsg. The
receiver trusts nothing: EOF, size, magic, type, length, cmsg level/type/len,
MSG_CTRUNC (which socket.recv_fds does not check) and MSG_TRUNC are checked,
and every fd that arrived is closed on any error.

The Dispatcher is an epoll loop over listeners, worker channels and watched
fds, written after csrc/dispatch*.c function by function. Accepted fds wait
in a pending ring of max_pending entries while a worker is chosen (rr, or
least from the scoreboard), then go out in batches of up to MAX_FDS per
sendmsg and the primary closes its copies. A worker is full when sent minus
closed (closed is what the worker wrote on the shared scoreboard) reaches
max_inflight; a full worker that is skipped gets want_credit set, and its
next close sends MSG_CREDIT, which wakes the loop (a 10 ms re-check covers
the race). Back-pressure: listeners are in the poll set only while nothing
waits in the ring, so at most accept_batch fds are held and the kernel
backlog carries the rest. A channel at EAGAIN is busy until EPOLLOUT; EPIPE
means gone (one HANGUP event). EMFILE/ENFILE spend a reserve fd to accept
and serve one connection, then pause the listeners, so fd exhaustion never
spins. The primary keeps a dup of each worker's end, so connections still
queued to a worker that died are read back by remove_worker and sent to
another worker.

Everything mirrors the C core: same checks, same states, same counters, and
the same errors (rc < 0 there is OSError(errno) here; bad arguments are
ValueError in both).
"""

import errno
import itertools
import mmap
import operator
import os
import select
import socket
import stat
import struct
import time
from array import array
from collections import deque
from typing import NamedTuple

from pyfork.scoreboard import Scoreboard

BACKEND = "python"

MAX_FDS = 32            # PF_MAX_FDS: fds per message (batching limit)
MAX_PAYLOAD = 65536     # PF_MAX_PAYLOAD: bytes after the header
MSG_MAGIC = 0x31464B50  # "PKF1" little-endian
MSG_CONN, MSG_READY, MSG_CREDIT, MSG_DRAIN, MSG_USER, MSG_CTL = 1, 2, 3, 4, 5, 6
STATE_FREE, STATE_SPAWNING, STATE_READY, STATE_DRAINING, STATE_GONE = 0, 1, 2, 3, 4
SLOT_SIZE = 64

_HDR = struct.Struct("<IHHII")  # pf_msg_hdr: magic, type, nfds, len, arg
HDR_SIZE = _HDR.size            # 16
_U32 = 0xFFFFFFFF
_INT = array("i").itemsize      # sizeof(int) in SCM_RIGHTS data
_CMSG_MAX = socket.CMSG_SPACE(MAX_FDS * _INT)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)

# While fds wait for a worker, re-check this often even without a CREDIT: a
# worker written against the raw protocol may never send one, and a close can
# race the want_credit flag. 100 wakeups/s while stalled is not a spin.
_RECHECK_S = 0.010

# accept() errors that concern one connection, not the listener: the Linux
# accept(2) man page says to treat "already-pending network errors" like
# EAGAIN and retry (the same list as dispatch_loop.c).
_ACCEPT_SOFT = frozenset(e for e in (
    errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
    errno.EHOSTDOWN, getattr(errno, "ENONET", None), errno.EHOSTUNREACH, errno.EOPNOTSUPP,
    errno.ENETUNREACH, errno.ETIMEDOUT) if e is not None)

_POLICIES = {"rr": 0, "least": 1}

_EPOLLIN = select.EPOLLIN
_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, NUL included

__all__ = [
    "BACKEND", "MAX_FDS", "MAX_PAYLOAD", "SLOT_SIZE", "Message", "Event", "Dispatcher",
    "send_msg", "recv_msg", "listen_tcp", "listen_unix", "adopt_listener",
    "MSG_CONN", "MSG_READY", "MSG_CREDIT", "MSG_DRAIN", "MSG_USER", "MSG_CTL",
    "STATE_FREE", "STATE_SPAWNING", "STATE_READY", "STATE_DRAINING", "STATE_GONE",
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


def _oserror(code):
    return OSError(code, os.strerror(code))


def _index(name, value):
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError("%s must be an integer, got %r" % (name, value)) from None


def _close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _wrap(fd, family=-1, type=-1):
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


def _borrow(fd):
    """A socket object over fd that does not own it: callers must detach()."""
    if fd < 0:
        raise _oserror(errno.EBADF)
    # A wrong family guess only matters for address calls we never make.
    return _wrap(fd, socket.AF_UNIX, socket.SOCK_SEQPACKET)


# ---- messages -------------------------------------------------------------

def _pack(type, arg, payload, fds):
    type = _index("type", type)
    arg = _index("arg", arg)
    if not 0 <= arg <= _U32:
        raise ValueError("arg must be 0..2**32-1, got %d" % arg)
    payload = memoryview(payload).cast("B")
    if not MSG_CONN <= type <= MSG_CTL:
        raise _oserror(errno.EINVAL)
    if payload.nbytes > MAX_PAYLOAD or len(fds) > MAX_FDS:
        raise _oserror(errno.EMSGSIZE)
    hdr = _HDR.pack(MSG_MAGIC, type, len(fds), payload.nbytes, arg)
    iov = [hdr, payload] if payload.nbytes else [hdr]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
    return iov, anc


def _send(sock, type, arg, payload, fds, flags=0):
    iov, anc = _pack(type, arg, payload, fds)
    # MSG_NOSIGNAL: a dead peer is EPIPE, not SIGPIPE. Python retries EINTR.
    sock.sendmsg(iov, anc, socket.MSG_NOSIGNAL | flags)


def send_msg(fd, type, arg=0, payload=b"", fds=()):
    """Sends one message on channel fd. EMSGSIZE (payload > MAX_PAYLOAD or more
    than MAX_FDS fds), EINVAL (bad type), BlockingIOError when a non-blocking
    channel is full, BrokenPipeError when the peer is gone. Never closes fds."""
    fd = _index("fd", fd)
    fds = [_index("fd", f) for f in fds]
    sock = _borrow(fd)
    try:
        _send(sock, type, arg, payload, fds)
    finally:
        sock.detach()


def _parse(data, anc, flags, max_fds):
    """Checks one received datagram; returns a Message or raises with every
    received fd closed."""
    fds = []
    bad = False
    rights = 0
    for level, ctype, cdata in anc:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            rights += 1
            whole = len(cdata) - len(cdata) % _INT
            fds.extend(array("i", cdata[:whole]))
            if whole != len(cdata):
                bad = True
        else:
            bad = True  # SCM_CREDENTIALS and the like: not our protocol
    try:
        if not data and not anc:
            # EOF: the peer closed. An empty datagram without fds looks the
            # same; no valid message is that short.
            raise _oserror(errno.EPIPE)
        # MSG_TRUNC: the datagram was longer than header + MAX_PAYLOAD, so its
        # header cannot match it (C reads the real length and finds that).
        if bad or rights > 1 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise _oserror(errno.EBADMSG)
        if len(data) < HDR_SIZE:
            raise _oserror(errno.EBADMSG)
        magic, mtype, nfds, length, arg = _HDR.unpack_from(data)
        if magic != MSG_MAGIC or not MSG_CONN <= mtype <= MSG_CTL:
            raise _oserror(errno.EBADMSG)
        if length > MAX_PAYLOAD or length != len(data) - HDR_SIZE or nfds != len(fds):
            raise _oserror(errno.EBADMSG)
        if len(fds) > max_fds:
            raise _oserror(errno.EMSGSIZE)
    except OSError:
        _close_all(fds)
        raise
    return Message(mtype, arg, bytes(data[HDR_SIZE:]), fds)


def _recv(sock, max_fds, flags=0):
    # The cmsg buffer always holds MAX_FDS fds, as in C: more than that is
    # MSG_CTRUNC (the kernel closes what did not fit); more than max_fds but
    # at most MAX_FDS is EMSGSIZE after every other check.
    data, anc, mflags, _ = sock.recvmsg(HDR_SIZE + MAX_PAYLOAD, _CMSG_MAX,
                                        _RECV_FLAGS | flags)
    return _parse(data, anc, mflags, max_fds)


def recv_msg(fd, max_fds=MAX_FDS):
    """Receives one message from channel fd. BrokenPipeError on EOF,
    BlockingIOError when a non-blocking channel is empty, OSError(EBADMSG) for a
    malformed message, OSError(EMSGSIZE) when more than max_fds fds came; on
    every error all fds received are closed first. Received fds are CLOEXEC."""
    fd = _index("fd", fd)
    max_fds = _index("max_fds", max_fds)
    if not 0 <= max_fds <= MAX_FDS:
        raise ValueError("max_fds must be 0..%d, got %d" % (MAX_FDS, max_fds))
    sock = _borrow(fd)
    try:
        return _recv(sock, max_fds)
    finally:
        sock.detach()


# ---- listeners ------------------------------------------------------------

def _finish_listener(sock, backlog):
    sock.listen(backlog)
    sock.setblocking(False)  # O_NONBLOCK; Python sockets are CLOEXEC already
    return sock.detach()


def _check_backlog(backlog):
    backlog = _index("backlog", backlog)
    if backlog < 1:
        raise ValueError("backlog must be >= 1, got %d" % backlog)
    return backlog


# getaddrinfo speaks EAI_*, the API speaks errno (as listen.c maps them): an
# unknown host cannot be bound, hence EADDRNOTAVAIL.
_GAI_ERRNO = {socket.EAI_NONAME: errno.EADDRNOTAVAIL, socket.EAI_AGAIN: errno.EAGAIN,
              socket.EAI_MEMORY: errno.ENOMEM}
for _name in ("EAI_NODATA", "EAI_ADDRFAMILY"):
    if hasattr(socket, _name):
        _GAI_ERRNO[getattr(socket, _name)] = errno.EADDRNOTAVAIL
# bind errors that mean "this family/address does not exist here, try the
# next address" (e.g. localhost -> ::1 without IPv6); anything else is the answer.
_TRY_NEXT = frozenset((errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EADDRNOTAVAIL,
                       errno.EPFNOSUPPORT))


def _listen_ai(family, stype, proto, addr, backlog, reuseport):
    sock = socket.socket(family, stype, proto)
    try:
        # SO_REUSEADDR: a restarted primary must bind while old connections
        # sit in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # Both ways: the default comes from the bindv6only sysctl, and
            # "::" should mean dual-stack on every machine.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(addr)
        return _finish_listener(sock, backlog)
    except BaseException:
        sock.close()
        raise


def listen_tcp(host, port, backlog=2048, reuseport=False):
    """Returns a listening TCP fd (non-blocking, CLOEXEC, SO_REUSEADDR) bound to
    host:port; host None or "" means any address ("::" dual-stack first, as
    Node's server.listen(port), then 0.0.0.0)."""
    port = _index("port", port)
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0..65535, got %d" % port)
    backlog = _check_backlog(backlog)
    anyhost = not host
    try:
        infos = socket.getaddrinfo(None if anyhost else host, port, socket.AF_UNSPEC,
                                   socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE | socket.AI_NUMERICSERV)
    except socket.gaierror as exc:
        if exc.errno == getattr(socket, "EAI_SYSTEM", None):
            raise
        code = _GAI_ERRNO.get(exc.errno, errno.EINVAL)
        raise OSError(code, "%s: %s" % (os.strerror(code), exc.strerror)) from None
    if anyhost:
        infos = ([i for i in infos if i[0] == socket.AF_INET6]
                 + [i for i in infos if i[0] != socket.AF_INET6])
    last = _oserror(errno.EADDRNOTAVAIL)
    for family, stype, proto, _, addr in infos:
        try:
            return _listen_ai(family, stype, proto, addr, backlog, reuseport)
        except OSError as exc:
            if exc.errno not in _TRY_NEXT:
                raise
            last = exc
    raise last


def _unix_stale(path):
    """True when path is a socket file nobody listens on (connect refused)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True  # vanished: just retry the bind
    if not stat.S_ISSOCK(st.st_mode):
        return False
    # Non-blocking probe: a live server with a full backlog answers EAGAIN
    # rather than making us wait; only ECONNREFUSED proves nobody is there.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def listen_unix(path, backlog=2048, mode=0o666):
    """Returns a listening AF_UNIX fd at path (non-blocking, CLOEXEC), chmod'ed to
    mode. A socket file left by a dead server is replaced; a live one, or any
    other file, is EADDRINUSE."""
    path = os.fspath(path)
    backlog = _check_backlog(backlog)
    mode = _index("mode", mode)
    bpath = os.fsencode(path)
    if not bpath or not 0 <= mode <= 0o7777:
        raise _oserror(errno.EINVAL)
    if len(bpath) >= _SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not _unix_stale(path):
                raise
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            sock.bind(path)  # a server racing us gets EADDRINUSE; no loop
        try:
            # chmod before listen: until listen, connect is refused whatever
            # the umask allowed.
            os.chmod(path, mode)
            return _finish_listener(sock, backlog)
        except BaseException:
            os.unlink(path)  # we created it
            raise
    except BaseException:
        sock.close()
        raise


def adopt_listener(fd):
    """Returns fd after checking it is a listening stream socket and making it
    non-blocking and CLOEXEC: EBADF, ENOTSOCK, EINVAL otherwise."""
    fd = _index("fd", fd)
    if fd < 0:
        raise _oserror(errno.EBADF)
    os.fstat(fd)  # EBADF before a socket object is made over it
    sock = _borrow(fd)
    try:
        # SO_ACCEPTCONN: ENOTSOCK for a pipe or file, 0 if nobody listened.
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise _oserror(errno.EINVAL)
        # SEQPACKET also listens, but the dispatcher hands out byte streams.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            raise _oserror(errno.EINVAL)
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    finally:
        sock.detach()
    return fd


# ---- dispatcher -----------------------------------------------------------
#
# The structure follows csrc/dispatch*.c function by function (pf__tick,
# pf__flush, pf__pick_rr, ...), so a behaviour found in one is easy to find
# in the other.

_BLK_NONE, _BLK_OUT, _BLK_RETRY = 0, 1, 2      # why a READY worker is skipped
_ACC_AGAIN, _ACC_MORE, _ACC_PAUSE, _ACC_DEAD = range(4)
_CREDITS_PER_WAKEUP = 64  # a chatty worker cannot starve the others
_CHAN_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
_CHAN_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_GONE_ERRNOS = frozenset((errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN))
_ACCEPT_DEAD = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK, errno.EFAULT))


def _ranged(name, value, lo, hi):
    value = _index(name, value)
    if not lo <= value <= hi:
        raise ValueError("%s must be %d..%d, got %d" % (name, lo, hi, value))
    return value


def _is_seqpacket(fd):
    try:
        sock = _borrow(fd)
    except OSError:
        return False
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_SEQPACKET
    except OSError:
        return False
    finally:
        sock.detach()


class _Worker:
    __slots__ = ("chan", "peer", "sock", "psock", "state", "blocked", "in_epoll",
                 "out_armed", "hup_pending", "sent")

    def __init__(self):
        self.reset()

    def reset(self):
        self.chan = self.peer = -1
        self.sock = self.psock = None
        self.state = STATE_FREE
        self.blocked = _BLK_NONE
        self.in_epoll = self.out_armed = self.hup_pending = False
        self.sent = 0


class _Listener:
    __slots__ = ("fd", "sock", "tcp", "in_poll", "at_eagain", "dead")

    def __init__(self, fd, sock, tcp):
        self.fd, self.sock, self.tcp = fd, sock, tcp
        self.in_poll = self.at_eagain = self.dead = False


class Dispatcher:
    """Accept loop + worker table, fixed capacity. See the module docstring."""

    def __init__(self, capacity, policy="rr", max_inflight=1000, max_listeners=16,
                 max_watch=16, max_pending=1024, accept_batch=32, emfile_pause_ms=100):
        self._closed = True  # until everything below exists (close() is a no-op)
        if not isinstance(policy, str) or policy not in _POLICIES:
            raise ValueError("unknown policy %r: expected 'rr' or 'least'" % (policy,))
        self._capacity = _ranged("capacity", capacity, 1, 4096)
        self._policy = policy
        self._least = policy == "least"
        self._max_inflight = _ranged("max_inflight", max_inflight, 1, 1 << 20)
        self._max_listeners = _ranged("max_listeners", max_listeners, 1, 64)
        self._max_watch = _ranged("max_watch", max_watch, 0, 64)
        self._max_pending = _ranged("max_pending", max_pending, 1, 65536)
        self._accept_batch = _ranged("accept_batch", accept_batch, 1, self._max_pending)
        # >= 1 so EMFILE can never become a spin; <= 60 s (longer is an outage).
        self._pause_s = _ranged("emfile_pause_ms", emfile_pause_ms, 1, 60000) / 1000.0

        self._workers = [_Worker() for _ in range(self._capacity)]
        self._by_chan = {}        # chan fd -> slot
        self._hi = 0              # slots >= hi were never used: scans stop there
        self._n_ready = 0
        self._rr_next = 0
        self._n_hup = 0           # workers owed a HANGUP event
        self._listeners = []      # [_Listener], order as in C (swap-remove)
        self._watches = []        # [[fd, tag]]
        self._pend = deque()      # (fd, recovered), at most max_pending
        self._accepting = True    # listeners are (wanted) in the poll set
        self._stopping = False
        self._drained = False
        self._drained_unreported = False
        self._more = False        # a drain pass has work left: poll without sleeping
        self._pause_until = 0.0   # EMFILE pause end (monotonic s), 0 = none
        self._recheck_at = 0.0    # _BLK_RETRY flags clear then, 0 = none
        self._out = None          # the run call's event list
        self._st = dict.fromkeys(("accepted", "dispatched", "redispatched", "busy_skips",
                                  "fd_exhaustion", "accept_errors", "dropped", "wakeups"), 0)
        self._map = mmap.mmap(-1, self._capacity * SLOT_SIZE)  # MAP_SHARED|MAP_ANONYMOUS
        try:
            self._ep = select.epoll()
        except BaseException:
            self._map.close()
            raise
        # No /dev/null (odd chroot) only costs the EMFILE trick, not the loop.
        try:
            self._reserve = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._reserve = -1
        self._reserve_wanted = self._reserve >= 0
        self._view = memoryview(self._map)
        self._board = Scoreboard(self._view, self._capacity)
        self._slots = [self._board.slot(i) for i in range(self._capacity)]
        self._closed = False

    # -- plumbing ---------------------------------------------------------
    def _check(self):
        if self._closed:
            raise ValueError("dispatcher is closed")

    def _slot(self, slot):
        self._check()
        slot = _index("slot", slot)
        if not 0 <= slot < self._capacity:
            raise ValueError("slot %d out of range 0..%d" % (slot, self._capacity - 1))
        return slot

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- never raise from a finalizer
            pass

    def __repr__(self):
        return "<pyfork._pure.Dispatcher capacity=%d policy=%s%s>" % (
            self._capacity, self._policy, " closed" if self._closed else "")

    @property
    def scoreboard(self):
        self._check()
        return self._view

    def _emit(self, kind, slot, tag):
        if self._out is None:
            return False
        self._out.append(Event(kind, slot, tag))
        return True

    # -- listeners and watched fds ------------------------------------------
    def _find_listener(self, fd):
        for lst in self._listeners:
            if lst.fd == fd:
                return lst
        return None

    def add_listener(self, fd):
        self._check()
        fd = _index("fd", fd)
        if fd < 0:
            raise _oserror(errno.EINVAL)
        if self._find_listener(fd) is not None:
            raise _oserror(errno.EEXIST)
        if len(self._listeners) >= self._max_listeners:
            raise _oserror(errno.ENOSPC)
        # The family is fixed for the socket's life: decide TCP_NODELAY once
        # (the probe is getsockname, as in C: ENOTSOCK, EBADF).
        sock = _wrap(fd)
        try:
            lst = _Listener(fd, sock, sock.family in (socket.AF_INET, socket.AF_INET6))
            if self._accepting:
                self._ep.register(fd, _EPOLLIN)
                lst.in_poll = True
        except BaseException:
            sock.detach()
            raise
        self._listeners.append(lst)

    def remove_listener(self, fd):
        self._check()
        lst = self._find_listener(_index("fd", fd))
        if lst is None:
            raise _oserror(errno.ENOENT)
        if lst.in_poll:
            self._unregister(lst.fd)  # EBADF if the caller closed it first: fine
        i = self._listeners.index(lst)
        last = self._listeners.pop()
        if last is not lst:
            self._listeners[i] = last
        lst.sock.detach()

    def watch(self, fd, tag):
        self._check()
        fd = _index("fd", fd)
        tag = _index("tag", tag)
        if not 0 <= tag <= _U32:
            raise ValueError("tag must be 0..2**32-1, got %d" % tag)
        if fd < 0:
            raise _oserror(errno.EINVAL)
        if any(w[0] == fd for w in self._watches):
            raise _oserror(errno.EEXIST)
        if len(self._watches) >= self._max_watch:
            raise _oserror(errno.ENOSPC)
        self._ep.register(fd, _EPOLLIN)
        self._watches.append([fd, tag])

    def unwatch(self, fd):
        self._check()
        fd = _index("fd", fd)
        for i, w in enumerate(self._watches):
            if w[0] == fd:
                self._unregister(fd)
                last = self._watches.pop()
                if last is not w:
                    self._watches[i] = last
                return
        raise _oserror(errno.ENOENT)

    def _unregister(self, fd):
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass  # the caller closed it already: epoll forgot it by itself

    # -- workers ----------------------------------------------------------
    def add_worker(self, slot, chan, peer=-1):
        slot = self._slot(slot)
        chan = _index("chan", chan)
        peer = _index("peer", peer)
        if chan < 0 or peer < -1 or chan == peer:
            raise ValueError("bad channel fds chan=%d peer=%d" % (chan, peer))
        w = self._workers[slot]
        if w.state != STATE_FREE:
            raise _oserror(errno.EEXIST)
        # Channels are SOCK_SEQPACKET: anything else (or no fd at all) is
        # refused here rather than misparsed later.
        if not _is_seqpacket(chan) or (peer >= 0 and not _is_seqpacket(peer)):
            raise _oserror(errno.EINVAL)
        was_blocking = os.get_blocking(chan)
        os.set_blocking(chan, False)
        try:
            self._ep.register(chan, _CHAN_EVENTS)
        except BaseException:
            os.set_blocking(chan, was_blocking)  # "nothing is owned": as it was
            raise
        # From here on both fds are ours.
        self._slots[slot].clear()
        w.reset()
        w.chan, w.peer = chan, peer
        w.sock = _wrap(chan, socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if peer >= 0:
            w.psock = _wrap(peer, socket.AF_UNIX, socket.SOCK_SEQPACKET)
        w.state = STATE_SPAWNING
        w.in_epoll = True
        self._by_chan[chan] = slot
        if slot >= self._hi:
            self._hi = slot + 1

    def _set_state(self, slot, state):
        """A GONE worker stays GONE: draining it is vacuously done, making it
        READY is EPIPE (its channel is closed)."""
        w = self._workers[self._slot(slot)]
        if w.state == STATE_FREE:
            raise _oserror(errno.ENOENT)
        if w.state == STATE_GONE:
            if state == STATE_DRAINING:
                return
            raise _oserror(errno.EPIPE)
        if w.state == STATE_READY:
            self._n_ready -= 1
        if state == STATE_READY:
            self._n_ready += 1
        w.state = state

    def set_ready(self, slot):
        self._set_state(slot, STATE_READY)

    def set_draining(self, slot):
        self._set_state(slot, STATE_DRAINING)

    def remove_worker(self, slot):
        """Frees the slot, reads back the CONN messages still queued to it (from
        the held peer end) and re-dispatches them (or holds them pending), then
        closes chan and peer. Returns how many fds were recovered."""
        slot = self._slot(slot)
        w = self._workers[slot]
        if w.state == STATE_FREE:
            raise _oserror(errno.ENOENT)
        # Free the slot first so the recovery's flush cannot pick it.
        if w.state == STATE_READY:
            self._n_ready -= 1
        if w.hup_pending:
            self._n_hup -= 1
        if w.in_epoll:
            self._unregister(w.chan)
        sock, psock, chan = w.sock, w.psock, w.chan
        del self._by_chan[chan]
        w.reset()
        got = 0
        if psock is not None:
            got = self._recover(psock)
            psock.close()
        sock.close()
        return got

    def _recover(self, psock):
        try:
            # The worker is dead or being discarded: a recv that blocks on its
            # (maybe blocking) file description would hang the primary.
            psock.setblocking(False)
        except OSError:
            return 0
        got = 0
        while True:
            try:
                msg = _recv(psock, MAX_FDS)
            except OSError as exc:
                if exc.errno in (errno.EBADMSG, errno.EMSGSIZE):
                    continue  # that datagram is consumed; next
                break         # EAGAIN: the queue is empty
            if msg.payload:   # C reads with no payload room: EMSGSIZE, skipped
                _close_all(msg.fds)
                continue
            for fd in msg.fds:
                if msg.type != MSG_CONN:
                    os.close(fd)
                    continue
                if len(self._pend) >= self._max_pending:
                    self._flush()
                    if len(self._pend) >= self._max_pending:
                        os.close(fd)
                        self._st["dropped"] += 1
                        continue
                self._pend.append((fd, True))
                got += 1
            self._flush()
        return got

    def stop_accepting(self):
        self._check()
        if self._stopping:
            return
        self._stopping = True
        self._accepting = False  # the next turn takes them out of the poll set
        for lst in self._listeners:
            lst.at_eagain = False

    # -- stats --------------------------------------------------------------
    def stats(self):
        self._check()
        st = dict(self._st)
        st["pending"] = len(self._pend)
        st["accepting"] = 1 if self._accepting and self._listeners else 0
        return st

    def worker_stats(self, slot):
        slot = self._slot(slot)
        w = self._workers[slot]
        if w.state == STATE_FREE:
            return {"state": STATE_FREE, "sent": 0, "closed": 0, "inflight": 0}
        closed = self._slots[slot].closed
        return {"state": w.state, "sent": w.sent, "closed": closed, "inflight": w.sent - closed}

    # -- close ----------------------------------------------------------------
    def close(self):
        """Closes every fd the dispatcher owns (channels, peers, pending fds,
        epoll, reserve fd) and drops the scoreboard. Listeners and watched fds
        stay the caller's. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers[:self._hi]:
            if w.sock is not None:
                w.sock.close()
            if w.psock is not None:
                w.psock.close()
            w.reset()
        self._by_chan.clear()
        _close_all(fd for fd, _ in self._pend)
        self._pend.clear()
        for lst in self._listeners:
            lst.sock.detach()  # the caller's fd
        self._listeners = []
        self._watches = []
        self._ep.close()
        if self._reserve >= 0:
            os.close(self._reserve)
            self._reserve = -1
        self._slots = []
        self._board.release()
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view: unmapped when that goes away

    # -- sending (dispatch_send.c) ---------------------------------------------
    def _load(self, s):
        closed = self._slots[s].closed
        sent = self._workers[s].sent
        return 0 if closed >= sent else sent - closed

    def _room(self, s):
        """How many more fds slot s may take now; 0 = full, a busy skip. When
        full it asks for a CREDIT (want_credit), then looks again: a close that
        raced the skip either shows up here or sends the CREDIT (and the 10 ms
        recheck covers what Python cannot fence)."""
        room = self._max_inflight - self._load(s)
        if room > 0:
            return room
        self._slots[s].request_credit()
        room = self._max_inflight - self._load(s)
        if room > 0:
            return room
        self._st["busy_skips"] += 1
        return 0

    def _candidate(self, s):
        w = self._workers[s]
        return w.state == STATE_READY and w.blocked == _BLK_NONE

    def _pick_rr(self, share):
        hi = self._hi
        for i in range(hi):
            s = (self._rr_next + i) % hi
            if not self._candidate(s):
                continue
            room = self._room(s)
            if room == 0:
                continue
            self._rr_next = s + 1
            return s, min(share, room, MAX_FDS)
        return -1, 0

    def _better(self, a, la, b, lb):
        if la != lb:
            return la < lb
        ba = self._slots[a].busy_since_ns
        bb = self._slots[b].busy_since_ns
        if (ba == 0) != (bb == 0):
            return ba == 0      # idle beats busy
        return ba > bb          # busy since later = less likely stuck

    def _pick_least(self):
        """The emptiest candidate, with enough fds to catch up with the
        runner-up."""
        best = -1
        bload = broom = 0
        second = None
        for s in range(self._hi):
            if not self._candidate(s):
                continue
            room = self._room(s)
            if room == 0:
                continue
            load = self._max_inflight - room
            if best < 0 or self._better(s, load, best, bload):
                if best >= 0:
                    second = bload if second is None else min(second, bload)
                best, bload, broom = s, load, room
            else:
                second = load if second is None else min(second, load)
        if best < 0:
            return -1, 0
        n = min(broom, MAX_FDS)
        if second is not None and second - bload < n:
            n = max(second - bload, 1)
        return best, n

    def _chan_events(self, w, extra):
        self._ep.modify(w.chan, _CHAN_EVENTS | extra)
        w.out_armed = bool(extra & select.EPOLLOUT)

    def _mark_gone(self, s):
        """The channel is dead: no more sends, no more polling, and the caller
        is owed exactly one HANGUP (emitted by the loop)."""
        w = self._workers[s]
        if w.state in (STATE_GONE, STATE_FREE):
            return
        if w.state == STATE_READY:
            self._n_ready -= 1
        w.state = STATE_GONE
        w.blocked = _BLK_NONE
        if w.in_epoll:
            self._unregister(w.chan)
            w.in_epoll = w.out_armed = False
        w.hup_pending = True
        self._n_hup += 1

    def _clear_retry(self):
        for w in self._workers[:self._hi]:
            if w.blocked == _BLK_RETRY:
                w.blocked = _BLK_NONE
        self._recheck_at = 0.0

    def _send_batch(self, s, n):
        w = self._workers[s]
        batch = list(itertools.islice(self._pend, min(n, len(self._pend))))
        fds = [fd for fd, _ in batch]
        try:
            _send(w.sock, MSG_CONN, 0, b"", fds)
        except OSError as exc:
            code = exc.errno
        else:
            for _ in batch:
                self._pend.popleft()
            _close_all(fds)  # the worker holds its own copies now
            self._st["redispatched"] += sum(1 for _, r in batch if r)
            self._st["dispatched"] += len(batch)
            w.sent += len(batch)
            return
        self._st["busy_skips"] += 1
        if code in (errno.EAGAIN, errno.EWOULDBLOCK):
            # The worker's queue is full: it is busy. EPOLLOUT fires once it
            # has read enough.
            w.blocked = _BLK_OUT
            if not w.out_armed:
                try:
                    self._chan_events(w, select.EPOLLOUT)
                except OSError:
                    w.blocked = _BLK_RETRY
        elif code in _GONE_ERRNOS:
            self._mark_gone(s)
        else:
            w.blocked = _BLK_RETRY  # ENOBUFS, ETOOMANYREFS: try again later
        if w.blocked == _BLK_RETRY and not self._recheck_at:
            self._recheck_at = time.monotonic() + _RECHECK_S

    def _flush(self):
        """Sends pending fds until none is left or no worker can take more.
        rr share, fixed for this flush: floor(pending / ready), at least 1."""
        share = max(len(self._pend) // self._n_ready, 1) if self._n_ready > 0 else 1
        while self._pend:
            if self._least:
                s, n = self._pick_least()
            else:
                s, n = self._pick_rr(share)
            if s < 0:
                return
            self._send_batch(s, n)

    # -- accepting (dispatch_loop.c) ----------------------------------------------
    def _pause(self):
        self._pause_until = time.monotonic() + self._pause_s

    def _took(self, lst, fd):
        conn = _wrap(fd, socket.AF_INET if lst.tcp else socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.setblocking(False)  # as accept4(SOCK_NONBLOCK) in C
            if lst.tcp:
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
