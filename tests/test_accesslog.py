"""--access-log: exactly one line per request, gunicorn's atoms, USR1 reopens (WSGI and ASGI).

Real forks and a real client; lines are counted and their atoms compared with what the
client sent. A graceful stop must leave every buffered line in the file; the reopen test
waits for the new file to exist (the worker opens it when it handles USR1), never sleeps.
"""
import base64
import json
import os
import signal

import pytest

import obs_harness as O
import supervisor_harness as H
from pyfork.serve import accesslog

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]

APPS = {"wsgi": "wapp:app", "asgi": "aapp:app"}
SEP = "\x1f"
FORMAT = SEP.join(["%(h)s", "%(l)s", "%(u)s", "%(r)s", "%(m)s", "%(U)s", "%(q)s", "%(H)s", "%(s)s", "%(B)s",
                   "%(b)s", "%(f)s", "%(a)s", "%(p)s", "%({x-req}i)s", "%({x-test}o)s", "%(T)s", "%(D)s",
                   "%(M)s", "%(L)s", "%(t)s"])


@pytest.fixture
def apps(tmp_path):
    O.write_apps(tmp_path)
    return tmp_path


@pytest.fixture(params=["wsgi", "asgi"])
def interface(request):
    return request.param


def _serve(apps, backend, interface, *args, workers=2):
    return H.Server(apps, backend.BACKEND, "--interface", interface, *args, app=APPS[interface], workers=workers)


def test_one_line_per_request_with_gunicorn_atoms(apps, backend, interface):
    path = apps / "access.log"
    with _serve(apps, backend, interface, "--access-log", str(path), "--access-log-format", FORMAT) as srv:
        srv.start(ready=2)
        sent = {}
        pids = set()
        for i in range(200):
            missing = i % 4 == 0
            target = f"/missing/{i}?i={i}&x=y" if missing else (f"/ok/{i}?i={i}" if i % 3 else f"/ok/{i}")
            headers = [("X-Req", f"r{i}"), ("User-Agent", f"agent/{i}"), ("Referer", f"http://ref/{i}")]
            if i % 5 == 0:
                headers.append(("Authorization", "Basic " + base64.b64encode(f"user{i}:pw".encode()).decode()))
            status, body = O.request(srv.port, target, headers)
            assert status == (404 if missing else 200)
            pids.add(json.loads(body)["pid"])
            sent[f"r{i}"] = (i, target, status, len(body))
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0                  # a graceful stop flushes every buffered line
    lines = path.read_text().splitlines()
    assert len(lines) == 200
    seen = set()
    for line in lines:
        (h, l, u, r, m, U, q, H_, s, B, b, f, a, p, xreq, xtest, T, D, M, L, t) = line.split(SEP)
        i, target, status, length = sent[xreq]
        seen.add(xreq)
        path_part, _, query = target.partition("?")
        assert (h, l, m, H_) == ("127.0.0.1", "-", "GET", "HTTP/1.1")
        assert u == (f"user{i}" if i % 5 == 0 else "-")
        assert r == f"GET {target} HTTP/1.1"
        assert (U, q) == (path_part, query)
        assert (int(s), int(B), int(b)) == (status, length, length)
        assert (f, a, xtest) == (f"http://ref/{i}", f"agent/{i}", "yes")
        assert int(p.strip("<>")) in pids
        assert int(T) >= 0 and int(D) >= 0 and int(M) >= 0 and float(L) >= 0
        assert t.startswith("[") and t.endswith("]") and "/" in t
    assert len(seen) == 200                     # exactly one line per request


def test_default_format_is_gunicorns(apps, backend):
    path = apps / "access.log"
    with _serve(apps, backend, "wsgi", "--access-log", str(path), workers=1) as srv:
        srv.start(ready=1)
        O.request(srv.port, "/ok?a=1", [("User-Agent", "ua")])
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    (line,) = path.read_text().splitlines()
    assert accesslog.DEFAULT_FORMAT == '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
    head, _, rest = line.partition(" [")
    assert head == "127.0.0.1 - -"
    assert rest.split("] ", 1)[1].startswith('"GET /ok?a=1 HTTP/1.1" 200 ')
    assert rest.endswith(' "-" "ua"')


def test_usr1_reopens_after_mv(apps, backend, interface):
    path, moved = apps / "access.log", apps / "access.log.1"
    with _serve(apps, backend, interface, "--access-log", str(path), workers=1) as srv:
        srv.start(ready=1)
        for i in range(30):
            assert O.request(srv.port, f"/before/{i}")[0] == 200
        os.rename(path, moved)
        srv.signal(signal.SIGUSR1)
        srv.wait_event("signal", name="SIGUSR1")
        H.wait_until(path.exists, what="the worker to reopen the access log")
        for i in range(20):
            assert O.request(srv.port, f"/after/{i}")[0] == 200
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    old, new = moved.read_text().splitlines(), path.read_text().splitlines()
    assert len(old) == 30 and all("/before/" in x for x in old)
    assert len(new) == 20 and all("/after/" in x for x in new)


@pytest.mark.parametrize("fmt", ["%(h", "%(h)d", "%(nope)s", "100%", "no atoms"])
def test_malformed_format_exits_2_before_any_fork(apps, backend, fmt):
    with H.Server(apps, backend.BACKEND, "--access-log", "-", "--access-log-format", fmt, app="wapp:app") as srv:
        assert srv.wait() == 2
        lines = [x for x in srv.log().splitlines() if x.strip()]
        assert len(lines) == 1 and "access-log-format" in lines[0], lines
        assert srv.count_events("fork") == 0


def test_unwritable_access_log_exits_2(apps, backend):
    with H.Server(apps, backend.BACKEND, "--access-log", str(apps / "no" / "such" / "dir.log"), app="wapp:app") as srv:
        assert srv.wait() == 2
        lines = [x for x in srv.log().splitlines() if x.strip()]
        assert len(lines) == 1 and "access log" in lines[0], lines
        assert srv.count_events("fork") == 0
