/* pf_cmsg.h -- the one SCM_RIGHTS control message a channel datagram carries.
 *
 * Theory of operation: pf_send_msg (fdpass.c) attaches its fds as exactly
 * one SCM_RIGHTS cmsg whose length is exactly CMSG_SPACE(nfds ints), so the
 * receiver sees one cmsg and no slack (cmsg(3) for the macros). The unit
 * tests (csrc/tests/test_fdpass.c) build malformed datagrams the same way,
 * with more fds than PF_MAX_FDS on purpose, so the builder takes any buffer
 * rather than a PF_MAX_FDS-sized one. Header-only, static inline: no state,
 * nothing to link. Internal (pf__): not part of pyfork.h.
 */
#ifndef PF_CMSG_H
#define PF_CMSG_H

#include <string.h>
#include <sys/socket.h>

/* Returns nothing; with nfds > 0 points msg's control data at buf and
 * writes one SCM_RIGHTS cmsg holding fds[0..nfds) there; with nfds == 0
 * leaves msg without control data. buf must be aligned for struct cmsghdr
 * (a union with one, as CMSG_FIRSTHDR requires) and hold
 * CMSG_SPACE(nfds * sizeof(int)) bytes: the caller sizes it. */
static inline void pf__put_rights(struct msghdr *msg, void *buf, const int *fds, int nfds)
{
    size_t bytes = (size_t)nfds * sizeof(int);
    struct cmsghdr *c;

    msg->msg_control = NULL;
    msg->msg_controllen = 0;
    if (nfds <= 0)
        return;
    memset(buf, 0, CMSG_SPACE(bytes));
    msg->msg_control = buf;
    msg->msg_controllen = CMSG_SPACE(bytes);
    c = CMSG_FIRSTHDR(msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(bytes);
    memcpy(CMSG_DATA(c), fds, bytes);
}

#endif
