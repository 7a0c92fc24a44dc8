"""Channel messages on both backends (csrc/fdpass.c, pyfork/_pure/fdpass.py): send_msg, recv_msg, Receiver.

Theory of operation: real SOCK_SEQPACKET socketpairs; malformed datagrams are
built with raw sendmsg (backend_harness.hdr/raw_send), and every rejection must
close every fd that arrived (the open-fd count is checked by fd_guard and by
the tests themselves). Both backends speak the same wire format.
"""

import errno
import os
import socket
import time

import pytest

import pyfork
import pyfork.backend

from backend_harness import HDR, MAGIC, hdr, raw_send, seqpacket_pair

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]


# ---- channel messages ----------------------------------------------------------

def test_message_round_trip_with_fds(backend):
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        backend.send_msg(a.fileno(), backend.MSG_USER, 7, b'{"x": 1}', [r, w])
        msg = backend.recv_msg(b.fileno())
        assert (msg.type, msg.arg, msg.payload, len(msg.fds)) == (backend.MSG_USER, 7,
                                                                   b'{"x": 1}', 2)
        r2, w2 = msg.fds
        assert r2 not in (r, w) and w2 not in (r, w)
        assert os.get_inheritable(r2) is False  # MSG_CMSG_CLOEXEC
        os.write(w2, b"ok")
        assert os.read(r, 2) == b"ok"
        os.close(r2)
        os.close(w2)
        # No fds, no payload; the largest payload; the most fds.
        backend.send_msg(a.fileno(), backend.MSG_READY)
        assert backend.recv_msg(b.fileno()) == (backend.MSG_READY, 0, b"", [])
        big = bytes(range(256)) * 256
        backend.send_msg(a.fileno(), backend.MSG_CTL, 2**32 - 1, big)
        msg = backend.recv_msg(b.fileno())
        assert msg.payload == big and msg.arg == 2**32 - 1
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r] * backend.MAX_FDS)
        msg = backend.recv_msg(b.fileno())
        assert len(msg.fds) == backend.MAX_FDS
        for fd in msg.fds:
            os.close(fd)
        # The wire format is the documented header.
        backend.send_msg(a.fileno(), backend.MSG_USER, 9, b"abc")
        data = b.recv(100)
        assert data == HDR.pack(MAGIC, 5, 0, 3, 9) + b"abc"
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_send_limits(backend):
    a, b = seqpacket_pair()
    try:
        with pytest.raises(OSError) as ei:
            backend.send_msg(a.fileno(), backend.MSG_USER, 0, b"x" * (backend.MAX_PAYLOAD + 1))
        assert ei.value.errno == errno.EMSGSIZE
        with pytest.raises(OSError) as ei:
            backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [0] * (backend.MAX_FDS + 1))
        assert ei.value.errno == errno.EMSGSIZE
        for bad in (0, backend.MSG_PARK + 1, 99):
            with pytest.raises(OSError) as ei:
                backend.send_msg(a.fileno(), bad)
            assert ei.value.errno == errno.EINVAL
        for bad_arg in (-1, 2**32):
            with pytest.raises(ValueError):
                backend.send_msg(a.fileno(), backend.MSG_USER, bad_arg)
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            backend.recv_msg(b.fileno())
    finally:
        a.close()
        b.close()


def test_receiver_matches_recv_msg(backend, open_fds):
    """The worker's hot-path Receiver: same messages as recv_msg, None (not
    BlockingIOError) on an empty non-blocking channel, EBADMSG and EOF as recv_msg."""
    before = open_fds()
    a, b = seqpacket_pair()
    b.setblocking(False)
    r, w = os.pipe()
    try:
        rx = backend.Receiver(b.fileno())
        assert rx.recv() is None
        backend.send_msg(a.fileno(), backend.MSG_CONN, 3, b"", [r, w])
        backend.send_msg(a.fileno(), backend.MSG_USER, 0, b'"hi"')
        t, arg, payload, fds = rx.recv()
        assert (t, arg, payload, len(fds)) == (backend.MSG_CONN, 3, b"", 2)
        for fd in fds:
            os.close(fd)
        assert tuple(rx.recv()) == (backend.MSG_USER, 0, b'"hi"', [])
        assert rx.recv() is None
        raw_send(a, b"garbage!", [r])
        with pytest.raises(OSError) as exc:
            rx.recv()
        assert exc.value.errno == errno.EBADMSG
        a.close()
        with pytest.raises(BrokenPipeError):
            rx.recv()
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
    assert open_fds() == before


def test_eof_and_closed_channel(backend, open_fds):
    a, b = seqpacket_pair()
    fa = a.detach()
    os.close(fa)
    with pytest.raises(BrokenPipeError):
        backend.recv_msg(b.fileno())
    with pytest.raises(BrokenPipeError):  # MSG_NOSIGNAL: EPIPE, not a signal
        backend.send_msg(b.fileno(), backend.MSG_READY)
    b.close()
    # A closed fd: EBADF, never a crash.
    with pytest.raises(OSError) as ei:
        backend.send_msg(fa, backend.MSG_READY)
    assert ei.value.errno == errno.EBADF
    with pytest.raises(OSError) as ei:
        backend.recv_msg(fa)
    assert ei.value.errno == errno.EBADF


GARBAGE = {
    "short": lambda n: hdr(nfds=n)[:10],
    "bad-magic": lambda n: hdr(nfds=n, magic=0xDEADBEEF),
    "bad-type-0": lambda n: hdr(type=0, nfds=n),
    "bad-type-8": lambda n: hdr(type=8, nfds=n),
    "len-too-big": lambda n: hdr(nfds=n, length=10) + b"12345",
    "len-too-small": lambda n: hdr(nfds=n, length=2) + b"12345",
    "nfds-mismatch": lambda n: hdr(nfds=n + 1),
    "fds-without-nfds": lambda n: hdr(nfds=0) if n else hdr(nfds=3),
    "truncated": lambda n: hdr(nfds=n, length=65536 + 64) + b"z" * (65536 + 64),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
@pytest.mark.parametrize("nfds", [0, 3])
def test_garbage_rejected_without_leak(backend, open_fds, case, nfds):
    a, b = seqpacket_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    r, w = os.pipe()
    try:
        before = open_fds()
        raw_send(a, GARBAGE[case](nfds), [r] * nfds)
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno())
        assert ei.value.errno == errno.EBADMSG, ei.value
        assert open_fds() == before, "received fds leaked"
        # The channel is still usable after a bad datagram.
        backend.send_msg(a.fileno(), backend.MSG_READY, 1)
        assert backend.recv_msg(b.fileno()) == (backend.MSG_READY, 1, b"", [])
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_ctrunc_detected(backend, open_fds):
    """More fds than the receiver's buffer holds: the kernel sets MSG_CTRUNC
    (socket.recv_fds would silently return the ones that fit)."""
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        before = open_fds()
        n = backend.MAX_FDS + 8
        raw_send(a, hdr(type=1, nfds=n), [r] * n)
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno())
        assert ei.value.errno == errno.EBADMSG
        assert open_fds() == before
        # A well-formed message with more fds than this receiver allows (but
        # at most MAX_FDS) is EMSGSIZE, every fd closed.
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r] * 5)
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno(), 2)
        assert ei.value.errno == errno.EMSGSIZE
        assert open_fds() == before
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r])
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno(), 0)
        assert ei.value.errno == errno.EMSGSIZE
        assert open_fds() == before
        # The channel still works.
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r])
        msg = backend.recv_msg(b.fileno(), 1)
        assert len(msg.fds) == 1
        os.close(msg.fds[0])
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_foreign_cmsg_rejected(backend, open_fds):
    """SCM_CREDENTIALS (SO_PASSCRED on the receiver) is not our protocol."""
    a, b = seqpacket_pair()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    r, w = os.pipe()
    try:
        before = open_fds()
        backend.send_msg(a.fileno(), backend.MSG_CONN, 0, b"", [r, w])
        with pytest.raises(OSError) as ei:
            backend.recv_msg(b.fileno())
        assert ei.value.errno == errno.EBADMSG
        assert open_fds() == before
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)


def test_socket_default_timeout_is_ignored(backend):
    """An app's socket.setdefaulttimeout() must not change a channel's flags or
    make a non-blocking receive wait."""
    a, b = seqpacket_pair()
    saved = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)
    try:
        assert os.get_blocking(b.fileno()) is True
        b2 = os.dup(b.fileno())
        os.set_blocking(b2, False)  # shares the file description with b
        t0 = time.monotonic()
        with pytest.raises(BlockingIOError):
            backend.recv_msg(b2)
        assert time.monotonic() - t0 < 2.5  # no 5 s poll
        os.close(b2)
        os.set_blocking(b.fileno(), True)
        backend.send_msg(a.fileno(), backend.MSG_READY, 3)
        assert backend.recv_msg(b.fileno()).arg == 3
        assert os.get_blocking(b.fileno()) is True and os.get_blocking(a.fileno()) is True
    finally:
        socket.setdefaulttimeout(saved)
        a.close()
        b.close()


def test_recv_max_fds_range(backend):
    a, b = seqpacket_pair()
    try:
        with pytest.raises(ValueError):
            backend.recv_msg(b.fileno(), backend.MAX_FDS + 1)
        with pytest.raises(ValueError):
            backend.recv_msg(b.fileno(), -1)
    finally:
        a.close()
        b.close()


def test_wire_compatible_across_backends(open_fds):
    try:
        c = pyfork.backend.load("c")
    except ImportError:
        pytest.skip("C backend not built")
    py = pyfork.backend.load("python")
    a, b = seqpacket_pair()
    r, w = os.pipe()
    try:
        for tx, rx in ((c, py), (py, c)):
            tx.send_msg(a.fileno(), tx.MSG_USER, 42, b"hello", [r, w])
            msg = rx.recv_msg(b.fileno())
            assert tuple(msg[:3]) == (5, 42, b"hello") and len(msg.fds) == 2
            for fd in msg.fds:
                os.close(fd)
    finally:
        a.close()
        b.close()
        os.close(r)
        os.close(w)
