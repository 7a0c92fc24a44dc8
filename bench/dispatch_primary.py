"""A minimal pyfork primary for the dispatch benchmarks: the backend's Dispatcher
and nothing else of the supervisor.

Theory of operation: bind a listener with the backend, create a Dispatcher,
add N workers (socketpair, add_worker before fork, as the arbiter does), fork
them, then block in Dispatcher.run() until SIGTERM. Every connection takes the
production path: accept in the backend's loop -> choose (rr or least) ->
sendmsg with SCM_RIGHTS -> the worker receives. Python in the primary runs
only for policy events (a worker's READY, the signal wakeup pipe), exactly as
in pyfork's arbiter, so the primary's CPU per connection measured from outside
is the dispatch cost of the backend.

Workers (--worker):
  py-close  backend.recv_msg, close every fd, scoreboard closed/credit (pure Python)
  c-close   floor.c's floor_worker via ctypes: recvmsg, close (same code as the floor)
  c-http    floor_worker answering one HTTP request per connection (for wrk)
The c-* workers make the floor, the C backend and the pure backend differ in
the primary only.

Usage: python dispatch_primary.py --backend c|python [--workers 2] [--policy rr]
       [--worker py-close|c-close|c-http] [--port 0] [--stats-file PATH]
Prints "READY <port>" once every worker said READY. On SIGTERM: close the
dispatcher (workers see EOF), reap, write stats, exit 0.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import signal
import socket
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

PR_SET_PDEATHSIG = 1


def worker_main(be, wend: int, slot: int, board_mv, kind: str, floor_lib: str | None) -> int:
    """Child side. Owns only wend (every other inherited fd was closed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    base = slot * be.SLOT_SIZE
    struct.pack_into("<I", board_mv, base + 36, os.getpid())
    be.send_msg(wend, be.MSG_READY)
    if kind.startswith("c-"):
        lib = ctypes.CDLL(floor_lib)
        lib.floor_worker.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        raw = (ctypes.c_char * len(board_mv)).from_buffer(board_mv)
        addr = ctypes.addressof(raw) + base
        # ctypes releases the GIL: from here on the worker is plain C.
        rc = lib.floor_worker(wend, 1 if kind == "c-http" else 0, addr, addr + 40)
        return 0 if rc == 0 else 1
    # py-close: the backend's own receive path, then the scoreboard protocol.
    closed = 0
    while True:
        try:
            msg = be.recv_msg(wend)
        except BlockingIOError:  # the peer dup may share an O_NONBLOCK description
            select.select([wend], [], [])
            continue
        except BrokenPipeError:
            return 0
        if msg.type != be.MSG_CONN:
            for fd in msg.fds:
                os.close(fd)
            continue
        for fd in msg.fds:
            os.close(fd)
        closed += len(msg.fds)
        struct.pack_into("<Q", board_mv, base, closed)
        if struct.unpack_from("<I", board_mv, base + 40)[0]:
            struct.pack_into("<I", board_mv, base + 40, 0)
            be.send_msg(wend, be.MSG_CREDIT, len(msg.fds))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", required=True, choices=["c", "python"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--policy", default="rr", choices=["rr", "least"])
    ap.add_argument("--worker", default="py-close", choices=["py-close", "c-close", "c-http"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--max-inflight", type=int, default=1000)
    ap.add_argument("--stats-file")
    args = ap.parse_args()

    import pyfork.backend
    be = pyfork.backend.load(args.backend)
    floor_lib = benchlib.build_floor()[1] if args.worker.startswith("c-") else None

    lfd = be.listen_tcp("127.0.0.1", args.port, 2048)
    port = socket.socket(fileno=os.dup(lfd))
    port_no = port.getsockname()[1]
    port.close()

    d = be.Dispatcher(args.workers, policy=args.policy, max_inflight=args.max_inflight)
    d.add_listener(lfd)
    rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    signal.set_wakeup_fd(wfd)
    d.watch(rfd, 1)

    chans, pids = {}, {}
    board = d.scoreboard
    for slot in range(args.workers):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        chan, wend = a.detach(), b.detach()
        d.add_worker(slot, chan, os.dup(wend))
        chans[slot] = chan
        pid = os.fork()
        if pid == 0:
            rc = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                # Fork hygiene: keep stdio and our channel end only.
                os.closerange(3, wend)
                os.closerange(wend + 1, 65536)
                rc = worker_main(be, wend, slot, board, args.worker, floor_lib)
            except BaseException as e:  # noqa: BLE001 - a child must never return into main
                print(f"worker {slot}: {e!r}", file=sys.stderr)
            os._exit(rc)
        os.close(wend)
        pids[slot] = pid

    ready = set()
    announced = False
    while not stop:
        for ev in d.run(None):
            if ev.kind == "watch":
                try:
                    os.read(rfd, 4096)
                except BlockingIOError:
                    pass
            elif ev.kind == "message":
                msg = be.recv_msg(chans[ev.slot])
                for fd in msg.fds:
                    os.close(fd)
                if msg.type == be.MSG_READY:
                    d.set_ready(ev.slot)
                    ready.add(ev.slot)
            elif ev.kind == "hangup":
                print(f"worker slot {ev.slot} hung up", file=sys.stderr)
                stop.append(1)
        if not announced and len(ready) == args.workers:
            print(f"READY {port_no}", flush=True)
            announced = True

    stats = d.stats()
    d.close()
    os.close(lfd)
    for pid in pids.values():
        os.waitpid(pid, 0)
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            json.dump({k: v for k, v in stats.items()}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
