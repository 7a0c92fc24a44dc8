"""Fuzzing the HTTP/1.1 front end of the WSGI interface with mutated requests.

A deterministic mutation corpus (wsgi_harness.fuzz_cases: random.Random with a fixed
seed, so every run and every failure is reproducible): seeds are the conformance vectors plus
a few hand-written requests; each case applies one to three mutations (byte flips, inserted
CR/LF/NUL/separators, deleted or duplicated lines, truncation, injected framing fields, bare
LF/CR, case changes, changed numbers).

- test_mutated_requests_over_tcp: 3000 cases, each on its own connection to one forked
  worker. Every answer is a closed connection, a 4xx, or a 200 from the app for a mutation
  that is still a valid request; never a 5xx. Afterwards the same worker (same pid) serves.
- test_reader_split_invariance: in-process, no sockets. The same bytes fed to
  http1.RequestReader whole and cut into random pieces give the same requests and the same
  verdict (an error or not): the reader's buffering and offsets do not depend on how TCP
  segments the stream.
"""
import os
import random

import pytest

from pyfork.serve import http1


import wsgi_harness as H
SEED = H.FUZZ_SEED
CASES = 3000

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(600)]


def app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Pid", str(os.getpid()))])
    return [b"ok"]


def test_mutated_requests_over_tcp():
    with H.Worker(app) as worker:
        first = H.simple_get(worker.addr, "/")
        pid = first.header("x-pid")
        assert pid == str(worker.pid)
        bad = []
        for i, data in enumerate(H.fuzz_cases(CASES)):
            got = H.exchange(worker.addr, data)
            while got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
                got = got[25:]
            if not got:
                continue
            status = got[9:12]
            ok = (got.startswith(b"HTTP/1.1 ") and (status == b"200" or status[:1] == b"4")
                  and b"HTTP/1.1 5" not in got)
            if not ok:
                bad.append((i, data[:200], got[:200]))
        assert not bad, f"{len(bad)} bad answers, first ones: {bad[:5]}"
        for _ in range(3):
            resp = H.simple_get(worker.addr, "/")
            assert resp.status == 200 and resp.header("x-pid") == pid
        assert worker.alive()
        stats = worker.stop()
    assert stats["pid"] == int(pid)
    assert stats["taken"] >= CASES


def _outcome(reader):
    """Drive a reader to its end: completed requests, then "error" or "need-data"."""
    out = []
    while True:
        try:
            event = reader.next_event()
        except http1.HttpError:
            out.append("error")
            return out
        if event is http1.NEED_DATA:
            out.append("need-data")
            return out
        if event is http1.COMPLETE:
            req = reader.request
            out.append((req.method, req.target, req.body, req.keep_alive, req.chunked))
            if not req.keep_alive:
                out.append("close")
                return out


def _feed_split(data, rng, limits):
    reader = http1.RequestReader(limits)
    out = []
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 2, 3, 7, 64, 1000, len(data)))
        reader.feed(data[pos:pos + step])
        pos += step
        result = _outcome(reader)
        out.extend(result[:-1])
        if result[-1] != "need-data":
            out.append(result[-1])
            return out
    out.append("need-data")
    return out


def test_reader_split_invariance():
    limits = http1.Limits()
    rng = random.Random(SEED + 1)
    for data in H.fuzz_seeds() + H.fuzz_cases(2000, SEED + 2):
        reader = http1.RequestReader(limits)
        reader.feed(data)
        whole = _outcome(reader)
        split = _feed_split(data, rng, limits)
        assert split == whole, data[:300]
