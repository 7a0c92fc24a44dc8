"""The pure-Python twin of the C dispatch core (csrc/pyfork.h), same interface as pyfork._core.

Theory of operation. A channel is one AF_UNIX SOCK_SEQPACKET socketpair per
worker; a message is one datagram: a 16-byte header (magic, type, nfds, len,
arg) plus payload, with 0..MAX_FDS fds in a single SCM_RIGHTS cmsg. The
receiver trusts nothing: EOF, size, magic, type, length, cmsg level/type/len,
MSG_CTRUNC (which socket.recv_fds does not check) and MSG_TRUNC are checked,
and every fd that arrived is closed on any error.

The Dispatcher is an epoll loop over listeners, worker channels and watched
fds, written after csrc/dispatch*.c function by function. Accepted fds wait
in a pending ring of max_pending entries while a worker is chosen (rr, or
least from the scoreboard), then go out in batches of up to MAX_FDS per
sendmsg and the primary closes its copies. A worker is full when sent minus
closed (closed is what the worker wrote on the shared scoreboard) reaches
max_inflight; a full worker that is skipped gets want_credit set, and its
next close sends MSG_CREDIT, which wakes the loop (a 10 ms re-check covers
the race). Back-pressure: listeners are in the poll set only while nothing
waits in the ring, so at most accept_batch fds are held and the kernel
backlog carries the rest. A channel at EAGAIN is busy until EPOLLOUT; EPIPE
means gone (one HANGUP event). EMFILE/ENFILE spend a reserve fd to accept
and serve one connection, then pause the listeners, so fd exhaustion never
spins. The primary keeps a dup of each worker's end, so connections still
queued to a worker that died are read back by remove_worker and sent to
another worker.

Everything mirrors the C core: same checks, same states, same counters, and
the same errors (rc < 0 there is OSError(errno) here; bad arguments are
ValueError in both).

This module is only the public face (what pyfork.backend loads); the
implementation is split as the C files are:
  fdpass.py         csrc/fdpass.c         messages: send_msg, recv_msg
  listen.py         csrc/listen.c         listen_tcp, listen_unix, adopt_listener
  tcp.py            csrc/tcp.c            tcp_cork
  internal.py       csrc/pf_internal.h    states, Event, worker/listener records
  dispatch.py       csrc/dispatch.c       Dispatcher: lifetime and tables
  dispatch_send.py  csrc/dispatch_send.c  pending ring, rr/least, batched sends
  dispatch_loop.py  csrc/dispatch_loop.c  run(): accept triage, EMFILE, credits, drain
"""

from pyfork._pure.fdpass import (  # HDR_SIZE, MSG_MAGIC: wire facts, kept for callers
    HDR_SIZE, MAX_FDS, MAX_PAYLOAD, MSG_CONN, MSG_CREDIT, MSG_CTL, MSG_DRAIN, MSG_MAGIC,
    MSG_READY, MSG_USER, Message, Receiver, recv_msg, send_msg,
)
from pyfork._pure.dispatch import Dispatcher
from pyfork._pure.internal import (
    SLOT_SIZE, STATE_DRAINING, STATE_FREE, STATE_GONE, STATE_READY, STATE_SPAWNING, Event,
)
from pyfork._pure.listen import adopt_listener, listen_tcp, listen_unix
from pyfork._pure.tcp import tcp_cork
from pyfork.scoreboard import Scoreboard, SlotView

BACKEND = "python"


class SlotWriter(SlotView):
    """The worker-side writers of one scoreboard line (mirrors _core.SlotWriter,
    csrc/slot.c): a SlotView of the single line ``line`` (SlotView.line)."""

    def __init__(self, line):
        super().__init__(Scoreboard(line, 1), 0)

__all__ = [
    "BACKEND", "MAX_FDS", "MAX_PAYLOAD", "SLOT_SIZE", "Message", "Event", "Dispatcher",
    "send_msg", "recv_msg", "Receiver", "SlotWriter", "tcp_cork",
    "listen_tcp", "listen_unix", "adopt_listener",
    "MSG_CONN", "MSG_READY", "MSG_CREDIT", "MSG_DRAIN", "MSG_USER", "MSG_CTL",
    "STATE_FREE", "STATE_SPAWNING", "STATE_READY", "STATE_DRAINING", "STATE_GONE",
]
