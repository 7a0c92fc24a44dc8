"""Listening sockets for the pure backend (csrc/listen.c): create or adopt them.

Theory of operation: every listener the dispatcher polls must be
non-blocking (accept until EAGAIN) and close-on-exec (the primary forks and
workers may exec). listen_tcp resolves host with getaddrinfo and binds the
first address that exists on this machine; listen_unix binds a path,
replacing a socket file left by a dead server but never a live one;
adopt_listener accepts an fd someone else created (fd://N, systemd) after
checking it really is a listening stream socket. Errors are OSError(errno)
as the C core's -errno, including getaddrinfo's EAI_* codes mapped to errno.
"""

import errno
import os
import socket
import stat

from pyfork._api import check_backlog, index_arg, ranged_arg
from pyfork._pure.internal import borrow_fd, oserror

_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path) on Linux, NUL included


def _finish_listener(sock, backlog):
    sock.listen(backlog)
    sock.setblocking(False)  # O_NONBLOCK; Python sockets are CLOEXEC already
    return sock.detach()


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
    port = ranged_arg("port", port, 0, 65535)
    backlog = check_backlog(backlog)
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
    last = oserror(errno.EADDRNOTAVAIL)
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
    backlog = check_backlog(backlog)
    mode = index_arg("mode", mode)
    bpath = os.fsencode(path)
    if not bpath or not 0 <= mode <= 0o7777:
        raise oserror(errno.EINVAL)
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
    fd = index_arg("fd", fd)
    if fd < 0:
        raise oserror(errno.EBADF)
    os.fstat(fd)  # EBADF before a socket object is made over it
    sock = borrow_fd(fd)
    try:
        # SO_ACCEPTCONN: ENOTSOCK for a pipe or file, 0 if nobody listened.
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise oserror(errno.EINVAL)
        # SEQPACKET also listens, but the dispatcher hands out byte streams.
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            raise oserror(errno.EINVAL)
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    finally:
        sock.detach()
    return fd
