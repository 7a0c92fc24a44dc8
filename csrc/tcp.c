/* tcp.c -- options on a connected TCP socket, for an interface in a worker.
 *
 * pf_tcp_cork: TCP_CORK holds partial segments until it is turned off or the
 * socket is closed (tcp(7)). A response written in parts (uvicorn writes the
 * head, then the body) to a connection that is closed right after then leaves
 * as one segment with the FIN instead of three segments: fewer sends, loopback
 * or NIC work, and peer wake-ups per request. A worker-side interface corks a
 * connection only while that is safe (pyfork/serve/asgi_protocol.py, corked,
 * says when); the kernel also sends corked data on its own after 200 ms
 * (tcp(7): "a 200 millisecond ceiling"). Pure twin: pyfork/_pure/tcp.py.
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include "pyfork.h"

/* Returns 0 once TCP_CORK is on (on != 0) or off, or -errno (-EOPNOTSUPP
 * where the platform has no TCP_CORK). */
int pf_tcp_cork(int fd, int on)
{
#ifdef TCP_CORK
    int val = on ? 1 : 0;

    if (setsockopt(fd, IPPROTO_TCP, TCP_CORK, &val, sizeof(val)) < 0)
        return -errno;
    return 0;
#else
    (void)fd;
    (void)on;
    return -EOPNOTSUPP;
#endif
}
