/* server.c -- a prefork HTTP hello-world server in C on libpyfork alone.
 *
 * Theory of operation: the primary binds one TCP listener (pf_listen_tcp) and
 * runs a pf_dispatcher that accepts every connection and hands it to a forked
 * worker over that worker's SOCK_SEQPACKET channel (SCM_RIGHTS). Each worker
 * says PF_MSG_READY once, then serves the connections it receives one at a
 * time (read the request head, answer "hello world" with Connection: close,
 * close) and reports each request and each close on its scoreboard line
 * (pf_slot_*), which is the back-pressure the dispatcher reads. Signals reach
 * the primary's loop through a signalfd the dispatcher watches: SIGCHLD reaps
 * (a worker that died is replaced; its queued connections are re-dispatched
 * by pf_dispatcher_remove_worker), SIGTERM/SIGINT stop gracefully (accept the
 * backlog, send every worker PF_MSG_DRAIN after its last connection, wait for
 * them, exit 0). Only the public header is used; see README.md.
 *
 *   ./server [PORT [WORKERS]]     PORT 0 = any free port; prints
 *                                 "READY <port>" on stdout once every worker
 *                                 is READY (bench/floor.c's line).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <pyfork.h>

#define MAX_WORKERS 64
#define TAG_SIGNALS 1
#define HEAD_MAX 8192          /* request head bytes read before giving up */
#define IO_TIMEOUT_S 5         /* a silent client cannot hold a worker longer */

struct primary {
    pf_dispatcher *d;
    pf_slot *board;            /* capacity lines, shared with the workers */
    int nworkers;
    int port;
    int live;                  /* workers forked and not yet reaped */
    int ready;                 /* READY messages seen */
    int stopping;
    int drained;
    pid_t pid[MAX_WORKERS];    /* 0 = no process in this slot */
    int chan[MAX_WORKERS];     /* the primary's end (owned by the dispatcher) */
};

/* ---- worker ------------------------------------------------------------- */

static void close_fds_except(int keep)
{
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *e;
    int fds[1024], n = 0;

    if (dir == NULL)
        return;
    while ((e = readdir(dir)) != NULL && n < 1024) {
        int fd = atoi(e->d_name);
        if (fd > 2 && fd != keep && fd != dirfd(dir))
            fds[n++] = fd;
    }
    closedir(dir);
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = write(fd, buf, len);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        buf += w;
        len -= (size_t)w;
    }
    return 0;
}

/* One connection: read the request head, answer, close. The scoreboard sees
 * the request (pf_slot_request_*) and the close (pf_slot_conn_closed), and a
 * CREDIT goes to the primary when it asked for one (it is waiting on us). */
static void serve_conn(int fd, int chan, pf_slot *line)
{
    char head[HEAD_MAX + 1], resp[256];
    size_t got = 0;
    struct timeval tv = {IO_TIMEOUT_S, 0};
    int complete = 0, n;

    pf_slot_request_started(line);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);   /* accepted non-blocking */
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    while (got < HEAD_MAX && !complete) {
        ssize_t r = read(fd, head + got, HEAD_MAX - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
        head[got] = '\0';
        complete = strstr(head, "\r\n\r\n") != NULL;
    }
    if (complete) {
        char body[64];
        int blen = snprintf(body, sizeof(body), "hello world from worker %d\n", (int)getpid());
        n = snprintf(resp, sizeof(resp),
                     "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     "Connection: close\r\n\r\n%s", blen, body);
        write_all(fd, resp, (size_t)n);
    }
    close(fd);
    pf_slot_request_finished(line);
    if (pf_slot_conn_closed(line, 1))
        pf_send_msg(chan, PF_MSG_CREDIT, 0, NULL, 0, NULL, 0);
}

static void worker_main(int chan, pf_slot *line, pid_t primary)
{
    static char payload[PF_MAX_PAYLOAD];   /* user messages are discarded, but must fit */
    sigset_t none;

    /* Die with the primary; then close the race where it died before prctl. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != primary)
        _exit(1);
    close_fds_except(chan);             /* sibling channels, epoll, listener, signalfd */
    signal(SIGINT, SIG_IGN);            /* Ctrl-C hits the group; the primary orchestrates */
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Wait in poll(), never inside a blocking recvmsg: a worker SIGKILLed
     * while blocked in recvmsg can still dequeue a CONN that arrives before it
     * gets the CPU to die (the kernel retries the receive after the wake-up),
     * and that connection dies with it. Woken in poll() it dies without
     * reading, the CONN stays queued and pf_dispatcher_remove_worker hands it
     * to another worker. (The dispatcher sets this end non-blocking too when it
     * recovers, so sharing the file description with it changes nothing.) */
    fcntl(chan, F_SETFL, fcntl(chan, F_GETFL) | O_NONBLOCK);
    line->pid = (uint32_t)getpid();
    if (pf_send_msg(chan, PF_MSG_READY, 0, NULL, 0, NULL, 0) < 0)
        _exit(1);
    for (;;) {
        pf_msg_hdr h;
        int fds[PF_MAX_FDS];
        int n = pf_recv_msg(chan, &h, payload, sizeof(payload), fds, PF_MAX_FDS);

        if (n == -EAGAIN) {
            struct pollfd p = {chan, POLLIN, 0};
            poll(&p, 1, -1);
            continue;
        }
        if (n == -EPIPE)
            _exit(0);                   /* the primary is gone */
        if (n < 0)
            continue;                   /* malformed: pf_recv_msg closed its fds */
        if (h.type == PF_MSG_CONN) {
            for (int i = 0; i < n; i++)
                serve_conn(fds[i], chan, line);
            continue;
        }
        for (int i = 0; i < n; i++)
            close(fds[i]);
        if (h.type == PF_MSG_DRAIN)
            _exit(0);                   /* no connection follows DRAIN */
    }
}

/* ---- primary ------------------------------------------------------------ */

/* Returns 0 once slot's worker is forked (SPAWNING until it says READY). */
static int spawn(struct primary *p, int slot)
{
    int sv[2], rc;
    pid_t pid, me = getpid();

    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -errno;
    /* Before the fork: the dispatcher keeps the worker's end too, so what is
     * queued to a worker that dies can be read back and sent elsewhere. */
    rc = pf_dispatcher_add_worker(p->d, slot, sv[0], sv[1]);
    if (rc < 0) {
        close(sv[0]);
        close(sv[1]);
        return rc;
    }
    pid = fork();
    if (pid < 0) {
        rc = -errno;
        pf_dispatcher_remove_worker(p->d, slot);
        return rc;
    }
    if (pid == 0)
        worker_main(sv[1], &p->board[slot], me);
    p->pid[slot] = pid;
    p->chan[slot] = sv[0];
    p->live++;
    return 0;
}

static void reap(struct primary *p)
{
    pid_t pid;
    int status;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int s = 0; s < p->nworkers; s++) {
            if (p->pid[s] != pid)
                continue;
            p->pid[s] = 0;
            p->live--;
            /* Connections it never read go to the other workers. */
            pf_dispatcher_remove_worker(p->d, s);
            if (!p->stopping) {
                /* A real supervisor backs off here (pyfork's does: min-uptime, 2^k). */
                fprintf(stderr, "worker %d died (status %d); replacing it\n", (int)pid, status);
                p->ready--;
                if (spawn(p, s) < 0)
                    fprintf(stderr, "could not replace worker in slot %d\n", s);
            }
        }
    }
}

static void on_signals(struct primary *p, int sfd)
{
    struct signalfd_siginfo si;

    while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
        if (si.ssi_signo == SIGCHLD) {
            reap(p);
        } else if (!p->stopping) {
            /* Graceful stop: accept what the kernel already queued, hand it
             * out, then PF_EV_DRAINED tells us to send DRAIN. */
            p->stopping = 1;
            pf_dispatcher_stop_accepting(p->d);
        }
    }
}

static void on_message(struct primary *p, int slot)
{
    pf_msg_hdr h;
    int fds[PF_MAX_FDS];
    static char payload[PF_MAX_PAYLOAD];
    int n = pf_recv_msg(p->chan[slot], &h, payload, sizeof(payload), fds, PF_MAX_FDS);

    if (n < 0)
        return;
    for (int i = 0; i < n; i++)
        close(fds[i]);
    if (h.type == PF_MSG_READY && !p->stopping) {
        pf_dispatcher_set_state(p->d, slot, PF_WORKER_READY);
        if (++p->ready == p->nworkers) {
            printf("READY %d\n", p->port);
            fflush(stdout);
        }
    }
}

static void on_drained(struct primary *p)
{
    p->drained = 1;
    for (int s = 0; s < p->nworkers; s++) {
        if (p->pid[s] == 0)
            continue;
        pf_dispatcher_set_state(p->d, s, PF_WORKER_DRAINING);
        pf_send_msg(p->chan[s], PF_MSG_DRAIN, 0, NULL, 0, NULL, 0);
    }
}

int main(int argc, char **argv)
{
    struct primary p;
    pf_config cfg;
    pf_event ev[16];
    sigset_t sigs;
    struct sockaddr_in addr;
    socklen_t alen = sizeof(addr);
    size_t board_size;
    int port = argc > 1 ? atoi(argv[1]) : 8000;
    int listener, sfd, rc;

    /* First: a pyfork.h from one wheel and a libpyfork.a from another fail here. */
    rc = PF_ABI_CHECK();
    if (rc != 0) {
        fprintf(stderr, "pyfork.h does not match libpyfork.a: %s\n", strerror(-rc));
        return 2;
    }
    memset(&p, 0, sizeof(p));
    p.nworkers = argc > 2 ? atoi(argv[2]) : 2;
    if (p.nworkers < 1 || p.nworkers > MAX_WORKERS || port < 0 || port > 65535) {
        fprintf(stderr, "usage: %s [PORT [WORKERS (1..%d)]]\n", argv[0], MAX_WORKERS);
        return 2;
    }
    /* Signals arrive as a readable fd in the dispatcher's loop (the core
     * installs no handlers): block them and read them from a signalfd. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGCHLD);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    sfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC);
    listener = pf_listen_tcp("127.0.0.1", port, 1024, 0);
    if (sfd < 0 || listener < 0) {
        fprintf(stderr, "cannot listen on 127.0.0.1:%d: %s\n", port,
                strerror(listener < 0 ? -listener : errno));
        return 2;
    }
    getsockname(listener, (struct sockaddr *)&addr, &alen);
    cfg = (pf_config){
        .capacity = p.nworkers, .policy = PF_POLICY_RR, .max_inflight = 64,
        .max_listeners = 1, .max_watch = 1, .max_pending = 256, .accept_batch = 64,
        .emfile_pause_ms = 100,
    };
    rc = pf_dispatcher_new(&cfg, &p.d);
    if (rc < 0) {
        fprintf(stderr, "pf_dispatcher_new: %s\n", strerror(-rc));
        return 2;
    }
    p.board = pf_dispatcher_scoreboard(p.d, &board_size);
    pf_dispatcher_watch(p.d, sfd, TAG_SIGNALS);
    fprintf(stderr, "primary %d: 127.0.0.1:%d, %d workers\n", (int)getpid(),
            ntohs(addr.sin_port), p.nworkers);
    p.port = ntohs(addr.sin_port);
    for (int s = 0; s < p.nworkers; s++) {
        rc = spawn(&p, s);
        if (rc < 0) {
            fprintf(stderr, "fork: %s\n", strerror(-rc));
            return 2;
        }
    }
    pf_dispatcher_add_listener(p.d, listener);
    /* The loop: C runs until a policy event; there is none per connection. */
    while (!(p.stopping && p.drained && p.live == 0)) {
        int n = pf_dispatcher_run(p.d, -1, ev, 16);
        if (n < 0) {
            fprintf(stderr, "pf_dispatcher_run: %s\n", strerror(-n));
            break;
        }
        for (int i = 0; i < n; i++) {
            if (ev[i].type == PF_EV_WATCH)
                on_signals(&p, sfd);
            else if (ev[i].type == PF_EV_MESSAGE)
                on_message(&p, ev[i].slot);
            else if (ev[i].type == PF_EV_DRAINED)
                on_drained(&p);
        }
    }
    pf_dispatcher_free(p.d);
    close(listener);
    close(sfd);
    fprintf(stderr, "primary %d: stopped\n", (int)getpid());
    return 0;
}
