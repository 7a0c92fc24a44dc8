"""HTTP/1.1 conformance of the WSGI interface against gunicorn's request corpus.

The vectors (found by wsgi_harness.find_corpus: $PYFORK_CONFORMANCE_DIR, a copy in
tests/conformance/http-requests, or /work/shared/conformance/http-requests; missing corpus =
a skip with that reason, or a failure with PYFORK_REQUIRE_CONFORMANCE=1) are sent byte for byte over one TCP connection each (then half-closed) to a forked worker
running pyfork.serve.wsgi with an app that reads the whole body and reports every request it
sees on a pipe. Rules (the corpus README):
- invalid/*.raw: a 4xx status or a closed connection; never 2xx (the app must not see the
  request), never 5xx; the worker keeps serving.
- valid/*.raw: the app sees the first request and its response is sent.
After every vector a plain GET checks that the same worker still serves.

Known exceptions are listed in KNOWN with the reason and the outcome we assert instead; none
may be a request-smuggling (rfc9112_smuggle_*) or forbidden-trailer vector, and there may be
at most two (the target in issue 4; gunicorn itself gets two of these wrong).
"""
import os

import pytest


import wsgi_harness as H
CORPUS = H.CORPUS
VALID = sorted(CORPUS.glob("valid/*.raw"))
INVALID = sorted(CORPUS.glob("invalid/*.raw"))

# file -> (reason, the outcome we get instead: "closed" or a status code)
KNOWN = {
    "valid/099.raw": (
        "announces Content-Length: 17914 but carries 8599 body bytes, then the client "
        "half-closes: the message is incomplete (RFC 9112 8) and pyfork never hands an "
        "incomplete body to the app (gunicorn lets the app read a short body)", "closed"),
}

MISSING = (f"HTTP conformance corpus not found (looked in $PYFORK_CONFORMANCE_DIR, "
           f"tests/conformance/http-requests, ../shared/conformance/http-requests beside the checkout)")
if not (VALID and INVALID) and os.environ.get("PYFORK_REQUIRE_CONFORMANCE") == "1":
    raise RuntimeError(MISSING + " and PYFORK_REQUIRE_CONFORMANCE=1")

pytestmark = [
    pytest.mark.usefixtures("fd_guard"),
    pytest.mark.timeout(300),
    pytest.mark.skipif(not (VALID and INVALID), reason=MISSING),
]


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    H.notify(b"A")
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Body-Length", str(len(body)))])
    return [b"seen ", environ["REQUEST_METHOD"].encode("latin-1")]


@pytest.fixture(scope="module")
def server():
    before = H.fd_count()
    worker = H.Worker(app)
    try:
        yield worker
    except BaseException:
        worker.kill()
        raise
    stats = worker.stop()
    assert H.fd_count() == before
    assert stats["pid"] == worker.pid


def run_vector(server, path):
    """Returns (outcome, requests the app saw): outcome is "closed" or the first status."""
    server.events_now()                                 # forget earlier reports
    data = H.exchange(server.addr, path.read_bytes())
    seen = server.events_now().count(b"A")
    while data.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
        data = data[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
    if not data:
        outcome = "closed"
    else:
        assert data.startswith(b"HTTP/1.1 ") and data[12:13] == b" ", data[:100]
        outcome = int(data[9:12])
    # the same worker still serves
    resp = H.simple_get(server.addr, "/after")
    assert resp.status == 200 and resp.body == b"seen GET"
    assert server.events_now() == b"A"
    return outcome, seen


def correct(kind, outcome, seen):
    if kind == "valid":
        return seen >= 1 and outcome == 200
    return seen == 0 and (outcome == "closed" or 400 <= outcome < 500)


def name_of(path):
    return f"{path.parent.name}/{path.name}"


@pytest.mark.parametrize("path", VALID + INVALID, ids=name_of)
def test_vector(server, path):
    kind = path.parent.name
    outcome, seen = run_vector(server, path)
    known = KNOWN.get(name_of(path))
    if known is not None:
        reason, expected = known
        assert (outcome, seen) == (expected, 0), f"known exception changed: {reason}"
        return
    assert correct(kind, outcome, seen), (
        f"{kind} vector {path.name}: outcome {outcome}, app saw {seen} request(s)")


def test_score(server):
    """The whole corpus in one go: at most 2 wrong, and exactly the documented ones."""
    wrong = []
    for path in VALID + INVALID:
        outcome, seen = run_vector(server, path)
        if not correct(path.parent.name, outcome, seen):
            wrong.append(name_of(path))
    assert len(VALID) + len(INVALID) == 94
    assert len(wrong) <= 2, wrong
    assert sorted(wrong) == sorted(KNOWN)
    assert not [w for w in wrong if "smuggle" in w or "trailer" in w]
