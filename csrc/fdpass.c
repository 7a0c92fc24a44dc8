/* fdpass.c -- one channel message = one SOCK_SEQPACKET datagram.
 *
 * Theory of operation: a message is a fixed 16-byte pf_msg_hdr followed by
 * hdr.len payload bytes, sent with a single sendmsg so SOCK_SEQPACKET keeps it
 * atomic (no framing, no partial reads). File descriptors ride along in ONE
 * SCM_RIGHTS control message, at most PF_MAX_FDS of them. The receiver trusts
 * nothing: it reads into the header plus the caller's buffer, asks the kernel
 * for the datagram's real length (MSG_TRUNC), and checks every field against
 * what actually arrived (nginx ngx_read_channel, libuv uv__stream_recv_cmsg).
 * Any failure closes every fd that arrived first: an fd the caller never sees
 * is an fd nobody will ever close.
 *
 * Control buffers live on the stack, sized for PF_MAX_FDS; no globals, no
 * allocation. Both functions retry EINTR and return >= 0 or -errno.
 * Pure twin: pyfork/_pure/fdpass.py.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "pf_cmsg.h"
#include "pf_internal.h"
#include "pyfork.h"

/* The header is a wire format shared with pyfork/_pure/fdpass.py: catch drift. */
_Static_assert(sizeof(pf_msg_hdr) == 16, "pf_msg_hdr must be 16 bytes");

/* Room for one SCM_RIGHTS cmsg with PF_MAX_FDS ints; the union gives the
 * buffer struct cmsghdr alignment, as CMSG_FIRSTHDR requires. */
typedef union pf__cmsgbuf {
    struct cmsghdr align;
    char buf[CMSG_SPACE(PF_MAX_FDS * sizeof(int))];
} pf__cmsgbuf;

static int pf__valid_type(uint32_t type)
{
    return type >= PF_MSG_CONN && type <= PF_MSG_PARK;
}

/* Returns 0, or -errno. */
int pf_send_msg(int chan, uint32_t type, uint32_t arg,
                const void *payload, size_t len, const int *fds, int nfds)
{
    pf_msg_hdr hdr;
    pf__cmsgbuf cbuf;
    struct iovec iov[2];
    struct msghdr msg;
    ssize_t n;

    if (!pf__valid_type(type) || nfds < 0)
        return -EINVAL;
    if (len > PF_MAX_PAYLOAD || nfds > PF_MAX_FDS)
        return -EMSGSIZE;
    if ((len > 0 && payload == NULL) || (nfds > 0 && fds == NULL))
        return -EINVAL;

    memset(&hdr, 0, sizeof(hdr));
    hdr.magic = PF_MSG_MAGIC;
    hdr.type = (uint16_t)type;
    hdr.nfds = (uint16_t)nfds;
    hdr.len = (uint32_t)len;
    hdr.arg = arg;

    iov[0].iov_base = &hdr;
    iov[0].iov_len = sizeof(hdr);
    iov[1].iov_base = (void *)payload;   /* sendmsg never writes through it */
    iov[1].iov_len = len;

    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = len > 0 ? 2 : 1;
    pf__put_rights(&msg, cbuf.buf, fds, nfds);

    /* MSG_NOSIGNAL: a dead worker must cost us -EPIPE, not the primary's
     * life by SIGPIPE (skalibs ancil_send_fd does the same). Linux raises
     * SIGPIPE for STREAM but not, today, for SEQPACKET; do not rely on it. */
    do
        n = sendmsg(chan, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;
    /* SEQPACKET sends whole datagrams or fail; anything else is a kernel
     * we do not understand, so do not pretend it worked. */
    if ((size_t)n != sizeof(hdr) + len)
        return -EIO;
    return 0;
}

static void pf__close_all(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* Collects every fd in every SCM_RIGHTS cmsg of msg into out[] (room for
 * PF_MAX_FDS), sets *count, and returns 0 when the control data is exactly
 * one well-formed SCM_RIGHTS cmsg (or none), else -EBADMSG. Fds are collected
 * even from a bad layout so the caller can close them. */
static int pf__collect_fds(struct msghdr *msg, int *out, int *count)
{
    const char *end = (const char *)msg->msg_control + msg->msg_controllen;
    struct cmsghdr *c;
    int ncmsg = 0, rc = 0;

    *count = 0;
    for (c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        size_t bytes, k;

        ncmsg++;
        /* The kernel never writes a cmsg past msg_controllen, but a length
         * we do not check is a length we might read beyond the stack. */
        if (c->cmsg_len < CMSG_LEN(0) || (const char *)c + c->cmsg_len > end)
            return -EBADMSG;
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) {
            /* e.g. SCM_CREDENTIALS when someone enabled SO_PASSCRED. */
            rc = -EBADMSG;
            continue;
        }
        bytes = c->cmsg_len - CMSG_LEN(0);
        if (bytes % sizeof(int) != 0)
            rc = -EBADMSG;
        for (k = 0; k + sizeof(int) <= bytes && *count < PF_MAX_FDS; k += sizeof(int))
            memcpy(&out[(*count)++], CMSG_DATA(c) + k, sizeof(int));
    }
    if (ncmsg > 1)
        rc = -EBADMSG;
    return rc;
}

/* Returns 0 when the header agrees with what arrived (n bytes on the wire,
 * nrecv fds), or -EBADMSG / -EMSGSIZE. */
static int pf__check_msg(const pf_msg_hdr *hdr, size_t n, int mflags,
                         int nrecv, size_t cap, int maxfds)
{
    if (mflags & MSG_CTRUNC)
        return -EBADMSG;        /* the sender sent more fds than PF_MAX_FDS */
    if (n < sizeof(*hdr) || hdr->magic != PF_MSG_MAGIC || !pf__valid_type(hdr->type))
        return -EBADMSG;
    /* n is the real datagram length (MSG_TRUNC in the recvmsg flags), so a
     * header lying about its size is caught even when truncated. */
    if (hdr->len > PF_MAX_PAYLOAD || hdr->len != n - sizeof(*hdr))
        return -EBADMSG;
    if (hdr->nfds != nrecv)
        return -EBADMSG;
    /* A well-formed message that is merely bigger than the caller asked for
     * (MSG_TRUNC set) is the caller's limit, not a protocol violation. */
    if (hdr->len > cap)
        return -EMSGSIZE;
    if (mflags & MSG_TRUNC)
        return -EBADMSG;        /* unreachable after the checks above; belt */
    if (nrecv > maxfds)
        return -EMSGSIZE;
    return 0;
}

/* pf_recv_msg with extra recvmsg flags: MSG_PEEK leaves the message queued
 * and gives the caller duplicates of its fds (the kernel clones them). */
int pf__recv_msg_flags(int chan, pf_msg_hdr *hdr, void *payload, size_t cap,
                       int *fds, int maxfds, int flags)
{
    pf__cmsgbuf cbuf;
    struct iovec iov[2];
    struct msghdr msg;
    int got[PF_MAX_FDS];
    int nrecv = 0, rc;
    ssize_t n;

    if (hdr == NULL || (cap > 0 && payload == NULL) || maxfds < 0 ||
        (maxfds > 0 && fds == NULL))
        return -EINVAL;
    /* Never let the kernel copy more than a legal payload into the caller's
     * buffer; anything beyond shows up as MSG_TRUNC with the real length. */
    if (cap > PF_MAX_PAYLOAD)
        cap = PF_MAX_PAYLOAD;

    memset(hdr, 0, sizeof(*hdr));
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof(*hdr);
    iov[1].iov_base = payload;
    iov[1].iov_len = cap;
    memset(&msg, 0, sizeof(msg));
    msg.msg_iov = iov;
    msg.msg_iovlen = 2;
    msg.msg_control = cbuf.buf;
    msg.msg_controllen = sizeof(cbuf.buf);

    /* MSG_CMSG_CLOEXEC: the primary forks; a passed fd must not leak into a
     * child before we decide who owns it. MSG_TRUNC: return the real length
     * of a SEQPACKET datagram even when it did not fit. */
    do
        n = recvmsg(chan, &msg, MSG_CMSG_CLOEXEC | MSG_TRUNC | flags);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return -errno;

    rc = pf__collect_fds(&msg, got, &nrecv);
    if (n == 0 && nrecv == 0 && rc == 0 && msg.msg_controllen == 0)
        return -EPIPE;  /* EOF: peer closed. An empty datagram without fds
                           looks the same; no valid message is that short. */
    if (rc == 0)
        rc = pf__check_msg(hdr, (size_t)n, msg.msg_flags, nrecv, cap, maxfds);
    if (rc < 0)
        goto fail;

    if (nrecv > 0)
        memcpy(fds, got, (size_t)nrecv * sizeof(int));
    return nrecv;

fail:
    pf__close_all(got, nrecv);
    return rc;
}

/* Returns the number of fds received, or -errno; see pyfork.h. */
int pf_recv_msg(int chan, pf_msg_hdr *hdr, void *payload, size_t cap,
                int *fds, int maxfds)
{
    return pf__recv_msg_flags(chan, hdr, payload, cap, fds, maxfds, 0);
}
