"""The shared scoreboard on both backends (csrc/slot.c, pyfork/scoreboard.py, SlotWriter).

Theory of operation: the dispatcher's MAP_SHARED scoreboard is read through
pyfork.scoreboard and written by a forked child, byte layout checked against
pf_slot; the backend's SlotWriter must write the same fields as SlotView.
"""

import contextlib
import os
import struct

import pytest

from pyfork.scoreboard import HIST_BOUNDS_NS, HIST_BUCKETS, SLOT_SIZE, Scoreboard

from backend_harness import seqpacket_pair

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]


# ---- scoreboard ------------------------------------------------------------

def test_scoreboard_layout_and_sharing(backend, procs):
    with backend.Dispatcher(4) as d:
        board = Scoreboard(d.scoreboard, 4)
        sv = board.slot(2)

        def child():
            sv.set_pid(4242)
            sv.request_started()
            sv.request_started()
            sv.request_finished()
            sv.conn_closed(3)

        assert os.waitstatus_to_exitcode(procs.wait(procs.fork(child))) == 0
        assert SLOT_SIZE == 256 and HIST_BUCKETS == 14
        raw = bytes(d.scoreboard[2 * SLOT_SIZE:3 * SLOT_SIZE])
        closed, handled, hb, busy, active, pid, want = struct.unpack_from("<QQQQIII", raw)
        assert (closed, handled, active, pid, want) == (3, 1, 1, 4242, 0)
        assert hb > 0 and busy > 0
        assert (sv.closed, sv.handled, sv.active, sv.pid) == (3, 1, 1, 4242)
        # the histogram from byte 64: started_sum_ns, duration_sum_ns, 14 bucket counts
        started_sum, duration_sum, *buckets = struct.unpack_from("<QQ14Q", raw, 64)
        assert 0 < started_sum <= hb and sum(buckets) == 1 and duration_sum < hb
        assert sv.durations() == {"counts": buckets, "sum_ns": duration_sum}
        assert sv.conn_closed() is False
        sv.request_credit()
        assert struct.unpack_from("<I", d.scoreboard, 2 * SLOT_SIZE + 40)[0] == 1
        assert sv.conn_closed(2) is True and sv.want_credit == 0
        assert sv.closed == 6
        sv.request_finished()
        assert sv.active == 0 and sv.busy_since_ns == 0
        with pytest.raises(ValueError):
            board.slot(4)
        with pytest.raises(ValueError):
            Scoreboard(bytearray(100), 2)
        # worker_stats reads closed from the scoreboard.
        a, b = seqpacket_pair()
        d.add_worker(2, a.detach())  # zeroes the line
        assert sv.closed == 0 and sv.pid == 0
        sv.conn_closed(0)
        assert d.worker_stats(2) == {"state": backend.STATE_SPAWNING, "sent": 0,
                                     "closed": 0, "inflight": 0}
        b.close()
        board.release()


def test_slot_writer_matches_slotview(backend, procs):
    # A worker writes its line through the backend's SlotWriter (C: csrc/slot.c);
    # the primary reads it through SlotView: same fields, same meaning.
    with backend.Dispatcher(4) as d:
        board = Scoreboard(d.scoreboard, 4)
        sv = board.slot(1)
        writer = backend.SlotWriter(sv.line)

        def child():
            writer.request_started()
            writer.request_started()
            writer.request_finished()
            assert not writer.conn_closed(3)

        assert os.waitstatus_to_exitcode(procs.wait(procs.fork(child))) == 0
        assert (sv.closed, sv.handled, sv.active) == (3, 1, 1)
        assert sv.busy_since_ns > 0 and sv.heartbeat_ns >= sv.busy_since_ns
        assert board.slot(0).closed == 0 and board.slot(2).closed == 0  # only its own line
        sv.request_credit()
        assert writer.conn_closed(2) and sv.want_credit == 0 and sv.closed == 5
        assert not writer.conn_closed(1)
        writer.request_finished()
        assert sv.active == 0 and sv.busy_since_ns == 0 and sv.handled == 2
        with pytest.raises(ValueError):
            backend.SlotWriter(bytearray(8))
        del writer
        board.release()


@contextlib.contextmanager
def _slot_and_writer(backend, writer_kind):
    """Slot 0 of a live dispatcher's scoreboard, read as the primary reads it, and the
    writer a worker uses: the backend's SlotWriter (C: csrc/slot.c) or SlotView itself."""
    with backend.Dispatcher(2) as d:
        board = Scoreboard(d.scoreboard, 2)
        sv = board.slot(0)
        try:
            yield sv, (backend.SlotWriter(sv.line) if writer_kind == "backend" else board.slot(0))
        finally:
            board.release()


@pytest.mark.parametrize("writer_kind", ["backend", "slotview"])
def test_no_credit_while_connections_wait_in_the_channel(backend, writer_kind):
    # A worker that finishes a request or closes a connection while the primary has more
    # queued in its channel (published sent > its taken) has no room to offer: it goes on
    # to the next one, so it owes no CREDIT yet, and want_credit stays set for the finish
    # that leaves nothing queued. Both writers: the C one (csrc/slot.c) and SlotView.
    with _slot_and_writer(backend, writer_kind) as (sv, writer):
        sv.publish_sent(3)                       # the primary put three in the channel
        sv.request_credit()                      # a worker that declared no capacity may not
        assert writer.conn_closed(0)             # count what it takes: it always answers
        writer.set_capacity(1)
        writer.conn_taken(1)
        writer.request_started()
        sv.request_credit()
        assert not writer.request_finished()     # two still queued: no room, no CREDIT
        assert not writer.conn_closed(1)
        assert sv.want_credit == 1 and sv.sent == 3
        writer.conn_taken(2)                     # took the rest
        writer.request_started()
        writer.request_started()
        assert sv.want_credit == 1
        assert writer.request_finished()         # one still running, nothing queued: room
        assert sv.want_credit == 0
        sv.request_credit()
        sv.publish_sent(2)                       # a take-back: sent below taken counts as none
        assert writer.conn_closed(1) and sv.want_credit == 0


@pytest.mark.parametrize("writer_kind", ["backend", "slotview"])
def test_accepted_connections_are_fresh_but_never_queued(backend, writer_kind):
    # A worker that accepts for itself (shared, reuseport) counts what it accepted as fresh
    # (work until the first request begins), so the primary sends it no parked connection
    # meanwhile; taken is untouched, or sent - taken (queued in the channel) would drift.
    with _slot_and_writer(backend, writer_kind) as (sv, writer):
        writer.conn_accepted(2)
        assert (sv.fresh, sv.accepted, sv.taken) == (2, 2, 0)
        assert sv.fresh_work(now_ns=sv.fresh_ms * 1_000_000) == 2    # young: counts as work
        writer.conn_taken(1)                     # a parked one came back on the channel
        assert (sv.fresh, sv.accepted, sv.taken) == (3, 2, 1)
        writer.request_started()
        assert (sv.fresh, sv.active) == (2, 1)


def _finish_after(board_buf, index, writer, ns):
    """Starts a request through ``writer``, moves its start ``ns`` back (the started_sum_ns
    field at byte 64 of the line), finishes it; returns the bucket it was counted in."""
    off = index * SLOT_SIZE
    writer.request_started()
    (started,) = struct.unpack_from("<Q", board_buf, off + 64)
    struct.pack_into("<Q", board_buf, off + 64, (started - ns) % 2**64)   # u64 arithmetic wraps
    before = struct.unpack_from("<14Q", board_buf, off + 80)
    writer.request_finished()
    after = struct.unpack_from("<14Q", board_buf, off + 80)
    grew = [i for i in range(HIST_BUCKETS) if after[i] != before[i]]
    assert len(grew) == 1 and after[grew[0]] == before[grew[0]] + 1
    return grew[0]


@pytest.mark.parametrize("writer_kind", ["slotview", "slotwriter"])
def test_duration_buckets_by_upper_bound(backend, writer_kind):
    # Both writers (SlotView in Python, the backend's SlotWriter: csrc/slot.c for C) count
    # a duration into the first bucket whose bound it does not exceed. The start is moved
    # back by hand, so a duration is known from below (a slow machine only lengthens it):
    # "at least this bucket" always holds; "at most" only where the slack is 125 ms or more.
    with backend.Dispatcher(2) as d:
        board = Scoreboard(d.scoreboard, 2)
        sv = board.slot(1)
        writer = sv if writer_kind == "slotview" else backend.SlotWriter(sv.line)
        for i, bound in enumerate(HIST_BOUNDS_NS):
            assert _finish_after(d.scoreboard, 1, writer, bound + bound // 5) >= i + 1
            below = _finish_after(d.scoreboard, 1, writer, bound // 2)
            if bound >= 250_000_000:
                assert below == i
        assert _finish_after(d.scoreboard, 1, writer, 3600 * 10**9) == HIST_BUCKETS - 1   # +Inf
        dur = sv.durations()
        assert sum(dur["counts"]) == sv.handled == 2 * len(HIST_BOUNDS_NS) + 1
        assert dur["sum_ns"] >= 3600 * 10**9 + sum(b + b // 5 + b // 2 for b in HIST_BOUNDS_NS)
        # overlapping requests: the sum is exact (finish times minus start times)
        writer.request_started()
        writer.request_started()
        (starts,) = struct.unpack_from("<Q", d.scoreboard, SLOT_SIZE + 64)
        s0 = sv.durations()["sum_ns"]
        writer.request_finished()
        t1 = sv.heartbeat_ns
        writer.request_finished()
        t2 = sv.heartbeat_ns
        assert sv.durations()["sum_ns"] - s0 == (t1 + t2 - starts) % 2**64
        assert sv.active == 0 and struct.unpack_from("<Q", d.scoreboard, SLOT_SIZE + 64)[0] == 0
        assert board.slot(0).durations() == {"counts": [0] * HIST_BUCKETS, "sum_ns": 0}   # only its line
        del writer, sv
        board.release()
