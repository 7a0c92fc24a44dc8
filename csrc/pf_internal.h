/* pf_internal.h -- the dispatcher's state, shared by the dispatch*.c files.
 *
 * Theory of operation: a pf_dispatcher is one struct whose every table is
 * sized at pf_dispatcher_new (Redis ae.c keeps its whole loop the same way),
 * so the hot path never allocates. The files split by job:
 *   dispatch.c       handle lifetime and the table API (listeners, watches,
 *                    workers, stats) -- everything the caller calls between runs;
 *   dispatch_send.c  the pending ring, worker choice (rr / least), batching
 *                    and the sendmsg errno triage;
 *   dispatch_loop.c  pf_dispatcher_run: epoll, accept triage, EMFILE, credit,
 *                    channel events, draining;
 *   park.c           idle kept-alive connections handed back by a stuck
 *                    worker, watched until their next request.
 * A function one of them defines and another calls is declared here, once,
 * under the file that defines it; no .c file declares another's functions.
 * The clock is pf_clock.h. Nothing here is public API; names are pf__.
 * Pure twin: pyfork/_pure/internal.py (the shared state and constants).
 */
#ifndef PF_INTERNAL_H
#define PF_INTERNAL_H

#include <stdint.h>
#include <sys/epoll.h>

#include "pf_clock.h"
#include "pyfork.h"

/* epoll_event.data.u64 = kind << 32 | id, where id is the fd for listeners
 * and watches (looked up in tables of at most 64) and the slot for workers. */
#define PF__K_LISTENER 1u
#define PF__K_WORKER   2u
#define PF__K_WATCH    3u
#define PF__K_PARK     4u   /* id = index in the parking table */
#define PF__EV_DATA(kind, id) (((uint64_t)(kind) << 32) | (uint32_t)(id))

/* A worker channel's poll mask: data and EOF (EPOLLRDHUP: the worker shut
 * its end); pf__chan_events adds EPOLLOUT while the channel is full. */
#define PF__CHAN_EVENTS (EPOLLIN | EPOLLRDHUP)

/* Why a worker is skipped even though it is READY and has room. */
#define PF__BLK_NONE  0
#define PF__BLK_OUT   1  /* channel said EAGAIN: EPOLLOUT is armed and clears it */
#define PF__BLK_RETRY 2  /* other transient send error (ENOBUFS, ETOOMANYREFS):
                            cleared by the recheck timer, never by EPOLLOUT,
                            which would fire at once and spin */

/* While fds wait for a worker, re-check every 10 ms even without a CREDIT:
 * a worker written against the raw protocol may never send one, and 100
 * wakeups/s while stalled cost nothing measurable (not a spin). */
#define PF__RECHECK_MS 10
/* least: a request running this long counts as one more connection in flight.
 * A light request takes well under 1 ms here (hello world: ~0.1 ms of worker
 * CPU); 5 ms of running marks a request as heavy without reacting to noise. */
#define PF__LEAST_AGE_MS 5

/* Prefetch with take-back (dispatch_send.c): when no worker can start a
 * connection now, up to PF__PREFETCH_MAX may wait, one per message, in the
 * channel of a worker that is idle (about to start what it has) or whose
 * request began less than PF__PREFETCH_US ago, so it goes from one to the
 * next without sleeping. Measured (bench/README.md "Close path after fresh"):
 * a sync worker that gets its next connection only when idle sleeps and is
 * woken once per `Connection: close` request, 1.4 context switches and
 * ~130 us of CPU per request against ~70 us when it never waits; 3 queued
 * halve the switches, 15 remove them. Hello world runs ~0.1 ms per request;
 * a request still running PF__TAKEBACK_US after it began may be a slow one:
 * the primary then reads what waits behind it back through the worker's end
 * it holds (SEQPACKET: exactly one reader gets each message) for a worker
 * that can start it. While anything is prefetched the loop looks at least
 * every PF__TAKEBACK_US (to the us: dispatch_loop.c waits with epoll_pwait2). */
#define PF__PREFETCH_MAX 8
#define PF__PREFETCH_US 500
#define PF__TAKEBACK_US 1000
/* ... or already after PF__RESCUE_US when another worker would start them
 * sooner: it is idle, or it is going through requests that each began
 * less than PF__RESCUE_US ago. */
#define PF__RESCUE_US 250
/* An idle worker (no request in progress) with connections still queued is
 * about to read them; one that stays so this long is not reading (it may
 * report no requests at all, or be starved of CPU): take them back too. Not
 * PF__TAKEBACK_US: under CPU contention a worker often waits a few ms for a
 * core, and taking its queue then only costs syscalls and a sleep (measured:
 * 22-29 % of connections taken back at 1 ms, 9-18 % without an idle rule). */
#define PF__TAKEBACK_IDLE_US 10000

/* epoll_wait batch: level-triggered, so readiness beyond it simply comes
 * back on the next call; 256 keeps the buffer small for 4096 slots. */
#define PF__MAX_EPOLL_BATCH 256

typedef struct pf__worker {
    int chan;             /* primary end, non-blocking, in epoll while not GONE */
    int peer;             /* worker's end kept for recovery, or -1 */
    int state;            /* PF_WORKER_* */
    uint8_t blocked;      /* PF__BLK_* */
    uint8_t in_epoll;
    uint8_t out_armed;    /* EPOLLOUT in the channel's event mask */
    uint8_t hup_pending;  /* HANGUP owed to the caller */
    uint64_t sent;        /* fds sent since add_worker */
    uint8_t behind;       /* prefetched connections may wait in its channel */
    uint64_t idle_seen_ns;  /* take-back scan first saw it idle with some queued, 0 = not */
    uint8_t barred;       /* taken back from: no prefetch while busy_since is ... */
    uint64_t barred_since;  /* ... still this (the request, or idleness, they waited behind) */
    uint8_t asked;        /* we set its want_credit since the last pf__forget_credits */
    uint64_t idle_mark;   /* pulling: 1 + its handled + taken + accepted when the last look
                             found it idle, 0 = it was not (pf__pull_over) */
} pf__worker;

typedef struct pf__listener {
    int fd;
    uint8_t nodelay_each; /* TCP listener whose accepted fds do not inherit
                             TCP_NODELAY: set it on each one */
    uint8_t in_poll;
    uint8_t at_eagain;    /* stop_accepting: this one's backlog is empty */
    uint8_t dead;         /* accept said EBADF/EINVAL/ENOTSOCK: never poll again */
} pf__listener;

typedef struct pf__watch {
    int fd;
    uint32_t tag;
} pf__watch;

/* One parked connection (park.c). fd -1 = free; a free entry's next_free
 * links the free list, so parking and unparking are O(1) with no allocation. */
typedef struct pf__park {
    int fd;
    int next_free;        /* free list link, -1 = end */
    uint64_t since_ns;    /* parked at (the idle timeout counts from here) */
    uint8_t ready;        /* readable, waiting for room in the pending ring */
} pf__park;

/* The parking table (pf_dispatcher_set_parking), NULL/0 while off. */
typedef struct pf__parking {
    pf__park *tab;
    int cap;
    int hi;               /* entries >= hi were never used: scans stop there */
    int free_head;        /* -1 = full */
    int nready;           /* entries with ready set */
    uint64_t idle_ns;     /* idle timeout */
    uint64_t sweep_ns;    /* next idle sweep, 0 = none due (nothing parked) */
    int off_told;         /* stopping: park_off set on every scoreboard line */
} pf__parking;

typedef struct pf__pend {
    int fd;
    int recovered;        /* came back from a removed worker's queue */
} pf__pend;

struct pf_dispatcher {
    pf_config cfg;
    int epfd;
    int reserve_fd;       /* /dev/null, spent to accept one connection on EMFILE */
    int reserve_wanted;   /* reopen it when spent (only if it opened once) */

    pf_slot *board;       /* MAP_SHARED scoreboard, cfg.capacity lines */
    size_t board_size;

    pf__worker *workers;  /* cfg.capacity */
    int hi;               /* slots >= hi were never used: scans stop there */
    int n_ready;
    int rr_next;
    int n_hup;            /* workers with hup_pending */

    pf__listener *listeners;
    int nlisteners;
    pf__watch *watches;
    int nwatch;

    pf__pend *pend;       /* ring of cfg.max_pending accepted fds */
    int phead, pcount;

    struct epoll_event *evbuf;
    int evcap;

    int accepting;        /* listeners are (wanted) in the poll set */
    int stopping;         /* pf_dispatcher_stop_accepting was called */
    int pull_on;          /* pf_dispatcher_set_pull: the workers can pull */
    int pulling;          /* pull set on the workers' lines: they accept, we do not */
    uint64_t pull_look_ns;    /* pulling: the next look at whether it is still needed */
    int drained;          /* ... and the final pass is done */
    int drained_unreported;
    int more;             /* a drain pass or parked connections have work left:
                             poll without sleeping */
    uint64_t pause_until_ns;  /* EMFILE pause end, 0 = none */
    uint64_t recheck_ns;      /* PF__BLK_RETRY flags clear at this time, 0 = none */
    int n_behind;             /* workers with behind set */
    uint64_t takeback_ns;     /* earliest take-back due, 0 = none */
    int rescue_wait;          /* pf__take_back_due left a prefetched connection
                                 waiting for the first worker to free up (the
                                 CREDITs it asked for must stay asked) */
    int n_asked;              /* workers with asked set */
    char *scratch;            /* PF_MAX_PAYLOAD bytes: a message a take-back read by
                                 mistake, on its way back to its worker */

    pf_event *out;        /* the run call's event array */
    int nout, maxout;

    pf_stats st;
    pf__parking park;     /* park.c; its counters live in st */
};

/* fdpass.c */
int pf__recv_msg_flags(int chan, pf_msg_hdr *hdr, void *payload, size_t cap,
                       int *fds, int maxfds, int flags);

/* dispatch.c */
int pf__listener_index(const pf_dispatcher *d, int fd);
int pf__watch_index(const pf_dispatcher *d, int fd);
int pf__poll_ctl(pf_dispatcher *d, int op, int fd, uint32_t events, uint32_t kind, int id);

/* dispatch_send.c */
int pf__pend_push(pf_dispatcher *d, int fd, int recovered);
void pf__flush(pf_dispatcher *d);
void pf__mark_gone(pf_dispatcher *d, int slot);
void pf__clear_retry(pf_dispatcher *d);
int pf__chan_events(pf_dispatcher *d, int slot, uint32_t events);
void pf__take_back_due(pf_dispatcher *d, uint64_t now);
void pf__forget_credits(pf_dispatcher *d);
int pf__pull_over(pf_dispatcher *d, uint64_t now);
int pf__pull_start(pf_dispatcher *d);
void pf__pull_end(pf_dispatcher *d);

/* park.c */
void pf__park_recv(pf_dispatcher *d, int slot);
void pf__park_salvage(pf_dispatcher *d, int chan);
void pf__park_on_event(pf_dispatcher *d, int id, uint32_t events);
void pf__park_tick(pf_dispatcher *d, uint64_t now);
uint64_t pf__park_due_ns(const pf_dispatcher *d);
int pf__park_waiting(const pf_dispatcher *d);
void pf__park_free(pf_dispatcher *d);

#endif
