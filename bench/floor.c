/* floor.c -- the bare-C dispatch floor for pyfork's benchmarks.
 *
 * Theory of operation: the cheapest possible "primary accepts, worker serves"
 * server, so that pyfork's primary CPU per connection can be read as a ratio
 * to it. The primary does nothing but a blocking accept4(), a round-robin
 * pick, one sendmsg() carrying the fd in SCM_RIGHTS, and close(): three
 * syscalls per connection, no epoll, no batching, no TCP_NODELAY (unless -n),
 * no back-pressure, no bookkeeping. N forked workers block in recvmsg() and
 * either close the fd at once (-m close, the dispatch micro-benchmark) or
 * read one request and answer a fixed HTTP/1.1 response with Connection:
 * close (-m http, the wrk benchmarks).
 *
 * The same source also builds as a shared library (-DFLOOR_LIB) exporting
 * floor_worker(): bench harnesses call it through ctypes inside workers forked
 * by a pyfork Dispatcher, so the floor, the C backend and the pure backend are
 * measured with byte-for-byte the same worker code and only the primary
 * differs. In that mode the worker also keeps the pyfork scoreboard line
 * (closed counter, want_credit -> PF_MSG_CREDIT) so back-pressure and `least`
 * behave as in pyfork.
 *
 * Not part of the package build: bench/benchlib.py compiles it with gcc.
 *
 * Usage: floor [-H host] [-p port] [-w workers] [-m http|close] [-n]
 *   prints "READY <port>" on stdout once listening with workers forked;
 *   SIGTERM/SIGINT: close channels (workers see EOF and exit), reap, exit 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#define FLOOR_MAX_WORKERS 64
#define FLOOR_MAX_FDS 32            /* = PF_MAX_FDS: pyfork may batch this many */
#define FLOOR_MODE_CLOSE 0
#define FLOOR_MODE_HTTP 1

/* pf_msg_hdr from csrc/pyfork.h, repeated so this file builds alone. */
struct floor_pf_hdr {
    uint32_t magic, type_nfds, len, arg;
};
#define FLOOR_PF_MAGIC 0x31464b50u
#define FLOOR_PF_CREDIT 3

/* Reads one request head (until CRLFCRLF, EOF or 5 s of silence) and answers.
 * The fd may be non-blocking (pyfork accepts with SOCK_NONBLOCK and the flag
 * lives in the shared file description), hence poll() before each recv. */
static void serve_http(int fd, const char *resp, size_t resp_len)
{
    char buf[8192];
    size_t have = 0;
    for (;;) {
        ssize_t n = recv(fd, buf + have, sizeof(buf) - 1 - have, 0);
        if (n > 0) {
            have += (size_t)n;
            buf[have] = 0;
            if (strstr(buf, "\r\n\r\n") || have >= sizeof(buf) - 1)
                break;
            continue;
        }
        if (n == 0)
            return;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN)
            return;
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 5000) <= 0)
            return;
    }
    size_t off = 0;
    while (off < resp_len) {
        ssize_t n = send(fd, resp + off, resp_len - off, MSG_NOSIGNAL);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            struct pollfd p = {fd, POLLOUT, 0};
            if (poll(&p, 1, 5000) > 0)
                continue;
        }
        return;
    }
}

/* Returns 0 on channel EOF, -errno on a channel error. Serves every fd that
 * arrives in SCM_RIGHTS whatever the message framing (the floor's 1-byte
 * messages or pyfork's pf_msg_hdr), so one worker fits both primaries.
 * closed/want_credit: the worker's pyfork scoreboard line, or NULL. */
int floor_worker(int chan, int mode, uint64_t *closed, uint32_t *want_credit)
{
    char resp[256];
    char body[64];
    int blen = snprintf(body, sizeof(body), "Hello, World! pid=%d\n", (int)getpid());
    int rlen = snprintf(resp, sizeof(resp),
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                        "Content-Length: %d\r\nConnection: close\r\n\r\n%s",
                        blen, body);
    for (;;) {
        char data[64];
        union {
            struct cmsghdr align;
            char buf[CMSG_SPACE(FLOOR_MAX_FDS * sizeof(int))];
        } cbuf;
        struct iovec iov = {data, sizeof(data)};
        struct msghdr mh = {0};
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        mh.msg_control = cbuf.buf;
        mh.msg_controllen = sizeof(cbuf.buf);
        ssize_t n = recvmsg(chan, &mh, MSG_CMSG_CLOEXEC);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) { /* a shared description may be O_NONBLOCK */
                struct pollfd p = {chan, POLLIN, 0};
                poll(&p, 1, -1);
                continue;
            }
            return -errno;
        }
        if (n == 0)
            return 0;
        int count = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c)) {
            if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
                continue;
            int nfd = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int fds[FLOOR_MAX_FDS];
            memcpy(fds, CMSG_DATA(c), (size_t)nfd * sizeof(int));
            for (int i = 0; i < nfd; i++) {
                if (mode == FLOOR_MODE_HTTP)
                    serve_http(fds[i], resp, (size_t)rlen);
                close(fds[i]);
                count++;
            }
        }
        /* Scoreboard protocol (csrc/pyfork.h pf_slot): bump closed; when the
         * primary flagged us as full, clear the flag and send one CREDIT. */
        if (closed && count) {
            __atomic_add_fetch(closed, (uint64_t)count, __ATOMIC_RELEASE);
            if (want_credit && __atomic_exchange_n(want_credit, 0, __ATOMIC_ACQ_REL)) {
                struct floor_pf_hdr h = {FLOOR_PF_MAGIC, FLOOR_PF_CREDIT, 0, (uint32_t)count};
                send(chan, &h, sizeof(h), MSG_NOSIGNAL);
            }
        }
    }
}

#ifndef FLOOR_LIB

static volatile sig_atomic_t stop_flag;

static void on_stop(int sig)
{
    (void)sig;
    stop_flag = 1;
}

/* Returns 0 or -errno. One fd, one byte of payload, MSG_NOSIGNAL. */
static int send_fd(int chan, int fd)
{
    char byte = 'c';
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int))];
    } cbuf;
    struct iovec iov = {&byte, 1};
    struct msghdr mh = {0};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf.buf;
    mh.msg_controllen = sizeof(cbuf.buf);
    struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
    while (sendmsg(chan, &mh, MSG_NOSIGNAL) < 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1";
    int port = 0, nworkers = 2, mode = FLOOR_MODE_HTTP, nodelay = 0, opt;
    while ((opt = getopt(argc, argv, "H:p:w:m:n")) != -1) {
        switch (opt) {
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'w': nworkers = atoi(optarg); break;
        case 'm': mode = strcmp(optarg, "close") == 0 ? FLOOR_MODE_CLOSE : FLOOR_MODE_HTTP; break;
        case 'n': nodelay = 1; break;
        default:
            fprintf(stderr, "usage: floor [-H host] [-p port] [-w workers] [-m http|close] [-n]\n");
            return 2;
        }
    }
    if (nworkers < 1 || nworkers > FLOOR_MAX_WORKERS) {
        fprintf(stderr, "floor: workers must be 1..%d\n", FLOOR_MAX_WORKERS);
        return 2;
    }

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1 ||
        bind(lfd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(lfd, 2048) < 0) {
        perror("floor: listen");
        return 2;
    }
    socklen_t slen = sizeof(sa);
    getsockname(lfd, (struct sockaddr *)&sa, &slen);

    int chans[FLOOR_MAX_WORKERS];
    pid_t pids[FLOOR_MAX_WORKERS];
    for (int i = 0; i < nworkers; i++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
            perror("floor: socketpair");
            return 2;
        }
        pid_t pid = fork();
        if (pid == 0) {
            /* Child: keep only our channel end; exit with the primary. */
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            close(lfd);
            close(sv[0]);
            for (int j = 0; j < i; j++)
                close(chans[j]);
            _exit(floor_worker(sv[1], mode, NULL, NULL) < 0 ? 1 : 0);
        }
        close(sv[1]);
        chans[i] = sv[0];
        pids[i] = pid;
    }

    /* No SA_RESTART: SIGTERM must interrupt the blocking accept4. */
    struct sigaction act = {0};
    act.sa_handler = on_stop;
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);

    printf("READY %d\n", ntohs(sa.sin_port));
    fflush(stdout);

    unsigned next = 0;
    while (!stop_flag) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) {
            if (errno == EMFILE || errno == ENFILE)
                usleep(1000); /* the floor has no reserve fd: just do not spin */
            continue;
        }
        if (nodelay)
            setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        send_fd(chans[next], c);
        next = next + 1 == (unsigned)nworkers ? 0 : next + 1;
        close(c);
    }

    for (int i = 0; i < nworkers; i++)
        close(chans[i]);
    for (int i = 0; i < nworkers; i++)
        waitpid(pids[i], NULL, 0);
    return 0;
}

#endif
