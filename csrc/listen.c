/* listen.c -- create or adopt the primary's listening sockets.
 *
 * Theory of operation: every listener the dispatcher polls must be
 * non-blocking (accept until EAGAIN) and close-on-exec (the primary forks and
 * workers may exec). pf_listen_tcp resolves host with getaddrinfo and binds
 * the first address that exists on this machine; pf_listen_unix binds a path,
 * replacing a socket file left by a dead server but never a live one;
 * pf_listen_adopt accepts an fd someone else created (fd://N, systemd) after
 * checking it really is a listening stream socket. Setup-time code: it may
 * allocate (getaddrinfo), unlike the accept path.
 * Pure twin: pyfork/_pure/listen.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "pyfork.h"

static int pf__setopt_int(int fd, int level, int name, int value)
{
    return setsockopt(fd, level, name, &value, sizeof(value)) < 0 ? -errno : 0;
}

/* getaddrinfo speaks EAI_*, the API speaks errno. An unknown host cannot be
 * bound, hence EADDRNOTAVAIL ("cannot assign requested address"). */
static int pf__gai_errno(int gai)
{
    switch (gai) {
    case EAI_SYSTEM:
        return errno ? -errno : -EIO;
    case EAI_MEMORY:
        return -ENOMEM;
    case EAI_AGAIN:
        return -EAGAIN;
    case EAI_NONAME:
#ifdef EAI_NODATA
    case EAI_NODATA:
#endif
#ifdef EAI_ADDRFAMILY
    case EAI_ADDRFAMILY:
#endif
        return -EADDRNOTAVAIL;
    default:
        return -EINVAL;
    }
}

/* Returns a listening fd for one resolved address, or -errno (fd closed). */
static int pf__listen_ai(const struct addrinfo *ai, int backlog, int flags)
{
    int fd, rc;

    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
                ai->ai_protocol);
    if (fd < 0)
        return -errno;
    /* SO_REUSEADDR: a restarted primary must bind while old connections
     * sit in TIME_WAIT (every server does this). */
    rc = pf__setopt_int(fd, SOL_SOCKET, SO_REUSEADDR, 1);
    if (rc == 0 && (flags & PF_LISTEN_REUSEPORT))
        rc = pf__setopt_int(fd, SOL_SOCKET, SO_REUSEPORT, 1);
    /* Set V6ONLY both ways: the default comes from the bindv6only sysctl,
     * and "::" should mean the same thing on every machine. */
    if (rc == 0 && ai->ai_family == AF_INET6)
        rc = pf__setopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY,
                            (flags & PF_LISTEN_V6ONLY) ? 1 : 0);
    if (rc == 0 && bind(fd, ai->ai_addr, ai->ai_addrlen) < 0)
        rc = -errno;
    if (rc == 0 && listen(fd, backlog) < 0)
        rc = -errno;
    if (rc < 0)
        goto fail;
    return fd;

fail:
    close(fd);
    return rc;
}

/* Errors that mean "this address family/address does not exist here, try
 * the next one" (e.g. "localhost" -> ::1 on a kernel without IPv6). Any
 * other error (EADDRINUSE, EACCES) is the answer. */
static int pf__try_next(int rc)
{
    return rc == -EAFNOSUPPORT || rc == -EPROTONOSUPPORT ||
           rc == -EADDRNOTAVAIL || rc == -EPFNOSUPPORT;
}

/* Returns a listening fd, or -errno; see pyfork.h. */
int pf_listen_tcp(const char *host, int port, int backlog, int flags)
{
    struct addrinfo hints, *res = NULL, *ai;
    char service[8];
    int any, pass, gai, rc = -EADDRNOTAVAIL;

    if (port < 0 || port > 65535 || backlog < 0 ||
        (flags & ~(PF_LISTEN_REUSEPORT | PF_LISTEN_V6ONLY)) != 0)
        return -EINVAL;
    any = host == NULL || host[0] == '\0';
    snprintf(service, sizeof(service), "%d", port);

    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    /* No AI_ADDRCONFIG: glibc ignores loopback when deciding which families
     * are "configured", so a container with only lo would fail "localhost". */
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    gai = getaddrinfo(any ? NULL : host, service, &hints, &res);
    if (gai != 0)
        return pf__gai_errno(gai);

    /* For "any", prefer "::" (dual-stack, V6ONLY off) over 0.0.0.0 whatever
     * order gai.conf gives, as Node's server.listen(port) does; pass 0 takes
     * IPv6 only, pass 1 the rest. A named host keeps resolver order. */
    for (pass = any ? 0 : 1; pass < 2; pass++) {
        for (ai = res; ai != NULL; ai = ai->ai_next) {
            if (any && (pass == 0) != (ai->ai_family == AF_INET6))
                continue;
            rc = pf__listen_ai(ai, backlog, flags);
            if (rc >= 0 || !pf__try_next(rc))
                goto done;
        }
    }
done:
    freeaddrinfo(res);
    return rc;
}

/* Returns 1 when path is a socket file nobody listens on (connect is
 * refused), 0 when it is anything else, or -errno. */
static int pf__unix_stale(const struct sockaddr_un *sa)
{
    struct stat st;
    int fd, rc;

    if (lstat(sa->sun_path, &st) < 0)
        return errno == ENOENT ? 1 : -errno;   /* vanished: just retry bind */
    if (!S_ISSOCK(st.st_mode))
        return 0;
    /* Non-blocking probe: a live server with a full backlog answers EAGAIN
     * instead of making us wait; only ECONNREFUSED proves nobody is there.
     * A live server does see the probe as one connection closed at once. */
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    rc = connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) < 0 &&
         errno == ECONNREFUSED;
    close(fd);
    return rc;
}

/* Binds fd to sa, replacing a stale socket file once. Returns 0 or -errno. */
static int pf__unix_bind(int fd, const struct sockaddr_un *sa)
{
    int stale;

    if (bind(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0)
        return 0;
    if (errno != EADDRINUSE)
        return -errno;
    stale = pf__unix_stale(sa);
    if (stale <= 0)
        return stale < 0 ? stale : -EADDRINUSE;
    if (unlink(sa->sun_path) < 0 && errno != ENOENT)
        return -errno;
    /* A second server racing us here gets EADDRINUSE from one of the binds;
     * we do not loop. */
    return bind(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0 ? 0 : -errno;
}

/* Returns a listening AF_UNIX fd, or -errno; see pyfork.h. */
int pf_listen_unix(const char *path, int backlog, int mode)
{
    struct sockaddr_un sa;
    size_t len;
    int fd, rc;

    if (path == NULL || path[0] == '\0' || backlog < 0 || mode < 0 || mode > 07777)
        return -EINVAL;
    len = strlen(path);
    if (len >= sizeof(sa.sun_path))          /* keep the terminating NUL */
        return -ENAMETOOLONG;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, len + 1);

    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    rc = pf__unix_bind(fd, &sa);
    if (rc < 0)
        goto fail_close;
    /* fchmod on a socket fd does not touch the path on Linux, so chmod the
     * path. Doing it before listen() closes the race: until listen, connect
     * is refused whatever the umask-derived mode allowed. */
    if (chmod(path, (mode_t)mode) < 0 || listen(fd, backlog) < 0) {
        rc = -errno;
        goto fail_unlink;
    }
    return fd;

fail_unlink:
    unlink(path);                            /* we created it */
fail_close:
    close(fd);
    return rc;
}

/* Returns fd once it is a non-blocking, close-on-exec listening stream
 * socket, or -errno; see pyfork.h. */
int pf_listen_adopt(int fd)
{
    int val = 0, fl;
    socklen_t vlen = sizeof(val);

    if (fd < 0)
        return -EBADF;
    /* SO_ACCEPTCONN answers both questions: ENOTSOCK for a pipe or file,
     * 0 for a socket nobody called listen() on. */
    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &val, &vlen) < 0)
        return -errno;
    if (!val)
        return -EINVAL;
    vlen = sizeof(val);
    /* SEQPACKET also listens, but the dispatcher hands out byte streams. */
    if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &val, &vlen) < 0)
        return -errno;
    if (val != SOCK_STREAM)
        return -EINVAL;

    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -errno;
    fl = fcntl(fd, F_GETFD);
    if (fl < 0 || fcntl(fd, F_SETFD, fl | FD_CLOEXEC) < 0)
        return -errno;
    return fd;
}
