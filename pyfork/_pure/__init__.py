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
sendmsg and the primary closes its copies. A worker gets a connection only
when it can start it now: queued (sent minus the scoreboard's taken) plus
active below the capacity it declared, and below the separate open-connection
cap (sent minus closed < max_inflight); a worker skipped for want of room gets
want_credit set, and its next finished request or close sends MSG_CREDIT,
which wakes the loop (a 10 ms re-check covers the race); the primary withdraws
the request once nothing waits for room. Back-pressure: listeners are in the poll set only while nothing
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

This module is only the public face (what pyfork.backend loads): its names
are pyfork._api.PUBLIC_NAMES, no more. The implementation is split as the C
files are, a state object and functions over it instead of methods on one
class (see internal.py):
  fdpass.py         csrc/fdpass.c         messages: send_msg, recv_msg, Receiver
  listen.py         csrc/listen.c         listen_tcp, listen_unix, adopt_listener
  tcp.py            csrc/tcp.c            tcp_cork
  slot.py           csrc/slot.c           SlotWriter
  internal.py       csrc/pf_internal.h    the dispatcher's State, its records, fd helpers
  dispatch.py       csrc/dispatch.c       Dispatcher: lifetime and tables
  dispatch_send.py  csrc/dispatch_send.c  pending ring, rr/least, batched sends
  dispatch_loop.py  csrc/dispatch_loop.c  run(): accept triage, EMFILE, credits, drain
  park.py           csrc/park.c           idle kept-alive connections parked until readable
Constants, Message, Event and the argument checks are pyfork._api's.
"""

from pyfork._api import (
    MAX_FDS, MAX_PAYLOAD, MSG_CONN, MSG_CREDIT, MSG_CTL, MSG_DRAIN, MSG_PARK, MSG_READY, MSG_USER,
    PUBLIC_NAMES as _PUBLIC_NAMES, SLOT_SIZE, STATE_DRAINING, STATE_FREE, STATE_GONE,
    STATE_READY, STATE_SPAWNING, Event, Message,
)
from pyfork._pure.dispatch import Dispatcher
from pyfork._pure.fdpass import Receiver, recv_msg, send_msg
from pyfork._pure.listen import adopt_listener, listen_tcp, listen_unix
from pyfork._pure.slot import SlotWriter
from pyfork._pure.tcp import tcp_cork

BACKEND = "python"

__all__ = list(_PUBLIC_NAMES)
