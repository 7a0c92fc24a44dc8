"""WSGI through the real CLI: `python -m pyfork serve APP --interface wsgi` as a subprocess.

The app module is written to a temporary directory put on the subprocess's PYTHONPATH. The
primary logs `Listening at ...` and one `ready` line per worker to a log file we poll (no
sleeps beyond that polling); the test talks HTTP over loopback, and stops the primary with
SIGTERM, expecting exit code 0. The backend is whatever PYFORK_BACKEND says (CI: c).

- a Flask app behaves as it does under gunicorn (routing, bodies, streaming, headers) with
  two workers, both of which answer;
- the conformance corpus and a mutation fuzz run: every answer is 4xx, closed, or the app's
  200 for a still-valid request, and afterwards the same worker pids are still serving;
- PYFORK_REQUEST_TIMEOUT reaches the workers: a slow client is dropped;
- SIGTERM drains: the request in flight gets its answer, then the connection closes.
"""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest


import wsgi_harness as H
import net_harness as N
from net_harness import StopOnExit
pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(300)]

APP_SOURCE = textwrap.dedent('''
    import os, time
    import flask

    app = flask.Flask("pyfork_serve_test")

    @app.route("/")
    def index():
        return "index page"

    @app.route("/pid")
    def pid():
        return str(os.getpid())

    @app.route("/user/<name>")
    def user(name):
        return flask.jsonify(name=name, args=flask.request.args.to_dict())

    @app.route("/echo", methods=["POST", "PUT"])
    def echo():
        data = flask.request.get_data()
        return flask.Response(data, headers={"X-Length": str(len(data))})

    @app.route("/stream")
    def stream():
        return flask.Response((f"part {i}\\n" for i in range(4)), mimetype="text/plain")

    @app.route("/headers")
    def headers():
        resp = flask.make_response("h")
        resp.set_cookie("a", "1")
        resp.set_cookie("b", "2")
        resp.headers["X-Custom"] = "v"
        return resp

    @app.route("/sleep")
    def sleep():
        time.sleep(float(flask.request.args.get("s", "0.5")))
        return "slept"
''')


class Served(StopOnExit):
    """`python -m pyfork serve pyfork_serve_test_app:app` on a free loopback port."""

    def __init__(self, tmp_path, workers=2, env=None):
        (tmp_path / "pyfork_serve_test_app.py").write_text(APP_SOURCE)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.addr = ("127.0.0.1", self.port)
        self.log_path = tmp_path / "serve.log"
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tmp_path), os.environ.get("PYTHONPATH", "")) if p)
        child_env.update(env or {})
        child_env["PYFORK_EVENTS"] = str(tmp_path / "events.jsonl")
        self.events_path = tmp_path / "events.jsonl"
        cmd = [sys.executable, "-m", "pyfork", "serve", "pyfork_serve_test_app:app",
               "--interface", "wsgi", "-b", f"127.0.0.1:{self.port}", "-w", str(workers)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=child_env, cwd=str(tmp_path))  # not the repo root: see README
        deadline = time.monotonic() + H.LIVENESS
        while N.count_events(self.events_path, "ready") < workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError("pyfork serve did not start:\n" + self.log())
            time.sleep(0.05)

    def log(self):
        return self.log_path.read_text(errors="replace")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(H.LIVENESS)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        assert code == 0, self.log()
        return code

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def worker_pids(served, rounds=8):
    """The pids answering /pid on fresh connections (rr alternates between workers)."""
    return {int(H.simple_get(served.addr, "/pid").body) for _ in range(rounds)}


def test_flask_under_pyfork_serve(tmp_path):
    requests = pytest.importorskip("requests")
    pytest.importorskip("flask")
    with Served(tmp_path) as served, requests.Session() as s:
        assert len(worker_pids(served)) == 2
        base = f"http://127.0.0.1:{served.port}"
        r = s.get(base + "/")
        assert (r.status_code, r.text, r.headers["Server"]) == (200, "index page", "pyfork")
        assert s.get(base + "/user/bob?q=1").json() == {"name": "bob", "args": {"q": "1"}}
        assert s.get(base + "/nowhere").status_code == 404
        assert s.delete(base + "/echo").status_code == 405
        body = os.urandom(300000)
        r = s.post(base + "/echo", data=body)
        assert r.content == body and r.headers["X-Length"] == str(len(body))
        r = s.put(base + "/echo", data=iter([b"a" * 1000, b"b" * 1000]))   # chunked upload
        assert r.content == b"a" * 1000 + b"b" * 1000
        r = s.get(base + "/stream")
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert r.text == "".join(f"part {i}\n" for i in range(4))
        r = s.get(base + "/headers")
        assert r.headers["X-Custom"] == "v" and len(r.raw.headers.getlist("Set-Cookie")) == 2
        r = s.head(base + "/")
        assert r.headers["Content-Length"] == "10" and r.content == b""


def test_malformed_requests_leave_the_same_workers_serving(tmp_path):
    pytest.importorskip("flask")
    with Served(tmp_path) as served:
        before = worker_pids(served)
        assert len(before) == 2
        corpus = sorted(H.CORPUS.glob("invalid/*.raw"))
        bad = []
        for data in [p.read_bytes() for p in corpus] + H.fuzz_cases(1000, H.FUZZ_SEED + 10):
            got = H.exchange(served.addr, data)
            while got.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"):
                got = got[25:]
            if got and not (got.startswith(b"HTTP/1.1 ") and got[9:10] in b"234"
                            and b"HTTP/1.1 5" not in got):
                bad.append((data[:120], got[:120]))
        for path in corpus:                                 # never 2xx for an invalid vector
            got = H.exchange(served.addr, path.read_bytes())
            if got.startswith(b"HTTP/1.1 2"):
                bad.append((path.name, got[:120]))
        assert not bad, bad[:5]
        assert worker_pids(served) == before
        assert "exited" not in served.log()


def test_request_timeout_from_environment(tmp_path):
    pytest.importorskip("flask")
    with Served(tmp_path, workers=1, env={"PYFORK_REQUEST_TIMEOUT": "0.3"}) as served:
        with H.connect(served.addr) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")      # never finished
            assert H.recv_all(sock) == b""
        assert H.simple_get(served.addr, "/").body == b"index page"


def test_sigterm_drains_in_flight_request(tmp_path):
    pytest.importorskip("flask")
    with Served(tmp_path, workers=1) as served:
        with H.connect(served.addr) as sock:
            sock.sendall(b"GET /sleep?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
            # Not a timing assertion: the short pause only makes "in flight" the likely
            # order; in every order the accepted request must be answered.
            time.sleep(0.2)
            served.proc.send_signal(signal.SIGTERM)
            reader = H.Reader(sock)
            resp = reader.next()
            assert resp.status == 200 and resp.body == b"slept"
            # The worker hears of the drain (MSG_DRAIN) between requests, so the kept-alive
            # connection is closed right after this response (or it said Connection: close).
            assert resp.header("connection") in (None, "close")
            assert reader.next() is None
        assert served.proc.wait(H.LIVENESS) == 0
