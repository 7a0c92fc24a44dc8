"""Unit tests of pyfork.primary.eventstream on real pipes: records, subscribers, and a
JSON-lines sink that never blocks or raises when its reader is slow or gone."""
import json
import os

import pytest

from pyfork.primary.eventstream import EventStream, JsonLinesSink, open_sink

pytestmark = pytest.mark.usefixtures("fd_guard")


class Handle:
    id, pid, slot = 3, 1234, 1


def read_records(fd):
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def test_records_reach_subscribers_and_the_sink_in_order():
    r, w = os.pipe()
    os.set_blocking(r, False)
    stream = EventStream()
    seen = []
    stream.subscribe(seen.append)
    stream.subscribe(lambda ev: 1 / 0)          # a failing subscriber is logged, never raised
    stream.add_sink(JsonLinesSink(w))
    stream.emit("start", urls=["http://127.0.0.1:1"])
    stream.emit("exit", Handle(), code=None, signal=9, cause="crash")
    assert [ev.kind for ev in seen] == ["start", "exit"]
    assert seen[1].handle is not None and seen[1]["signal"] == 9
    recs = read_records(r)
    assert [rec["kind"] for rec in recs] == ["start", "exit"]
    assert recs[1] == {**seen[1].to_dict()} and recs[1]["worker"] == 3 and recs[1]["pid"] == 1234
    stream.close()
    os.close(r)


def test_a_slow_reader_loses_events_counted_never_blocks():
    r, w = os.pipe()
    os.set_blocking(r, False)
    sink = JsonLinesSink(w, max_buffer=4096)
    stream = EventStream()
    stream.add_sink(sink)
    for i in range(5000):                       # far more than the pipe and the buffer hold
        stream.emit("message", Handle(), message={"i": i, "pad": "x" * 100})
    assert sink.dropped_total > 0 and sink.pending <= 4096
    recs = read_records(r)                      # the reader catches up...
    stream.flush()
    recs += read_records(r)
    stream.emit("message", Handle(), message={"i": "last"})
    recs += read_records(r)
    # ...and learns how many it missed before the next record
    assert recs[-2]["kind"] == "dropped" and recs[-2]["count"] == sink.dropped_total
    assert recs[-1]["message"] == {"i": "last"}
    got = [rec["message"]["i"] for rec in recs if rec["kind"] == "message"][:-1]
    assert got == sorted(got) and len(got) + sink.dropped_total == 5000
    stream.close()
    os.close(r)


def test_a_gone_reader_closes_the_sink_quietly():
    r, w = os.pipe()
    os.close(r)
    stream = EventStream()
    sink = JsonLinesSink(w)
    stream.add_sink(sink)
    stream.emit("start")                        # EPIPE: no exception, no SIGPIPE death
    assert sink.closed and stream.sinks == []
    stream.emit("start")


def test_open_sink_targets(tmp_path):
    path = tmp_path / "events.jsonl"
    sink = open_sink(str(path))
    sink.write({"kind": "start"})
    sink.close()
    assert json.loads(path.read_text()) == {"kind": "start"}
    assert os.stat(path).st_mode & 0o777 == 0o600
    r, w = os.pipe()
    sink = open_sink(f"fd://{w}")               # a copy: the caller's fd stays open and theirs
    assert sink.fd != w and sink.primary_only_fds() == [sink.fd, w]
    sink.close()
    os.write(w, b"still mine")
    os.close(w)
    os.close(r)
    for bad in ("fd://x", "fd://-1", ""):
        with pytest.raises(ValueError):
            open_sink(bad)
