/* park_cost.c -- what parking idle keep-alive connections in the primary costs.
 *
 * Theory of operation: issue 10's keep-alive direction hands an idle
 * connection back from its worker to the primary (sendmsg SCM_RIGHTS), which
 * watches it in its epoll and dispatches the next request to a free worker
 * (epoll_ctl DEL, sendmsg). This program measures that extra work on real
 * sockets: a loopback TCP connection (the client's), and an AF_UNIX
 * SOCK_SEQPACKET socketpair (the worker's channel), as pyfork uses them.
 *
 *   1. syscalls, one process, no scheduling: per parked request, the hand-back
 *      (worker sendmsg + close, primary recvmsg), the park (epoll_ctl ADD, the
 *      client's byte, epoll_wait, epoll_ctl DEL) and the re-dispatch (primary
 *      sendmsg + close, worker recvmsg); ns per phase, min of 5 runs.
 *   2. ping-pong, two processes (primary = parent, worker = forked child),
 *      each request a 1-byte "request" from the client and a 1-byte
 *      "response" from the worker:
 *        pinned  the worker keeps the connection in its own epoll (today);
 *        parked  after each response the worker hands the connection back;
 *                the parent sees the next request in its epoll, dispatches
 *                it, and the worker answers and hands it back again.
 *      Reports µs per request (wall: the latency a request sees, 2 cores)
 *      and CPU µs per request of each process (getrusage), so the difference
 *      parked - pinned is the price of parking, in latency and in CPU.
 *
 * Build and run (bench/ only, not part of the package):
 *   gcc -O2 -Wall -o /tmp/park_cost bench/park_cost.c && /tmp/park_cost [iterations]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DIE(what) do { perror(what); exit(1); } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t cpu_ns(int who)
{
    struct rusage ru;
    getrusage(who, &ru);
    return ((uint64_t)ru.ru_utime.tv_sec + (uint64_t)ru.ru_stime.tv_sec) * 1000000000u +
           ((uint64_t)ru.ru_utime.tv_usec + (uint64_t)ru.ru_stime.tv_usec) * 1000u;
}

static void send_fd(int chan, int fd)
{
    char byte = 'C';
    struct iovec iov = { &byte, 1 };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    memset(&u, 0, sizeof u);
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = u.buf, .msg_controllen = sizeof u.buf };
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    if (sendmsg(chan, &msg, MSG_NOSIGNAL) != 1)
        DIE("sendmsg");
}

static int recv_fd(int chan)
{
    char byte;
    struct iovec iov = { &byte, 1 };
    union { struct cmsghdr h; char buf[CMSG_SPACE(sizeof(int))]; } u;
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = u.buf, .msg_controllen = sizeof u.buf };
    ssize_t n = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC);
    if (n <= 0)
        return -1;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_type != SCM_RIGHTS || (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC)))
        DIE("recvmsg: no fd");
    int fd;
    memcpy(&fd, CMSG_DATA(c), sizeof(int));
    return fd;
}

/* A connected loopback TCP pair: *client and *server (what accept4 would give). */
static void tcp_pair(int *client, int *server)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
    socklen_t alen = sizeof a;
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 1) ||
        getsockname(ls, (struct sockaddr *)&a, &alen))
        DIE("listen");
    *client = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(*client, (struct sockaddr *)&a, sizeof a))
        DIE("connect");
    *server = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
    if (*server < 0)
        DIE("accept4");
    setsockopt(*client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(*server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    close(ls);
}

static void one_byte(int fd, int write_it)
{
    char b = 'x';
    if ((write_it ? write(fd, &b, 1) : read(fd, &b, 1)) != 1)
        DIE(write_it ? "write" : "read");
}

/* 1. syscall costs in one process, ns per phase. */
static void syscalls(long iters)
{
    int client, conn, ch[2];
    tcp_pair(&client, &conn);
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ch))
        DIE("socketpair");
    int ep = epoll_create1(EPOLL_CLOEXEC);
    double best[3] = { 1e18, 1e18, 1e18 };
    for (int run = 0; run < 5; run++) {
        uint64_t t[3] = { 0, 0, 0 };
        for (long i = 0; i < iters; i++) {
            uint64_t t0 = now_ns();
            send_fd(ch[1], conn);               /* worker hands the idle connection back */
            close(conn);
            int parked = recv_fd(ch[0]);         /* primary takes it */
            uint64_t t1 = now_ns();
            struct epoll_event ev = { .events = EPOLLIN, .data.fd = parked };
            if (epoll_ctl(ep, EPOLL_CTL_ADD, parked, &ev))
                DIE("epoll_ctl add");
            uint64_t t2a = now_ns();
            one_byte(client, 1);                 /* the client's next request (not timed) */
            uint64_t t2b = now_ns();
            if (epoll_wait(ep, &ev, 1, -1) != 1)
                DIE("epoll_wait");
            if (epoll_ctl(ep, EPOLL_CTL_DEL, parked, NULL))
                DIE("epoll_ctl del");
            uint64_t t2 = now_ns();
            send_fd(ch[0], parked);              /* primary dispatches it again */
            close(parked);
            conn = recv_fd(ch[1]);               /* the worker takes it */
            uint64_t t3 = now_ns();
            one_byte(conn, 0);
            t[0] += t1 - t0;
            t[1] += (t2a - t1) + (t2 - t2b);
            t[2] += t3 - t2;
        }
        for (int k = 0; k < 3; k++)
            if ((double)t[k] / iters < best[k])
                best[k] = (double)t[k] / iters;
    }
    printf("syscalls (one process, ns per parked request, min of 5 x %ld):\n", iters);
    printf("  hand back   worker sendmsg(SCM_RIGHTS) + close, primary recvmsg  %7.0f ns\n", best[0]);
    printf("  park        epoll_ctl ADD + epoll_wait (ready) + epoll_ctl DEL   %7.0f ns\n", best[1]);
    printf("  dispatch    primary sendmsg(SCM_RIGHTS) + close, worker recvmsg  %7.0f ns\n", best[2]);
    printf("  total extra per request                                         %7.0f ns\n",
           best[0] + best[1] + best[2]);
    close(client); close(conn); close(ch[0]); close(ch[1]); close(ep);
}

/* 2. two processes: pinned vs parked, per request wall and CPU. */
static void pingpong(long iters, int parked_mode)
{
    int client, conn, ch[2];
    tcp_pair(&client, &conn);
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ch))
        DIE("socketpair");
    int res[2];                                  /* child -> parent: its CPU ns */
    if (pipe(res))
        DIE("pipe");
    pid_t pid = fork();
    if (pid < 0)
        DIE("fork");
    if (pid == 0) {                              /* the worker */
        close(ch[0]); close(client); close(res[0]);
        uint64_t c0 = cpu_ns(RUSAGE_SELF);
        if (parked_mode) {
            close(conn);
            for (;;) {
                int fd = recv_fd(ch[1]);         /* blocks: the worker's inbox */
                if (fd < 0)
                    break;
                one_byte(fd, 0);                 /* the request */
                one_byte(fd, 1);                 /* the response */
                send_fd(ch[1], fd);              /* idle again: hand it back */
                close(fd);
            }
        } else {
            int ep = epoll_create1(EPOLL_CLOEXEC);
            struct epoll_event ev = { .events = EPOLLIN, .data.fd = conn };
            epoll_ctl(ep, EPOLL_CTL_ADD, conn, &ev);
            char b;
            for (;;) {
                if (epoll_wait(ep, &ev, 1, -1) != 1)
                    continue;
                if (read(conn, &b, 1) != 1)
                    break;                       /* client closed */
                one_byte(conn, 1);
            }
        }
        uint64_t c = cpu_ns(RUSAGE_SELF) - c0;
        if (write(res[1], &c, sizeof c) != sizeof c)
            _exit(1);
        _exit(0);
    }
    close(ch[1]); close(res[1]);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev;
    if (parked_mode) {
        ev.events = EPOLLIN; ev.data.fd = ch[0];  /* hand-backs arrive here */
        epoll_ctl(ep, EPOLL_CTL_ADD, ch[0], &ev);
        ev.events = EPOLLIN; ev.data.fd = conn;   /* starts parked in the primary */
        epoll_ctl(ep, EPOLL_CTL_ADD, conn, &ev);
    } else {
        close(conn);
    }
    uint64_t c0 = cpu_ns(RUSAGE_SELF), w0 = now_ns();
    for (long i = 0; i < iters; i++) {
        one_byte(client, 1);                     /* the client sends a request */
        if (parked_mode) {
            /* the primary: wait for the parked connection to become readable */
            for (;;) {
                if (epoll_wait(ep, &ev, 1, -1) != 1)
                    continue;
                if (ev.data.fd == ch[0]) {       /* a hand-back */
                    int fd = recv_fd(ch[0]);
                    struct epoll_event e2 = { .events = EPOLLIN, .data.fd = fd };
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e2);
                    continue;
                }
                epoll_ctl(ep, EPOLL_CTL_DEL, ev.data.fd, NULL);
                send_fd(ch[0], ev.data.fd);
                close(ev.data.fd);
                break;
            }
        }
        one_byte(client, 0);                     /* the client reads the response */
    }
    uint64_t wall = now_ns() - w0;
    close(client);
    if (parked_mode) {                           /* take the last hand-back, then stop */
        int fd = recv_fd(ch[0]);
        if (fd >= 0)
            close(fd);
    }
    uint64_t pcpu = cpu_ns(RUSAGE_SELF) - c0;
    close(ch[0]);
    uint64_t wcpu = 0;
    if (read(res[0], &wcpu, sizeof wcpu) != sizeof wcpu)
        wcpu = 0;
    waitpid(pid, NULL, 0);
    close(res[0]); close(ep);
    printf("  %-7s %7.2f us/request wall   primary+client CPU %6.2f us   worker CPU %6.2f us\n",
           parked_mode ? "parked" : "pinned", wall / 1e3 / iters, pcpu / 1e3 / iters,
           wcpu / 1e3 / iters);
}

int main(int argc, char **argv)
{
    long iters = argc > 1 ? atol(argv[1]) : 100000;
    signal(SIGPIPE, SIG_IGN);
    syscalls(iters);
    printf("ping-pong (2 processes, %ld requests of 1 byte on one loopback TCP connection;\n"
           "the parent is both the client and, when parked, the primary):\n", iters);
    for (int round = 0; round < 3; round++) {
        pingpong(iters / 4, 0);
        pingpong(iters / 4, 1);
    }
    return 0;
}
