"""The shared scoreboard on both backends (csrc/slot.c, pyfork/scoreboard.py, SlotWriter).

Theory of operation: the dispatcher's MAP_SHARED scoreboard is read through
pyfork.scoreboard and written by a forked child, byte layout checked against
pf_slot; the backend's SlotWriter must write the same fields as SlotView.
"""

import os
import struct

import pytest

from pyfork.scoreboard import Scoreboard

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
        raw = bytes(d.scoreboard[2 * 64:3 * 64])
        closed, handled, hb, busy, active, pid, want = struct.unpack_from("<QQQQIII", raw)
        assert (closed, handled, active, pid, want) == (3, 1, 1, 4242, 0)
        assert hb > 0 and busy > 0
        assert (sv.closed, sv.handled, sv.active, sv.pid) == (3, 1, 1, 4242)
        assert sv.conn_closed() is False
        sv.request_credit()
        assert struct.unpack_from("<I", d.scoreboard, 2 * 64 + 40)[0] == 1
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
