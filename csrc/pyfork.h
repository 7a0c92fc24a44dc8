/* pyfork.h -- public API of the pyfork dispatch core.
 *
 * Theory of operation: one primary process owns the listening sockets. A
 * pf_dispatcher runs an epoll loop over those listeners, one SOCK_SEQPACKET
 * channel per worker, and a few "watched" fds the caller owns (the
 * signal.set_wakeup_fd pipe, a control socket). Accepted connections are
 * handed to a worker with sendmsg/SCM_RIGHTS; the loop returns to the caller
 * only for policy events (a watched fd is readable, a worker sent a message,
 * a channel hung up, listeners drained, timeout). Never per connection.
 *
 * Conventions: every function returns >= 0 on success or -errno. No globals,
 * no signal handlers, no fork, no threads, no allocation per connection
 * (capacity is fixed at pf_dispatcher_new). Public names are pf_, internal
 * pf__, constants PF_.
 *
 * This header is also the cffi cdef source (prototypes only; the build script
 * strips the preprocessor lines), so keep it to plain C declarations.
 */
#ifndef PYFORK_H
#define PYFORK_H

#include <stddef.h>
#include <stdint.h>

#define PF_VERSION 3

/* ---- channel messages ------------------------------------------------ */
/* One SOCK_SEQPACKET datagram = pf_msg_hdr + payload, with 0..nfds fds in a
 * single SCM_RIGHTS cmsg. Fixed header so the receiver can check everything. */
#define PF_MSG_MAGIC 0x31464b50u   /* "PKF1" little-endian */
#define PF_MAX_FDS 32               /* fds per message (batching limit) */
#define PF_MAX_PAYLOAD 65536        /* bytes after the header */
/* Why these limits: Linux takes up to 253 fds per SCM_RIGHTS message
 * (SCM_MAX_FD, unix(7)); 32 keeps every cmsg buffer a small stack array
 * (CMSG_SPACE of 32 ints: 144 bytes on x86-64). Payloads are short JSON
 * control messages, and a SEQPACKET datagram must fit the sender's socket
 * buffer whole (net.core.wmem_default is 212992 bytes on Linux): 64 KiB
 * fits with room to spare. */

#define PF_MSG_CONN   1  /* primary -> worker: nfds connected sockets, no payload */
#define PF_MSG_READY  2  /* worker -> primary: app imported, handlers installed */
#define PF_MSG_CREDIT 3  /* worker -> primary: closed connections, consumed by the dispatcher itself */
#define PF_MSG_DRAIN  4  /* primary -> worker: no connection follows this message */
#define PF_MSG_USER   5  /* either way: JSON payload (user messages) */
#define PF_MSG_CTL    6  /* worker -> primary: JSON payload (runtime requests, e.g. recycle) */
#define PF_MSG_PARK   7  /* worker -> primary: nfds idle kept-alive connections handed back
                            while the worker is stuck in a long request; consumed by the
                            dispatcher itself (park.c), no payload */

typedef struct pf_msg_hdr {
    uint32_t magic;   /* PF_MSG_MAGIC */
    uint16_t type;    /* PF_MSG_* */
    uint16_t nfds;    /* fds carried in the SCM_RIGHTS cmsg */
    uint32_t len;     /* payload bytes following the header */
    uint32_t arg;     /* type-specific small integer */
} pf_msg_hdr;         /* 16 bytes */

/* Returns 0, or -errno: -EMSGSIZE when len > PF_MAX_PAYLOAD or nfds > PF_MAX_FDS,
 * -EINVAL for a bad type, -EAGAIN when a non-blocking channel is full, -EPIPE
 * when the peer is gone. Uses MSG_NOSIGNAL; retries EINTR; never closes fds. */
int pf_send_msg(int chan, uint32_t type, uint32_t arg,
                const void *payload, size_t len, const int *fds, int nfds);

/* Returns the number of fds received (>= 0) with *hdr filled and the payload
 * copied to payload[0..hdr->len). -EPIPE on EOF, -EAGAIN when a non-blocking
 * channel is empty, -EBADMSG for a malformed message (bad magic/type, length
 * mismatch, nfds mismatch, wrong cmsg level/type/len, MSG_CTRUNC, MSG_TRUNC),
 * -EMSGSIZE when the payload exceeds cap or fds exceed maxfds. On every error
 * all fds received are closed first. */
int pf_recv_msg(int chan, pf_msg_hdr *hdr, void *payload, size_t cap,
                int *fds, int maxfds);

/* ---- listeners --------------------------------------------------------- */
#define PF_LISTEN_REUSEPORT 1
#define PF_LISTEN_V6ONLY    2

/* Returns a listening fd (O_NONBLOCK, FD_CLOEXEC, SO_REUSEADDR) bound to
 * host:port (numeric IPv4/IPv6 literal or a name; NULL or "" = any), or -errno. */
int pf_listen_tcp(const char *host, int port, int backlog, int flags);
/* Returns a listening AF_UNIX fd at path (a stale socket file is replaced,
 * any other file is -EADDRINUSE), chmod'ed to mode, or -errno. */
int pf_listen_unix(const char *path, int backlog, int mode);
/* Returns fd after checking it is a listening stream socket (SO_ACCEPTCONN)
 * and setting O_NONBLOCK and FD_CLOEXEC, or -errno (-ENOTSOCK, -EINVAL). */
int pf_listen_adopt(int fd);

/* ---- scoreboard -------------------------------------------------------- */
/* One line of four cache lines per worker slot in a MAP_SHARED|MAP_ANONYMOUS
 * region mapped at pf_dispatcher_new (the first cache line holds all the
 * dispatcher reads per connection; the next two the duration histogram, read
 * only by a metrics scrape; the last park_off), so forked workers write it and the primary reads it
 * with no syscall (Apache httpd's scoreboard). The worker is the only writer
 * of every field except want_credit and park_off, which the primary sets.
 * The dispatcher sends a worker a connection only when it can start it now:
 * queued + fresh + active < capacity, where queued = sent (the primary's
 * count) - taken (the worker's), and fresh counts connections the worker has
 * taken whose first request has not begun yet (its bytes may not even have
 * arrived): without it a sync worker that took a connection looks idle until
 * the request starts, and a second connection sent meanwhile waits behind it
 * if it is a slow one (bench/README.md "Close path after fresh"). fresh counts
 * only for PF_SLOT_FRESH_MS after it last rose from 0, so a client that
 * connects and sends nothing (a browser's preconnect) holds no worker.
 * capacity 0 = not declared: only the open-connection cap
 * (pf_config.max_inflight) applies. */
typedef struct pf_slot {
    uint64_t closed;        /* connections the worker has closed (monotonic) */
    uint64_t handled;       /* requests the worker has completed (monotonic) */
    uint64_t heartbeat_ns;  /* CLOCK_MONOTONIC of the worker's last sign of life */
    uint64_t busy_since_ns; /* CLOCK_MONOTONIC start of the request in progress, 0 = idle */
    uint32_t active;        /* requests in progress */
    uint32_t pid;           /* worker pid, written by the worker at start */
    uint32_t want_credit;   /* set by the primary when it skipped this worker as full;
                               the worker clears it and sends PF_MSG_CREDIT when it
                               can start more (a request finished, a connection closed);
                               the primary clears it again once nothing waits for room */
    uint32_t capacity;      /* requests the worker can run at once (1 = sync), written
                               by the worker before READY; 0 = not declared */
    uint64_t taken;         /* connections the worker has read from its channel (monotonic) */
    uint32_t fresh;         /* taken connections whose first request has not begun (an
                               estimate, never above the truth: any request start or
                               connection close lowers it) */
    uint32_t fresh_ms;      /* CLOCK_MONOTONIC in ms, low 32 bits, when fresh rose from 0 */
    /* -- cache lines 2 and 3: the request-duration histogram, written by the worker in
     * pf_slot_request_finished with the clock it already reads (no syscall) -- */
    uint64_t started_sum_ns; /* sum of the start times of the requests in progress */
    uint64_t duration_sum_ns;/* sum of the durations of finished requests */
    uint64_t duration_le[14];/* finished requests per duration bucket (not cumulative):
                                bucket i counts durations up to the i-th bound below
                                and above the one before; the last one is +Inf */
    /* -- cache line 4: what the primary writes rarely -- */
    uint32_t park_off;      /* set by the primary once it is stopping: the worker hands
                               no more connections back (PF_MSG_PARK), park.c */
    uint32_t pull;          /* rr/least: set by the primary while it leaves new connections
                               in the kernel's queue because every worker was full;
                               meanwhile a worker with room accepts from the listeners
                               itself (dispatch_send.c, pf__pull_start) */
    uint64_t sent;          /* connections the primary has put in this worker's channel
                               (monotonic but for take-back), stored after each send:
                               while sent > taken the worker still has work queued, so
                               a finish or close frees no room and owes no CREDIT */
    uint64_t accepted;      /* connections the worker accepted itself (shared, reuseport;
                               monotonic): open = sent + accepted - closed */
    uint64_t reserved[5];
} pf_slot;                  /* 256 bytes: four cache lines */

/* The histogram's upper bounds in microseconds, Prometheus-style (1 ms .. 10 s),
 * then +Inf: 1000 2500 5000 10000 25000 50000 100000 250000 500000 1000000
 * 2500000 5000000 10000000. pyfork/scoreboard.py HIST_BOUNDS_NS says the same. */
#define PF_HIST_BUCKETS 14

/* How long a taken connection with no request yet counts as work (ms). On
 * loopback or behind a proxy its request arrives within microseconds; 5 ms
 * covers a descheduled worker on a loaded machine, and is all an idle
 * preconnect can hold a worker for. */
#define PF_SLOT_FRESH_MS 5

/* Worker-side writers of the worker's own line (slot.c), as pyfork/scoreboard.py's
 * SlotView methods of the same names: a request began (a fresh connection, if
 * any, is fresh no more); a request ended, returning 1 when the primary asked
 * for a CREDIT; n connections were closed (as many fresh ones as there are, up
 * to n, are no more), returning 1 when the primary asked for a CREDIT; n
 * connections were read from the channel (fresh + n, taken + n); n connections the
 * worker accepted itself (fresh + n); the worker's capacity. */
void pf_slot_request_started(pf_slot *s);
int pf_slot_request_finished(pf_slot *s);
int pf_slot_conn_closed(pf_slot *s, uint32_t n);
void pf_slot_conn_taken(pf_slot *s, uint32_t n);
void pf_slot_conn_accepted(pf_slot *s, uint32_t n);
void pf_slot_set_capacity(pf_slot *s, uint32_t capacity);

/* ---- connected sockets (tcp.c) ------------------------------------------ */
/* TCP_CORK on (on != 0) or off for a connected TCP socket. Returns 0 or -errno
 * (-EBADF, -ENOTSOCK, -EOPNOTSUPP for a socket that is not TCP, ...). */
int pf_tcp_cork(int fd, int on);

/* ---- dispatcher -------------------------------------------------------- */
#define PF_POLICY_RR    0
#define PF_POLICY_LEAST 1

#define PF_WORKER_FREE     0
#define PF_WORKER_SPAWNING 1  /* added, not READY: gets no connections */
#define PF_WORKER_READY    2
#define PF_WORKER_DRAINING 3  /* gets no new connections */
#define PF_WORKER_GONE     4  /* channel hung up (only when no peer fd is held) */

#define PF_EV_WATCH   1  /* a watched fd is readable; tag = the caller's tag */
#define PF_EV_MESSAGE 2  /* worker slot sent a message other than CREDIT; it is left
                            unread in the channel: the caller must pf_recv_msg it
                            before the next run, or run returns the event again */
#define PF_EV_HANGUP  3  /* worker slot's channel hung up; slot becomes GONE */
#define PF_EV_DRAINED 4  /* after pf_dispatcher_stop_accepting: the backlog was
                            accepted to EAGAIN, every pending fd was sent, and the
                            listeners left the poll set */

typedef struct pf_config {
    int capacity;         /* worker slots, 1..4096 */
    int policy;           /* PF_POLICY_RR or PF_POLICY_LEAST */
    int max_inflight;     /* per worker open-connection cap (sent minus closed), a safety
                             bound, not back-pressure (that is capacity); 1..1<<20 */
    int max_listeners;    /* 1..64 */
    int max_watch;        /* 0..64 */
    int max_pending;      /* accepted fds held while choosing a worker, 1..65536 */
    int accept_batch;     /* connections accepted per listener wakeup, 1..max_pending */
    int emfile_pause_ms;  /* listeners left out of the poll set after EMFILE/ENFILE */
} pf_config;

typedef struct pf_event {
    int32_t type;   /* PF_EV_* */
    int32_t slot;   /* worker slot, or -1 */
    uint32_t tag;   /* PF_EV_WATCH: the tag given to pf_dispatcher_watch */
    uint32_t reserved;
} pf_event;

typedef struct pf_stats {
    uint64_t accepted;      /* connections accepted */
    uint64_t dispatched;    /* fds sent to a worker (re-dispatches included) */
    uint64_t redispatched;  /* fds recovered from a removed worker's queue, or taken back
                               from a busy one's (prefetch), and sent again */
    uint64_t busy_skips;    /* times a worker was skipped: channel EAGAIN, no capacity, cap */
    uint64_t fd_exhaustion; /* EMFILE/ENFILE events */
    uint64_t accept_errors; /* other accept errors (ECONNABORTED etc.) */
    uint64_t dropped;       /* fds closed undelivered (pending full during recovery, or shutdown) */
    uint64_t wakeups;       /* epoll_wait returns */
    int32_t pending;        /* fds accepted and not yet sent */
    int32_t accepting;      /* 1 while listeners are in the poll set */
    uint64_t parks;         /* idle connections workers handed back (PF_MSG_PARK) */
    uint64_t unparks;       /* parked connections that went back to a worker: became
                               readable (to the ring), or read after DRAINED (returned) */
    uint64_t park_closed;   /* parked connections closed: client hung up, idle timeout,
                               stopping, or no room anywhere */
    int32_t parked;         /* connections parked now */
    int32_t park_cap;       /* parking table size (pf_dispatcher_set_parking), 0 = off */
    uint64_t pulls;         /* times no worker could start a new connection, so it was left
                               in the kernel's queue for the workers to accept (pf_slot.pull) */
} pf_stats;

typedef struct pf_worker_stats {
    int32_t state;          /* PF_WORKER_* */
    int32_t reserved;
    uint64_t sent;          /* fds sent to this slot since add_worker */
    uint64_t closed;        /* from the scoreboard */
    int64_t inflight;       /* open: sent + the scoreboard's accepted - closed */
} pf_worker_stats;

typedef struct pf_dispatcher pf_dispatcher;

/* Returns 0 and *out, or -EINVAL for a bad config, -ENOMEM, -errno of epoll/mmap. */
int pf_dispatcher_new(const pf_config *cfg, pf_dispatcher **out);
/* Closes every fd the dispatcher owns (channels, peers, pending fds, epoll,
 * reserve fd) and unmaps the scoreboard. Listeners and watched fds are the
 * caller's. NULL is fine. */
void pf_dispatcher_free(pf_dispatcher *d);

/* Returns 0; -ENOSPC when the table is full, -EEXIST if present, -errno of epoll.
 * The fd stays the caller's; it must be non-blocking. */
int pf_dispatcher_add_listener(pf_dispatcher *d, int fd);
/* Returns 0, or -ENOENT. */
int pf_dispatcher_remove_listener(pf_dispatcher *d, int fd);
/* Returns 0; readable fd -> PF_EV_WATCH with tag. -ENOSPC, -EEXIST, -errno. */
int pf_dispatcher_watch(pf_dispatcher *d, int fd, uint32_t tag);
/* Returns 0, or -ENOENT. */
int pf_dispatcher_unwatch(pf_dispatcher *d, int fd);

/* Returns 0. Takes ownership of chan (primary end, made non-blocking) and of
 * peer (the worker's end, kept so that connections queued to a worker that
 * dies can be recovered; -1 = none). Zeroes the slot's scoreboard line. Call
 * before forking the worker. State becomes SPAWNING. -EINVAL bad slot or fd,
 * -EEXIST slot in use. On error nothing is owned. */
int pf_dispatcher_add_worker(pf_dispatcher *d, int slot, int chan, int peer);
/* Returns 0; state is PF_WORKER_READY or PF_WORKER_DRAINING. -EINVAL, -ENOENT. */
int pf_dispatcher_set_state(pf_dispatcher *d, int slot, int state);
/* Returns the number of connections recovered from the slot's queue (read
 * from the held peer end) and re-dispatched to other workers (or held pending),
 * then closes chan and peer and frees the slot. Messages other than CONN in the
 * queue are discarded. -ENOENT when the slot is free. */
int pf_dispatcher_remove_worker(pf_dispatcher *d, int slot);
/* Returns 0. From now on: accept the backlog until EAGAIN, send everything
 * pending, then take the listeners out of the poll set for good and report
 * PF_EV_DRAINED once. */
int pf_dispatcher_stop_accepting(pf_dispatcher *d);

/* Runs the loop with the GIL released (cffi releases it) for at most
 * timeout_ms (-1 = no limit). Returns the number of events written to ev
 * (1..max_ev), 0 on timeout, or -errno. */
int pf_dispatcher_run(pf_dispatcher *d, int timeout_ms, pf_event *ev, int max_ev);

/* Parking (park.c): idle kept-alive connections a stuck worker hands back
 * with PF_MSG_PARK wait in the dispatcher's epoll until their next request,
 * then are dispatched like a new connection. Sizes the table (max_parked
 * entries, 0..1<<20, 0 = off: parked fds go straight to the pending ring)
 * and the idle timeout (1..86400000 ms) after which a parked connection is
 * closed. Returns 0, -EINVAL, -ENOMEM, -EBUSY while connections are parked. */
int pf_dispatcher_set_parking(pf_dispatcher *d, int max_parked, int idle_timeout_ms);

/* Pull (dispatch_send.c, pf__pull_start): on (1), a new connection that no
 * worker can start, every one being full by its declared capacity, is left in
 * the kernel's queue and pf_slot.pull is set on every line, for workers that
 * hold the listeners and accept from them while it is set and they have room.
 * Off (0, the default; turning it off ends a pull), such a connection is
 * accepted and waits in the ring or is prefetched, for workers that only read
 * their channel. Returns 0 or -EINVAL. */
int pf_dispatcher_set_pull(pf_dispatcher *d, int on);

/* Returns 0 and fills *out. */
int pf_dispatcher_stats(const pf_dispatcher *d, pf_stats *out);
/* Returns 0 and fills *out; -EINVAL bad slot. A free slot reports state FREE. */
int pf_dispatcher_worker_stats(const pf_dispatcher *d, int slot, pf_worker_stats *out);
/* Returns the scoreboard base (capacity pf_slot lines) and its size in bytes. */
void *pf_dispatcher_scoreboard(const pf_dispatcher *d, size_t *size);

/* ---- ABI check (abi.c) ------------------------------------------------- */
/* An embedder compiles against this header and links libpyfork.a from the
 * same wheel; if the two come from different versions, the structs it
 * allocates would not be the ones the library reads. PF_ABI_CHECK() (below)
 * passes the header's PF_VERSION and struct sizes to the library, which
 * compares them with its own. Returns 0, -EPROTO when the versions differ,
 * -EINVAL when they agree but a struct size does not (a header edited by
 * hand, or built with other packing). Call it once at start-up, before
 * pf_dispatcher_new, and exit on a non-zero result. */
int pf_abi_check(int version, size_t sizeof_msg_hdr, size_t sizeof_slot,
                 size_t sizeof_config, size_t sizeof_event, size_t sizeof_stats,
                 size_t sizeof_worker_stats);
/* Kept on one line: _build_ffi.py drops preprocessor lines one at a time, so a
 * continuation line would reach the cffi cdef. */
#define PF_ABI_CHECK() pf_abi_check(PF_VERSION, sizeof(pf_msg_hdr), sizeof(pf_slot), sizeof(pf_config), sizeof(pf_event), sizeof(pf_stats), sizeof(pf_worker_stats))

#endif
