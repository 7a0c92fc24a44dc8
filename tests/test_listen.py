"""Listening sockets on both backends (csrc/listen.c, pyfork/_pure/listen.py).

Theory of operation: listen_tcp, listen_unix and adopt_listener against the real
kernel: flags of the fd they return, addresses, stale and live Unix socket files,
and the errors for what is not a listener.
"""

import errno
import os
import socket

import pytest

from backend_harness import LIVENESS

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]


# ---- listeners ------------------------------------------------------------

def test_listen_tcp_and_adopt(backend):
    fd = backend.listen_tcp("127.0.0.1", 0, backlog=16)
    try:
        assert os.get_blocking(fd) is False and os.get_inheritable(fd) is False
        with socket.socket(fileno=os.dup(fd)) as s:
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            port = s.getsockname()[1]
        # Two SO_REUSEPORT listeners on one port.
        r1 = backend.listen_tcp("127.0.0.1", 0, reuseport=True)
        with socket.socket(fileno=os.dup(r1)) as s:
            rport = s.getsockname()[1]
        r2 = backend.listen_tcp("127.0.0.1", rport, reuseport=True)
        os.close(r1)
        os.close(r2)
        # Any address: reachable over IPv4 loopback (dual-stack "::" or 0.0.0.0).
        anyfd = backend.listen_tcp("", 0)
        with socket.socket(fileno=os.dup(anyfd)) as s:
            aport = s.getsockname()[1]
        socket.create_connection(("127.0.0.1", aport), timeout=LIVENESS).close()
        os.close(anyfd)
        with pytest.raises(OSError) as ei:  # in use, not SO_REUSEPORT
            backend.listen_tcp("127.0.0.1", port)
        assert ei.value.errno == errno.EADDRINUSE
        # adopt: a listening socket passes and becomes non-blocking + CLOEXEC.
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        s.set_inheritable(True)
        s.setblocking(True)
        assert backend.adopt_listener(s.fileno()) == s.fileno()
        assert os.get_blocking(s.fileno()) is False
        assert os.get_inheritable(s.fileno()) is False
        s.close()
        s = socket.socket()  # not listening
        with pytest.raises(OSError) as ei:
            backend.adopt_listener(s.fileno())
        assert ei.value.errno == errno.EINVAL
        s.close()
        pr, pw = os.pipe()
        with pytest.raises(OSError) as ei:
            backend.adopt_listener(pr)
        assert ei.value.errno == errno.ENOTSOCK
        os.close(pr)
        os.close(pw)
    finally:
        os.close(fd)


def test_listen_unix(backend, tmp_path):
    path = str(tmp_path / "s.sock")
    fd = backend.listen_unix(path, mode=0o600)
    assert os.stat(path).st_mode & 0o777 == 0o600
    os.close(fd)
    fd = backend.listen_unix(path)  # a stale socket file is replaced
    c = socket.socket(socket.AF_UNIX)
    c.connect(path)
    c.close()
    with pytest.raises(OSError) as ei:  # a live one never is
        backend.listen_unix(path)
    assert ei.value.errno == errno.EADDRINUSE
    os.close(fd)
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(OSError) as ei:
        backend.listen_unix(str(plain))
    assert ei.value.errno == errno.EADDRINUSE
    assert plain.read_text() == "x"
    with pytest.raises(OSError) as ei:
        backend.listen_unix(str(tmp_path / ("x" * 120)))
    assert ei.value.errno == errno.ENAMETOOLONG
