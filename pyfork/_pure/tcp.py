"""Options on a connected TCP socket (mirrors csrc/tcp.c): tcp_cork."""
import errno
import socket

from pyfork._api import index_arg
from pyfork._pure.internal import oserror


def tcp_cork(fd, on):
    """TCP_CORK on or off for the connected TCP socket ``fd`` (see csrc/tcp.c)."""
    fd = index_arg("fd", fd)
    if fd < 0:
        raise oserror(errno.EBADF)  # as setsockopt(-1, ...) in C
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=fd)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)
    finally:
        sock.detach()
