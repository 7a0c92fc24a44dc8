"""Channel messages for the pure backend (csrc/fdpass.c): send_msg and recv_msg.

Theory of operation: a channel is one AF_UNIX SOCK_SEQPACKET socketpair per
worker, and a message is one datagram -- a 16-byte header (magic, type,
nfds, len, arg) plus payload -- sent with a single sendmsg, so the socket
keeps it atomic. Its 0..MAX_FDS fds ride in ONE SCM_RIGHTS cmsg. The
receiver trusts nothing: EOF, size, magic, type, length, cmsg level/type/len,
MSG_CTRUNC (which socket.recv_fds does not check) and MSG_TRUNC are checked,
and every fd that arrived is closed on any error. The fd helpers at the top
(_wrap, _borrow, _close_all, ...) are shared by the other _pure modules.
"""

import errno
import operator
import os
import socket
import struct
from array import array
from typing import NamedTuple

MAX_FDS = 32            # PF_MAX_FDS: fds per message (batching limit)
MAX_PAYLOAD = 65536     # PF_MAX_PAYLOAD: bytes after the header
MSG_MAGIC = 0x31464B50  # "PKF1" little-endian
MSG_CONN, MSG_READY, MSG_CREDIT, MSG_DRAIN, MSG_USER, MSG_CTL = 1, 2, 3, 4, 5, 6

_HDR = struct.Struct("<IHHII")  # pf_msg_hdr: magic, type, nfds, len, arg
HDR_SIZE = _HDR.size            # 16
_U32 = 0xFFFFFFFF
_INT = array("i").itemsize      # sizeof(int) in SCM_RIGHTS data
_CMSG_MAX = socket.CMSG_SPACE(MAX_FDS * _INT)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


class Message(NamedTuple):
    type: int
    arg: int
    payload: bytes
    fds: list


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


class Receiver:
    """recv_msg for one channel read on a hot path (mirrors _core.Receiver):
    recv() returns a plain (type, arg, payload, fds) tuple, or None when the
    non-blocking channel is empty."""

    __slots__ = ("_fd", "_max_fds")

    def __init__(self, fd, max_fds=MAX_FDS):
        self._fd = _index("fd", fd)
        max_fds = _index("max_fds", max_fds)
        if not 0 <= max_fds <= MAX_FDS:
            raise ValueError("max_fds must be 0..%d, got %d" % (MAX_FDS, max_fds))
        self._max_fds = max_fds

    def recv(self):
        try:
            return tuple(recv_msg(self._fd, self._max_fds))
        except BlockingIOError:
            return None
