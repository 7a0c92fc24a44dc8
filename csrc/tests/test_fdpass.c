/* test_fdpass.c -- unit tests for pf_send_msg / pf_recv_msg.
 *
 * Theory of operation: every test builds its own AF_UNIX SOCK_SEQPACKET
 * socketpair. Where an fd must really cross a process boundary the test
 * forks (libuv test-ipc-send-recv.c does the same with a spawned copy of
 * itself): the child receives the fd and writes through it, the parent reads
 * what arrived. Malformed messages are built by hand with a raw sendmsg so the
 * receiver's checks see exactly the bytes and cmsgs we choose. Every test
 * counts /proc/self/fd before and after: the contract is "on every error all
 * received fds are closed", and a leak is only visible as a count.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pf_cmsg.h"
#include "pf_test.h"
#include "pyfork.h"

/* ---- helpers ----------------------------------------------------------- */

static void seqpair(int sv[2])
{
    CHECK(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
}

static void close_pair(int sv[2])
{
    close(sv[0]);
    close(sv[1]);
}

/* seqpair(sv), returning the fd count from just before it. */
static int counted_pair(int sv[2])
{
    int before = count_fds();

    seqpair(sv);
    return before;
}

/* close_pair(sv), then checks the fd count is back to before. */
static void close_pair_check(int sv[2], int before)
{
    close_pair(sv);
    CHECK_EQ(count_fds(), before);
}

static void set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    CHECK(fl >= 0 && fcntl(fd, F_SETFL, fl | O_NONBLOCK) == 0);
}

static int is_open(int fd)
{
    return fcntl(fd, F_GETFD) >= 0;
}

/* A raw datagram: whatever bytes, whatever fds, one SCM_RIGHTS cmsg sized
 * for exactly nfds (up to 64, beyond PF_MAX_FDS on purpose). */
static void raw_send(int chan, const void *buf, size_t len, const int *fds, int nfds)
{
    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(64 * sizeof(int))];
    } cbuf;
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};
    struct msghdr msg;

    CHECK(nfds >= 0 && nfds <= 64);
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    pf__put_rights(&msg, cbuf.buf, fds, nfds);
    CHECK_EQ(sendmsg(chan, &msg, MSG_NOSIGNAL), (ssize_t)len);
}

/* A header followed by plen bytes of 'x', in a buffer the caller frees. */
static unsigned char *raw_msg(uint32_t magic, uint16_t type, uint16_t nfds,
                              uint32_t len, size_t plen, size_t *total)
{
    pf_msg_hdr h = {.magic = magic, .type = type, .nfds = nfds, .len = len, .arg = 0};
    unsigned char *b = malloc(sizeof(h) + plen + 1);

    CHECK(b != NULL);
    memcpy(b, &h, sizeof(h));
    memset(b + sizeof(h), 'x', plen);
    *total = sizeof(h) + plen;
    return b;
}

static void wait_ok(pid_t pid)
{
    int st;
    CHECK_EQ(waitpid(pid, &st, 0), pid);
    CHECK(WIFEXITED(st));
    CHECK_EQ(WEXITSTATUS(st), 0);
}

/* Sends a raw datagram with n dups of /dev/null and checks pf_recv_msg
 * answers want without leaking; then checks the channel still works. */
static void expect_recv_error(const void *buf, size_t len, int nfds, size_t cap,
                              int maxfds, int want)
{
    int sv[2], dups[64], out[PF_MAX_FDS], before, devnull, i;
    pf_msg_hdr hdr;
    char *payload = malloc(cap + 1);

    CHECK(payload != NULL);
    before = counted_pair(sv);
    devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
    CHECK(devnull >= 0);
    for (i = 0; i < nfds; i++)
        CHECK((dups[i] = fcntl(devnull, F_DUPFD_CLOEXEC, 0)) >= 0);
    raw_send(sv[0], buf, len, dups, nfds);
    for (i = 0; i < nfds; i++)
        close(dups[i]);
    close(devnull);

    /* Only the pair is open now; everything that arrives must be closed. */
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, payload, cap, out, maxfds), want);
    CHECK_EQ(count_fds(), before + 2);

    /* A bad datagram is consumed whole: the next message is intact. */
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_READY, 9, NULL, 0, NULL, 0));
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, payload, cap, out, maxfds), 0);
    CHECK_EQ(hdr.type, PF_MSG_READY);
    CHECK_EQ(hdr.arg, 9);

    free(payload);
    close_pair_check(sv, before);
}

/* expect_recv_error(-EBADMSG) for raw_msg(magic, type, nfds, len, plen)
 * sent with `sent` fds to a receiver with cap bytes and maxfds fd slots. */
static void expect_badmsg(uint32_t magic, uint16_t type, uint16_t nfds, uint32_t len,
                          size_t plen, int sent, size_t cap, int maxfds)
{
    size_t total;
    unsigned char *m = raw_msg(magic, type, nfds, len, plen, &total);

    expect_recv_error(m, total, sent, cap, maxfds, -EBADMSG);
    free(m);
}

/* ---- well-formed messages ---------------------------------------------- */

static void test_payload_roundtrip(void)
{
    int sv[2], fds[1], before;
    pf_msg_hdr hdr;
    char buf[64];

    before = counted_pair(sv);
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_USER, 42, "{\"a\":1}", 7, NULL, 0));
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, buf, sizeof(buf), fds, 1), 0);
    CHECK_EQ(hdr.magic, PF_MSG_MAGIC);
    CHECK_EQ(hdr.type, PF_MSG_USER);
    CHECK_EQ(hdr.arg, 42);
    CHECK_EQ(hdr.len, 7);
    CHECK_EQ(hdr.nfds, 0);
    CHECK(memcmp(buf, "{\"a\":1}", 7) == 0);

    /* Exact fit: cap == len is not truncation. */
    CHECK_OK(pf_send_msg(sv[1], PF_MSG_CTL, 0, "abc", 3, NULL, 0));
    CHECK_EQ(pf_recv_msg(sv[0], &hdr, buf, 3, NULL, 0), 0);
    CHECK_EQ(hdr.len, 3);
    CHECK(memcmp(buf, "abc", 3) == 0);

    /* No payload, no buffer. Every type 1..7 is legal. */
    for (uint32_t t = PF_MSG_CONN; t <= PF_MSG_PARK; t++) {
        CHECK_OK(pf_send_msg(sv[0], t, t * 10, NULL, 0, NULL, 0));
        CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), 0);
        CHECK_EQ(hdr.type, t);
        CHECK_EQ(hdr.arg, t * 10);
        CHECK_EQ(hdr.len, 0);
    }
    close_pair_check(sv, before);
}

static void test_max_payload(void)
{
    int sv[2], before;
    pf_msg_hdr hdr;
    unsigned char *out = malloc(PF_MAX_PAYLOAD), *in = malloc(PF_MAX_PAYLOAD + 100);

    CHECK(out != NULL && in != NULL);
    for (size_t i = 0; i < PF_MAX_PAYLOAD; i++)
        out[i] = (unsigned char)(i * 131u + 7u);
    before = counted_pair(sv);
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_USER, 1, out, PF_MAX_PAYLOAD, NULL, 0));
    /* A cap above the protocol limit is fine (clamped inside). */
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, in, PF_MAX_PAYLOAD + 100, NULL, 0), 0);
    CHECK_EQ(hdr.len, PF_MAX_PAYLOAD);
    CHECK(memcmp(in, out, PF_MAX_PAYLOAD) == 0);
    free(out);
    free(in);
    close_pair_check(sv, before);
}

static void test_send_validation(void)
{
    int sv[2], fd = 0, before;
    static int many[PF_MAX_FDS + 1];
    char big[1];

    before = counted_pair(sv);
    CHECK_EQ(pf_send_msg(sv[0], 0, 0, NULL, 0, NULL, 0), -EINVAL);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_PARK + 1, 0, NULL, 0, NULL, 0), -EINVAL);
    CHECK_EQ(pf_send_msg(sv[0], 0x10001, 0, NULL, 0, NULL, 0), -EINVAL);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_USER, 0, big, PF_MAX_PAYLOAD + 1, NULL, 0), -EMSGSIZE);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, many, PF_MAX_FDS + 1), -EMSGSIZE);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, &fd, -1), -EINVAL);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_USER, 0, NULL, 5, NULL, 0), -EINVAL);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, NULL, 1), -EINVAL);
    /* A bad fd number is the kernel's call. */
    fd = 1 << 20;
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, &fd, 1), -EBADF);

    /* Nothing above reached the channel. */
    set_nonblock(sv[1]);
    CHECK_EQ(pf_recv_msg(sv[1], &(pf_msg_hdr){0}, NULL, 0, NULL, 0), -EAGAIN);
    close_pair_check(sv, before);
}

static void test_recv_validation(void)
{
    int sv[2], before;
    pf_msg_hdr hdr;

    before = counted_pair(sv);
    CHECK_EQ(pf_recv_msg(sv[1], NULL, NULL, 0, NULL, 0), -EINVAL);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 4, NULL, 0), -EINVAL);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, -1), -EINVAL);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 2), -EINVAL);
    close_pair_check(sv, before);
}

/* Child side of the fork tests: receive one CONN with want fds, write the
 * fd's index through each, check CLOEXEC, exit 0. CHECK exits 1. */
static void child_write_through(int chan, int want)
{
    int fds[PF_MAX_FDS], n;
    pf_msg_hdr hdr;
    char tag[8];

    n = pf_recv_msg(chan, &hdr, tag, sizeof(tag), fds, PF_MAX_FDS);
    CHECK_EQ(n, want);
    CHECK_EQ(hdr.type, PF_MSG_CONN);
    CHECK_EQ(hdr.nfds, want);
    CHECK_EQ(hdr.len, 4);
    CHECK(memcmp(tag, "tag!", 4) == 0);
    for (int i = 0; i < n; i++) {
        unsigned char b = (unsigned char)i;
        /* MSG_CMSG_CLOEXEC: a received fd must not leak through exec. */
        CHECK(fcntl(fds[i], F_GETFD) & FD_CLOEXEC);
        CHECK_EQ(write(fds[i], &b, 1), 1);
        close(fds[i]);
    }
    close(chan);
}

/* Sends n pipe write ends to a forked child and reads back what it wrote. */
static void fork_pass(int n)
{
    int sv[2], rd[PF_MAX_FDS], wr[PF_MAX_FDS], before = count_fds(), i;
    pid_t pid;

    seqpair(sv);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(sv[0]);
        child_write_through(sv[1], n);
        _exit(0);
    }
    close(sv[1]);
    for (i = 0; i < n; i++) {
        int p[2];
        CHECK(pipe2(p, O_CLOEXEC) == 0);
        rd[i] = p[0];
        wr[i] = p[1];
    }
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_CONN, 0, "tag!", 4, wr, n));
    /* The sender keeps its fds (pf_send_msg never closes): close ours so
     * each read below ends at the child's close. */
    for (i = 0; i < n; i++)
        close(wr[i]);
    for (i = 0; i < n; i++) {
        unsigned char b = 0xff;
        CHECK_EQ(read(rd[i], &b, 1), 1);
        CHECK_EQ(b, i);
        CHECK_EQ(read(rd[i], &b, 1), 0);   /* EOF: the child closed it */
        close(rd[i]);
    }
    wait_ok(pid);
    close(sv[0]);
    CHECK_EQ(count_fds(), before);
}

static void test_pass_one_fd(void)
{
    fork_pass(1);
}

static void test_pass_several_fds(void)
{
    fork_pass(3);
    fork_pass(PF_MAX_FDS);
}

/* ---- receiver limits: well-formed but too big for the caller ----------- */

static void test_cap_too_small(void)
{
    int sv[2], p[2], out[4], before;
    pf_msg_hdr hdr;
    char buf[10];
    char payload[100];

    memset(payload, 'p', sizeof(payload));
    before = counted_pair(sv);
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_USER, 0, payload, sizeof(payload), p, 2));
    close(p[0]);
    close(p[1]);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, buf, sizeof(buf), out, 4), -EMSGSIZE);
    CHECK_EQ(count_fds(), before + 2);

    /* No buffer at all for a message that has a payload. */
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_USER, 0, payload, 1, NULL, 0));
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), -EMSGSIZE);
    close_pair_check(sv, before);
}

static void test_maxfds_too_small(void)
{
    int sv[2], p[2], out[PF_MAX_FDS], three[3], before;
    pf_msg_hdr hdr;

    before = counted_pair(sv);
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    three[0] = p[0];
    three[1] = p[1];
    three[2] = p[0];
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, three, 3));
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, three, 1));
    close(p[0]);
    close(p[1]);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, out, 2), -EMSGSIZE);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), -EMSGSIZE);
    CHECK_EQ(count_fds(), before + 2);
    close_pair_check(sv, before);
}

/* ---- malformed messages: -EBADMSG, nothing leaked ----------------------- */

static void test_short_and_garbage(void)
{
    size_t len;
    unsigned char *m;

    expect_recv_error("abc", 3, 1, 64, 4, -EBADMSG);
    expect_recv_error("abc", 3, 0, 64, 4, -EBADMSG);
    /* 15 bytes: one short of a header. */
    m = raw_msg(PF_MSG_MAGIC, PF_MSG_USER, 0, 0, 0, &len);
    expect_recv_error(m, len - 1, 0, 64, 4, -EBADMSG);
    free(m);
    /* A zero-length datagram carrying an fd is a message, not EOF. */
    expect_recv_error("", 0, 1, 64, 4, -EBADMSG);
}

static void test_bad_header_fields(void)
{
    /*            magic         type         nfds len plen sent cap maxfds */
    expect_badmsg(0xdeadbeef,   PF_MSG_CONN, 1,   0,  0,  1, 64, 4);  /* magic */
    expect_badmsg(PF_MSG_MAGIC, 0,           0,   0,  0,  0, 64, 4);  /* type 0 */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_PARK + 1, 1, 0, 0, 1, 64, 4);  /* type 8 */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_USER, 0,  10,  5,  0, 64, 4);  /* len > sent */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_USER, 1,   5, 10,  1, 64, 4);  /* len < sent */
    /* A lying length bigger than the caller's cap is still a lie, not
     * EMSGSIZE: the real datagram length (MSG_TRUNC) exposes it. */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_USER, 0, 100, 50,  0,  8, 4);
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_CONN, 2,   0,  0,  1, 64, 4);  /* nfds > sent */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_CONN, 0,   0,  0,  3, 64, 4);  /* nfds < sent */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_CONN, 1,   0,  0,  0, 64, 4);  /* fd missing */
}

static void test_oversize_datagram(void)
{
    size_t len;
    unsigned char *m;

    /* Header claims more than the protocol allows and the bytes are there:
     * EBADMSG whatever the caller's cap (small, exact max, above max). */
    m = raw_msg(PF_MSG_MAGIC, PF_MSG_USER, 1, PF_MAX_PAYLOAD + 1, PF_MAX_PAYLOAD + 1, &len);
    expect_recv_error(m, len, 1, 16, 4, -EBADMSG);
    expect_recv_error(m, len, 1, PF_MAX_PAYLOAD, 4, -EBADMSG);
    expect_recv_error(m, len, 1, PF_MAX_PAYLOAD + 64, 4, -EBADMSG);
    free(m);
}

static void test_ctrunc(void)
{
    /* More fds than the receiver's cmsg buffer (PF_MAX_FDS) holds: the
     * kernel installs what fits and sets MSG_CTRUNC; those must be closed. */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_CONN, PF_MAX_FDS + 8, 0, 0, PF_MAX_FDS + 8, 64, PF_MAX_FDS);
    /* The case only MSG_CTRUNC catches: the header claims exactly what
     * fits, one more fd was sent and silently dropped by the kernel. */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_CONN, PF_MAX_FDS, 0, 0, PF_MAX_FDS + 1, 64, PF_MAX_FDS);
    /* Even when the header is honest about PF_MAX_FDS + 1. */
    expect_badmsg(PF_MSG_MAGIC, PF_MSG_CONN, PF_MAX_FDS + 1, 0, 0, PF_MAX_FDS + 1, 64, PF_MAX_FDS);
}

static void test_foreign_cmsg(void)
{
    int sv[2], p[2], out[4], on = 1, before;
    pf_msg_hdr hdr;

    /* SO_PASSCRED makes the kernel add an SCM_CREDENTIALS cmsg: a second
     * cmsg of the wrong type. The fds next to it must still be closed. */
    before = counted_pair(sv);
    CHECK(setsockopt(sv[1], SOL_SOCKET, SO_PASSCRED, &on, sizeof(on)) == 0);
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, p, 2));
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_READY, 0, NULL, 0, NULL, 0));
    close(p[0]);
    close(p[1]);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, out, 4), -EBADMSG);
    CHECK_EQ(count_fds(), before + 2);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, out, 4), -EBADMSG);
    close_pair_check(sv, before);
}

/* ---- channel state ------------------------------------------------------ */

static void test_eof(void)
{
    int sv[2], before;
    pf_msg_hdr hdr;

    before = counted_pair(sv);
    CHECK_OK(pf_send_msg(sv[0], PF_MSG_DRAIN, 0, NULL, 0, NULL, 0));
    close(sv[0]);
    /* Queued data first, then EOF, and EOF again. */
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), 0);
    CHECK_EQ(hdr.type, PF_MSG_DRAIN);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), -EPIPE);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), -EPIPE);
    close(sv[1]);
    CHECK_EQ(count_fds(), before);
}

static void test_send_to_closed_peer(void)
{
    int sv[2], p[2], before = count_fds();

    /* SIGPIPE keeps its default action, so a SIGPIPE would kill the test.
     * (Linux's SEQPACKET path does not raise it today; MSG_NOSIGNAL makes
     * that a guarantee rather than a kernel detail.) */
    seqpair(sv);
    close(sv[1]);
    CHECK(pipe2(p, O_CLOEXEC) == 0);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_USER, 0, "x", 1, NULL, 0), -EPIPE);
    CHECK_EQ(pf_send_msg(sv[0], PF_MSG_CONN, 0, NULL, 0, p, 2), -EPIPE);
    /* pf_send_msg never closes the caller's fds, even on failure. */
    CHECK(is_open(p[0]) && is_open(p[1]));
    close(p[0]);
    close(p[1]);
    close(sv[0]);
    CHECK_EQ(count_fds(), before);
}

static void test_nonblocking(void)
{
    int sv[2], sent = 0, rc, before;
    pf_msg_hdr hdr;
    char buf[256];

    before = counted_pair(sv);
    set_nonblock(sv[0]);
    set_nonblock(sv[1]);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, buf, sizeof(buf), NULL, 0), -EAGAIN);

    /* Fill the channel (receive queue limit or socket buffer, whichever
     * first); bounded so a kernel that never pushes back fails, not hangs. */
    memset(buf, 'f', sizeof(buf));
    while ((rc = pf_send_msg(sv[0], PF_MSG_USER, (uint32_t)sent, buf, sizeof(buf), NULL, 0)) == 0)
        CHECK(++sent < 1000000);
    CHECK_EQ(rc, -EAGAIN);
    CHECK(sent > 0);

    /* Drain in order, then empty again. */
    for (int i = 0; i < sent; i++) {
        CHECK_EQ(pf_recv_msg(sv[1], &hdr, buf, sizeof(buf), NULL, 0), 0);
        CHECK_EQ(hdr.arg, i);
    }
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, buf, sizeof(buf), NULL, 0), -EAGAIN);
    close_pair_check(sv, before);
}

static void on_alarm(int sig)
{
    (void)sig;
}

static void test_eintr_retried(void)
{
    struct sigaction sa, old;
    struct itimerval it = {.it_interval = {0, 20000}, .it_value = {0, 20000}};
    struct itimerval off = {{0, 0}, {0, 0}};
    int sv[2], before = count_fds();
    pf_msg_hdr hdr;
    pid_t pid;

    /* No SA_RESTART: the blocking recvmsg really returns EINTR while the
     * child takes its time, and pf_recv_msg must go back to waiting. The
     * test passes either way; it only fails if EINTR escapes. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_alarm;
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGALRM, &sa, &old) == 0);
    seqpair(sv);
    pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(sv[1]);
        usleep(200000);
        CHECK_OK(pf_send_msg(sv[0], PF_MSG_READY, 5, NULL, 0, NULL, 0));
        _exit(0);
    }
    close(sv[0]);
    CHECK(setitimer(ITIMER_REAL, &it, NULL) == 0);
    CHECK_EQ(pf_recv_msg(sv[1], &hdr, NULL, 0, NULL, 0), 0);
    CHECK(setitimer(ITIMER_REAL, &off, NULL) == 0);
    CHECK_EQ(hdr.arg, 5);
    wait_ok(pid);
    CHECK(sigaction(SIGALRM, &old, NULL) == 0);
    close(sv[1]);
    CHECK_EQ(count_fds(), before);
}

static const struct pf_test_case tests[] = {
    PF_CASE(test_payload_roundtrip), PF_CASE(test_max_payload),
    PF_CASE(test_send_validation), PF_CASE(test_recv_validation), PF_CASE(test_pass_one_fd),
    PF_CASE(test_pass_several_fds), PF_CASE(test_cap_too_small),
    PF_CASE(test_maxfds_too_small), PF_CASE(test_short_and_garbage),
    PF_CASE(test_bad_header_fields), PF_CASE(test_oversize_datagram), PF_CASE(test_ctrunc),
    PF_CASE(test_foreign_cmsg), PF_CASE(test_eof), PF_CASE(test_send_to_closed_peer),
    PF_CASE(test_nonblocking), PF_CASE(test_eintr_retried),
};

int main(int argc, char **argv)
{
    return pf_run_cases(tests, PF_NCASES(tests), argc, argv);
}
