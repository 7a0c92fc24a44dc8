/* test_tcp.c -- pf_tcp_cork on real sockets: the option follows on/off, a
 * corked connection still delivers everything once it is closed, and
 * non-TCP or bad fds get -errno.
 *
 * Theory of operation: a real loopback TCP connection (pf_listen_tcp, then
 * connect and accept); the option is read back with getsockopt, and what the
 * corked side wrote is read to EOF on the other end. Every fd is closed and
 * the error test checks the process's fd count is unchanged. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pyfork.h"
#include "pf_test.h"

static int cork_of(int fd)
{
    int val = -1;
    socklen_t len = sizeof(val);

    CHECK(getsockopt(fd, IPPROTO_TCP, TCP_CORK, &val, &len) == 0);
    return val;
}

/* A connected pair over loopback: *client, *server. */
static void tcp_pair(int *client, int *server)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int lfd;

    CHECK_OK(lfd = pf_listen_tcp("127.0.0.1", 0, 8, 0));
    CHECK(getsockname(lfd, (struct sockaddr *)&a, &len) == 0);
    *client = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(*client >= 0);
    CHECK(connect(*client, (struct sockaddr *)&a, sizeof(a)) == 0);
    do
        *server = accept(lfd, NULL, NULL);
    while (*server < 0 && errno == EAGAIN);
    CHECK(*server >= 0);
    close(lfd);
}

static void test_cork_on_off_and_close_flushes(void)
{
    int c, s, n, got = 0;
    char buf[64];

    tcp_pair(&c, &s);
    CHECK_EQ(cork_of(s), 0);
    CHECK_EQ(pf_tcp_cork(s, 1), 0);
    CHECK_EQ(cork_of(s), 1);
    CHECK(write(s, "head|", 5) == 5);
    CHECK(write(s, "body", 4) == 4);
    CHECK_EQ(close(s), 0);                 /* closing a corked socket sends it all */
    while ((n = (int)read(c, buf + got, sizeof(buf) - 1 - (size_t)got)) > 0)
        got += n;
    CHECK_EQ(n, 0);                         /* then EOF */
    buf[got] = '\0';
    CHECK(strcmp(buf, "head|body") == 0);
    close(c);

    tcp_pair(&c, &s);
    CHECK_EQ(pf_tcp_cork(s, 1), 0);
    CHECK_EQ(pf_tcp_cork(s, 0), 0);
    CHECK_EQ(cork_of(s), 0);
    close(c);
    close(s);
}

static void test_cork_errors(void)
{
    int sv[2];
    int before = pf_scan_fds(NULL);

    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    CHECK(pf_tcp_cork(sv[0], 1) < 0);       /* not TCP */
    close(sv[0]);
    close(sv[1]);
    CHECK_EQ(pf_tcp_cork(-1, 1), -EBADF);
    CHECK_EQ(pf_scan_fds(NULL), before);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_cork_on_off_and_close_flushes), PF_CASE(test_cork_errors),
};

int main(int argc, char **argv)
{
    alarm(60);   /* liveness guard only */
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
