"""The raw interface (pyfork.serve.raw): handler(sock, addr) per connection, in a forked worker.

Same harness as the WSGI tests (tests/wsgi_harness.py): stopping the worker asserts every
socket taken was reported closed and every handler call that started also finished, and
fd_guard checks the test process's open-fd count is unchanged.
"""
import os
import signal

import pytest

from pyfork.serve import raw


import wsgi_harness as H
pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(120)]


def handler(sock, addr):
    """Line protocol: `echo X`, `addr`, `blocking`, `boom`, `hold`."""
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1024)
        if not data:
            return
        line += data
    cmd = line.strip()
    if cmd == b"boom":
        raise RuntimeError("raw handler failure (expected by the test)")
    if cmd == b"hold":
        H.notify(b"H")
        H.wait_release()
        sock.sendall(b"released\n")
    elif cmd == b"addr":
        sock.sendall(repr(addr).encode() + b"\n")
    elif cmd == b"blocking":
        sock.sendall(repr(sock.getblocking()).encode() + b"\n")
    else:
        sock.sendall(cmd[5:] + b"\n")


def talk(addr, line):
    with H.connect(addr) as sock:
        sock.sendall(line + b"\n")
        return H.recv_all(sock)            # the server closes after the handler returns


def test_detect():
    def plain(sock, addr):
        pass
    assert raw.NAME == "raw"
    assert not raw.detect(plain)           # never guessed from a signature
    plain.pyfork_interface = "raw"
    assert raw.detect(plain)


def test_raw_handler_per_connection():
    with H.Worker(handler, interface="raw") as w:
        assert talk(w.addr, b"echo hello") == b"hello\n"
        with H.connect(w.addr) as sock:
            sock.sendall(b"addr\n")
            assert H.recv_all(sock) == repr(sock.getsockname()).encode() + b"\n"
        assert talk(w.addr, b"blocking") == b"True\n"
        assert talk(w.addr, b"boom") == b""                 # logged; the socket is closed
        assert talk(w.addr, b"echo still serving") == b"still serving\n"
        stats = w.stop()
    assert stats["taken"] == stats["closed"] == stats["started"] == 5


def test_raw_drain_finishes_the_connection_in_hand():
    with H.Worker(handler, interface="raw") as w:
        with H.connect(w.addr) as sock:
            sock.sendall(b"hold\n")
            w.wait_event(b"H")
            os.kill(w.pid, signal.SIGTERM)
            w.release()
            assert H.recv_all(sock) == b"released\n"
        stats = w.join()
    assert stats["taken"] == stats["closed"] == 1
