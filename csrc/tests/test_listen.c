/* test_listen.c -- unit tests for pf_listen_tcp / pf_listen_unix / pf_listen_adopt.
 *
 * Theory of operation: each test creates listeners on loopback (ephemeral
 * ports, so parallel test runs never collide) or on a path in a fresh
 * mkdtemp directory, checks the properties the dispatcher relies on
 * (O_NONBLOCK, FD_CLOEXEC, SO_ACCEPTCONN, the right family and options), and
 * proves the socket works by connecting a client and accepting it. Wildcard
 * binds ("0.0.0.0", "::", NULL) are only created and closed, never accepted
 * on. IPv6 tests skip, saying why, when the kernel has no IPv6. Each test
 * checks the process's open-fd count is unchanged. An alarm guards against a
 * hang (e.g. a blocking probe of a live socket with a full backlog).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "pf_test.h"
#include "pyfork.h"

/* ---- helpers ----------------------------------------------------------- */

static int getopt_int(int fd, int level, int name)
{
    int v = -1;
    socklen_t len = sizeof(v);
    CHECK(getsockopt(fd, level, name, &v, &len) == 0);
    return v;
}

/* Checks what every listener must be; returns the bound family. */
static int check_listener(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    CHECK(fd >= 0);
    CHECK(fcntl(fd, F_GETFL) & O_NONBLOCK);
    CHECK(fcntl(fd, F_GETFD) & FD_CLOEXEC);
    CHECK_EQ(getopt_int(fd, SOL_SOCKET, SO_ACCEPTCONN), 1);
    CHECK_EQ(getopt_int(fd, SOL_SOCKET, SO_TYPE), SOCK_STREAM);
    CHECK(getsockname(fd, (struct sockaddr *)&ss, &len) == 0);
    return ss.ss_family;
}

static int tcp_port(int fd)
{
    struct sockaddr_storage ss;
    socklen_t len = sizeof(ss);

    CHECK(getsockname(fd, (struct sockaddr *)&ss, &len) == 0);
    if (ss.ss_family == AF_INET)
        return ntohs(((struct sockaddr_in *)&ss)->sin_port);
    CHECK_EQ(ss.ss_family, AF_INET6);
    return ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
}

/* Connects a blocking client to addr, accepts it on the non-blocking
 * listener (waiting up to 10 s: liveness only) and passes one byte. */
static void connect_accept(int lfd, const struct sockaddr *addr, socklen_t alen)
{
    struct pollfd p = {.fd = lfd, .events = POLLIN};
    int c, s;
    char b = 0;

    c = socket(addr->sa_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    CHECK(c >= 0);
    CHECK(connect(c, addr, alen) == 0);
    CHECK_EQ(poll(&p, 1, 10000), 1);
    s = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK(s >= 0);
    CHECK_EQ(write(c, "k", 1), 1);
    CHECK_EQ(read(s, &b, 1), 1);
    CHECK_EQ(b, 'k');
    close(s);
    close(c);
}

static void connect_v4(int lfd, const char *ip)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(tcp_port(lfd))};
    CHECK(inet_pton(AF_INET, ip, &sa.sin_addr) == 1);
    connect_accept(lfd, (struct sockaddr *)&sa, sizeof(sa));
}

static void connect_v6(int lfd, const char *ip)
{
    struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_port = htons(tcp_port(lfd))};
    CHECK(inet_pton(AF_INET6, ip, &sa.sin6_addr) == 1);
    connect_accept(lfd, (struct sockaddr *)&sa, sizeof(sa));
}

static void connect_unix(int lfd, const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strcpy(sa.sun_path, path);
    connect_accept(lfd, (struct sockaddr *)&sa, sizeof(sa));
}

/* 1 when this kernel can bind ::1; otherwise prints why and returns 0. */
static int have_ipv6(const char *test)
{
    struct sockaddr_in6 sa = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    int fd = socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0), ok;

    if (fd < 0) {
        printf("SKIP %s: no IPv6 sockets (%s)\n", test, strerror(errno));
        return 0;
    }
    ok = bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0;
    if (!ok)
        printf("SKIP %s: cannot bind [::1] (%s)\n", test, strerror(errno));
    close(fd);
    return ok;
}

/* ---- TCP --------------------------------------------------------------- */

static void test_tcp_ipv4_loopback(void)
{
    int before = count_fds(), fd;

    fd = pf_listen_tcp("127.0.0.1", 0, 16, 0);
    CHECK_OK(fd);
    CHECK_EQ(check_listener(fd), AF_INET);
    CHECK(tcp_port(fd) != 0);                 /* port 0 = ephemeral */
    CHECK_EQ(getopt_int(fd, SOL_SOCKET, SO_REUSEADDR), 1);
    CHECK_EQ(getopt_int(fd, SOL_SOCKET, SO_REUSEPORT), 0);
    connect_v4(fd, "127.0.0.1");
    close(fd);
    CHECK_EQ(count_fds(), before);
}

static void test_tcp_ipv6_loopback(void)
{
    int before = count_fds(), fd;

    if (!have_ipv6(__func__))
        return;
    fd = pf_listen_tcp("::1", 0, 16, 0);
    CHECK_OK(fd);
    CHECK_EQ(check_listener(fd), AF_INET6);
    /* No V6ONLY assertion here: Linux forces it on for any bind to a
     * specific IPv6 address (inet6_bind); only "::" honours the flag. */
    connect_v6(fd, "::1");
    close(fd);

    fd = pf_listen_tcp("::1", 0, 16, PF_LISTEN_V6ONLY);
    CHECK_OK(fd);
    CHECK_EQ(getopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY), 1);
    connect_v6(fd, "::1");
    close(fd);
    CHECK_EQ(count_fds(), before);
}

static void test_tcp_localhost_name(void)
{
    int before = count_fds(), fd, fam;

    /* Resolved through /etc/hosts (files before dns), never the network. */
    fd = pf_listen_tcp("localhost", 0, 16, 0);
    CHECK_OK(fd);
    fam = check_listener(fd);
    CHECK(fam == AF_INET || fam == AF_INET6);
    if (fam == AF_INET)
        connect_v4(fd, "127.0.0.1");
    else
        connect_v6(fd, "::1");
    close(fd);
    CHECK_EQ(count_fds(), before);
}

static void test_tcp_wildcards(void)
{
    int before = count_fds(), fd, v6 = have_ipv6(__func__);

    fd = pf_listen_tcp("0.0.0.0", 0, 16, 0);
    CHECK_OK(fd);
    CHECK_EQ(check_listener(fd), AF_INET);
    close(fd);

    /* NULL and "" mean any: "::" dual-stack when IPv6 exists, else 0.0.0.0. */
    fd = pf_listen_tcp(NULL, 0, 16, 0);
    CHECK_OK(fd);
    CHECK_EQ(check_listener(fd), v6 ? AF_INET6 : AF_INET);
    if (v6)
        CHECK_EQ(getopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY), 0);
    close(fd);
    fd = pf_listen_tcp("", 0, 16, 0);
    CHECK_OK(fd);
    CHECK_EQ(check_listener(fd), v6 ? AF_INET6 : AF_INET);
    close(fd);

    if (v6) {
        fd = pf_listen_tcp("::", 0, 16, 0);
        CHECK_OK(fd);
        CHECK_EQ(check_listener(fd), AF_INET6);
        CHECK_EQ(getopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY), 0);
        close(fd);
        fd = pf_listen_tcp("::", 0, 16, PF_LISTEN_V6ONLY);
        CHECK_OK(fd);
        CHECK_EQ(getopt_int(fd, IPPROTO_IPV6, IPV6_V6ONLY), 1);
        close(fd);
    }
    CHECK_EQ(count_fds(), before);
}

static void test_tcp_reuseport(void)
{
    int before = count_fds(), a, b, port;

    a = pf_listen_tcp("127.0.0.1", 0, 16, PF_LISTEN_REUSEPORT);
    CHECK_OK(a);
    CHECK_EQ(getopt_int(a, SOL_SOCKET, SO_REUSEPORT), 1);
    port = tcp_port(a);
    /* A second SO_REUSEPORT listener on the same port (one per worker). */
    b = pf_listen_tcp("127.0.0.1", port, 16, PF_LISTEN_REUSEPORT);
    CHECK_OK(b);
    CHECK_EQ(tcp_port(b), port);
    /* Without the flag the port is taken; SO_REUSEADDR alone never lets two
     * sockets listen on one port on Linux. */
    CHECK_EQ(pf_listen_tcp("127.0.0.1", port, 16, 0), -EADDRINUSE);
    close(b);
    CHECK_EQ(pf_listen_tcp("127.0.0.1", port, 16, 0), -EADDRINUSE);
    close(a);
    CHECK_EQ(count_fds(), before);
}

static void test_tcp_errors(void)
{
    int before = count_fds();

    CHECK_EQ(pf_listen_tcp("127.0.0.1", -1, 16, 0), -EINVAL);
    CHECK_EQ(pf_listen_tcp("127.0.0.1", 65536, 16, 0), -EINVAL);
    CHECK_EQ(pf_listen_tcp("127.0.0.1", 0, -1, 0), -EINVAL);
    CHECK_EQ(pf_listen_tcp("127.0.0.1", 0, 16, 4), -EINVAL);
    /* A literal that is not ours (TEST-NET-1, RFC 5737); a failed bind must
     * not leak its socket. */
    CHECK_EQ(pf_listen_tcp("192.0.2.1", 0, 16, 0), -EADDRNOTAVAIL);
    CHECK_EQ(count_fds(), before);
}

/* ---- Unix -------------------------------------------------------------- */

static void make_tmpdir(char *dir, size_t n)
{
    snprintf(dir, n, "/tmp/pf_listen_XXXXXX");
    CHECK(mkdtemp(dir) != NULL);
}

static int path_mode(const char *path)
{
    struct stat st;
    CHECK(lstat(path, &st) == 0);
    CHECK(S_ISSOCK(st.st_mode));
    return (int)(st.st_mode & 07777);
}

static void test_unix_listen_and_mode(void)
{
    char dir[64], path[128];
    int before = count_fds(), fd;

    make_tmpdir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/s", dir);
    fd = pf_listen_unix(path, 16, 0600);
    CHECK_OK(fd);
    CHECK_EQ(check_listener(fd), AF_UNIX);
    CHECK_EQ(path_mode(path), 0600);
    connect_unix(fd, path);
    close(fd);
    unlink(path);

    /* chmod is not subject to the umask: 0666 means 0666. */
    fd = pf_listen_unix(path, 16, 0666);
    CHECK_OK(fd);
    CHECK_EQ(path_mode(path), 0666);
    close(fd);
    unlink(path);
    CHECK(rmdir(dir) == 0);
    CHECK_EQ(count_fds(), before);
}

static void test_unix_stale_replaced(void)
{
    char dir[64], path[128];
    int before = count_fds(), fd, fd2;

    make_tmpdir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/s", dir);
    fd = pf_listen_unix(path, 16, 0600);
    CHECK_OK(fd);
    close(fd);                      /* a dead server leaves its file behind */
    CHECK_EQ(path_mode(path), 0600);

    fd2 = pf_listen_unix(path, 16, 0640);
    CHECK_OK(fd2);
    CHECK_EQ(path_mode(path), 0640);
    connect_unix(fd2, path);
    close(fd2);
    unlink(path);
    CHECK(rmdir(dir) == 0);
    CHECK_EQ(count_fds(), before);
}

/* The liveness probe is a real connect, so a live server sees one
 * connection that closes at once; accept it so the next accept is ours. */
static void drain_probe(int lfd)
{
    struct pollfd p = {.fd = lfd, .events = POLLIN};
    char b;
    int s;

    CHECK_EQ(poll(&p, 1, 10000), 1);
    s = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    CHECK(s >= 0);
    CHECK_EQ(read(s, &b, 1), 0);
    close(s);
}

static void test_unix_live_in_use(void)
{
    char dir[64], path[128];
    int before = count_fds(), fd, clients[64], nc = 0;

    make_tmpdir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/s", dir);
    fd = pf_listen_unix(path, 1, 0600);
    CHECK_OK(fd);
    CHECK_EQ(pf_listen_unix(path, 16, 0600), -EADDRINUSE);
    drain_probe(fd);
    connect_unix(fd, path);         /* the live one was left alone */

    /* Fill its backlog: the probe must not block on a busy live server. */
    for (;;) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        int c = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

        CHECK(c >= 0 && nc < 64);
        strcpy(sa.sun_path, path);
        if (connect(c, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            CHECK_EQ(errno, EAGAIN);
            close(c);
            break;
        }
        clients[nc++] = c;
    }
    CHECK_EQ(pf_listen_unix(path, 16, 0600), -EADDRINUSE);
    while (nc > 0)
        close(clients[--nc]);
    close(fd);
    unlink(path);
    CHECK(rmdir(dir) == 0);
    CHECK_EQ(count_fds(), before);
}

static void test_unix_not_a_socket(void)
{
    char dir[64], path[128], sub[128], buf[8] = {0};
    int before = count_fds(), f;

    make_tmpdir(dir, sizeof(dir));
    snprintf(path, sizeof(path), "%s/file", dir);
    f = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    CHECK(f >= 0);
    CHECK_EQ(write(f, "data", 4), 4);
    close(f);
    /* Never unlink somebody's regular file. */
    CHECK_EQ(pf_listen_unix(path, 16, 0600), -EADDRINUSE);
    f = open(path, O_RDONLY | O_CLOEXEC);
    CHECK(f >= 0);
    CHECK_EQ(read(f, buf, sizeof(buf)), 4);
    CHECK(memcmp(buf, "data", 4) == 0);
    close(f);
    unlink(path);

    snprintf(sub, sizeof(sub), "%s/sub", dir);
    CHECK(mkdir(sub, 0700) == 0);
    CHECK_EQ(pf_listen_unix(sub, 16, 0600), -EADDRINUSE);
    CHECK(rmdir(sub) == 0);
    CHECK(rmdir(dir) == 0);
    CHECK_EQ(count_fds(), before);
}

static void test_unix_errors(void)
{
    struct sockaddr_un sa;
    char path[sizeof(sa.sun_path) + 8];
    int before = count_fds();

    /* sun_path holds 108 bytes including the NUL: 108 chars is too long. */
    memset(path, 'a', sizeof(path));
    memcpy(path, "/pf-no-such-dir/", 16);
    path[sizeof(sa.sun_path)] = '\0';
    CHECK_EQ(pf_listen_unix(path, 16, 0600), -ENAMETOOLONG);
    /* 107 chars fits; the directory does not exist. */
    path[sizeof(sa.sun_path) - 1] = '\0';
    CHECK_EQ(pf_listen_unix(path, 16, 0600), -ENOENT);
    CHECK_EQ(pf_listen_unix(NULL, 16, 0600), -EINVAL);
    CHECK_EQ(pf_listen_unix("", 16, 0600), -EINVAL);
    CHECK_EQ(pf_listen_unix("/tmp/x", 16, 010000), -EINVAL);
    CHECK_EQ(pf_listen_unix("/tmp/x", 16, -1), -EINVAL);
    CHECK_EQ(pf_listen_unix("/tmp/x", -1, 0600), -EINVAL);
    CHECK_EQ(count_fds(), before);
}

/* ---- adopt ------------------------------------------------------------- */

static void test_adopt_listener(void)
{
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int before = count_fds(), fd;

    /* Inherited fds are typically blocking and not close-on-exec. */
    fd = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(fd >= 0);
    CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    CHECK(listen(fd, 16) == 0);
    CHECK(!(fcntl(fd, F_GETFL) & O_NONBLOCK));
    CHECK(!(fcntl(fd, F_GETFD) & FD_CLOEXEC));
    CHECK_EQ(pf_listen_adopt(fd), fd);
    CHECK_EQ(check_listener(fd), AF_INET);
    connect_v4(fd, "127.0.0.1");
    CHECK_EQ(pf_listen_adopt(fd), fd);       /* idempotent */
    close(fd);
    CHECK_EQ(count_fds(), before);
}

static void test_adopt_rejects(void)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    int before = count_fds(), p[2], fd;

    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK_EQ(pf_listen_adopt(p[0]), -ENOTSOCK);
    close(p[0]);
    close(p[1]);
    CHECK_EQ(pf_listen_adopt(-1), -EBADF);
    CHECK_EQ(pf_listen_adopt(p[0]), -EBADF);   /* just closed */

    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);   /* never listened */
    CHECK(fd >= 0);
    CHECK_EQ(pf_listen_adopt(fd), -EINVAL);
    close(fd);
    fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    CHECK_EQ(pf_listen_adopt(fd), -EINVAL);
    close(fd);

    /* A listening SEQPACKET socket passes SO_ACCEPTCONN but is not a byte
     * stream. Autobind (address = family only) keeps it off the filesystem. */
    fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    CHECK(fd >= 0);
    CHECK(bind(fd, (struct sockaddr *)&sa, sizeof(sa_family_t)) == 0);
    CHECK(listen(fd, 4) == 0);
    CHECK_EQ(pf_listen_adopt(fd), -EINVAL);
    close(fd);
    CHECK_EQ(count_fds(), before);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_tcp_ipv4_loopback), PF_CASE(test_tcp_ipv6_loopback),
    PF_CASE(test_tcp_localhost_name), PF_CASE(test_tcp_wildcards),
    PF_CASE(test_tcp_reuseport), PF_CASE(test_tcp_errors),
    PF_CASE(test_unix_listen_and_mode), PF_CASE(test_unix_stale_replaced),
    PF_CASE(test_unix_live_in_use), PF_CASE(test_unix_not_a_socket),
    PF_CASE(test_unix_errors), PF_CASE(test_adopt_listener), PF_CASE(test_adopt_rejects),
};

int main(int argc, char **argv)
{
    alarm(120);   /* liveness guard only: a hang becomes a failure */
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
