"""Channel messages for the pure backend (csrc/fdpass.c): send_msg and recv_msg.

Theory of operation: a channel is one AF_UNIX SOCK_SEQPACKET socketpair per
worker, and a message is one datagram -- a 16-byte header (magic, type,
nfds, len, arg) plus payload -- sent with a single sendmsg, so the socket
keeps it atomic. Its 0..MAX_FDS fds ride in ONE SCM_RIGHTS cmsg. The
receiver trusts nothing: EOF, size, magic, type, length, cmsg level/type/len,
MSG_CTRUNC (which socket.recv_fds does not check) and MSG_TRUNC are checked,
and every fd that arrived is closed on any error. send_on/recv_on are the
same on a socket object, for the dispatcher's channels; the wire facts
(MSG_MAGIC, HDR) are for dispatch_loop.py's peek at a channel.
"""

import errno
import socket
import struct
from array import array

from pyfork._api import (
    MAX_FDS, MAX_PAYLOAD, MSG_CONN, MSG_PARK, Message, index_arg, ranged_arg, u32_arg,
)
from pyfork._pure.internal import borrow_fd, close_all, oserror

MSG_MAGIC = 0x31464B50  # PF_MSG_MAGIC: "PKF1" little-endian
HDR = struct.Struct("<IHHII")  # pf_msg_hdr: magic, type, nfds, len, arg
HDR_SIZE = HDR.size            # 16
_INT = array("i").itemsize      # sizeof(int) in SCM_RIGHTS data
_CMSG_MAX = socket.CMSG_SPACE(MAX_FDS * _INT)
_RECV_FLAGS = getattr(socket, "MSG_CMSG_CLOEXEC", 0)


# ---- messages -------------------------------------------------------------

def _pack(type, arg, payload, fds):
    type = index_arg("type", type)
    arg = u32_arg("arg", arg)
    payload = memoryview(payload).cast("B")
    if not MSG_CONN <= type <= MSG_PARK:
        raise oserror(errno.EINVAL)
    if payload.nbytes > MAX_PAYLOAD or len(fds) > MAX_FDS:
        raise oserror(errno.EMSGSIZE)
    hdr = HDR.pack(MSG_MAGIC, type, len(fds), payload.nbytes, arg)
    iov = [hdr, payload] if payload.nbytes else [hdr]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
    return iov, anc


def send_on(sock, type, arg, payload, fds, flags=0):
    """send_msg on a socket object (the dispatcher keeps one per channel)."""
    iov, anc = _pack(type, arg, payload, fds)
    # MSG_NOSIGNAL: a dead peer is EPIPE, not SIGPIPE. Python retries EINTR.
    sock.sendmsg(iov, anc, socket.MSG_NOSIGNAL | flags)


def send_msg(fd, type, arg=0, payload=b"", fds=()):
    """Sends one message on channel fd. EMSGSIZE (payload > MAX_PAYLOAD or more
    than MAX_FDS fds), EINVAL (bad type), BlockingIOError when a non-blocking
    channel is full, BrokenPipeError when the peer is gone. Never closes fds."""
    fd = index_arg("fd", fd)
    fds = [index_arg("fd", f) for f in fds]
    sock = borrow_fd(fd)
    try:
        send_on(sock, type, arg, payload, fds)
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
            raise oserror(errno.EPIPE)
        # MSG_TRUNC: the datagram was longer than header + MAX_PAYLOAD, so its
        # header cannot match it (C reads the real length and finds that).
        if bad or rights > 1 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise oserror(errno.EBADMSG)
        if len(data) < HDR_SIZE:
            raise oserror(errno.EBADMSG)
        magic, mtype, nfds, length, arg = HDR.unpack_from(data)
        if magic != MSG_MAGIC or not MSG_CONN <= mtype <= MSG_PARK:
            raise oserror(errno.EBADMSG)
        if length > MAX_PAYLOAD or length != len(data) - HDR_SIZE or nfds != len(fds):
            raise oserror(errno.EBADMSG)
        if len(fds) > max_fds:
            raise oserror(errno.EMSGSIZE)
    except OSError:
        close_all(fds)
        raise
    return Message(mtype, arg, bytes(data[HDR_SIZE:]), fds)


def recv_on(sock, max_fds, flags=0):
    """recv_msg on a socket object (the dispatcher keeps one per channel)."""
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
    fd = index_arg("fd", fd)
    max_fds = ranged_arg("max_fds", max_fds, 0, MAX_FDS)
    sock = borrow_fd(fd)
    try:
        return recv_on(sock, max_fds)
    finally:
        sock.detach()


class Receiver:
    """recv_msg for one channel read on a hot path (mirrors _core.Receiver):
    recv() returns a plain (type, arg, payload, fds) tuple, or None when the
    non-blocking channel is empty."""

    __slots__ = ("_fd", "_max_fds")

    def __init__(self, fd, max_fds=MAX_FDS):
        self._fd = index_arg("fd", fd)
        self._max_fds = ranged_arg("max_fds", max_fds, 0, MAX_FDS)

    def recv(self):
        try:
            return tuple(recv_msg(self._fd, self._max_fds))
        except BlockingIOError:
            return None
