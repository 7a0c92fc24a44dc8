"""A hung worker explains itself (pyfork.worker.hangreport): on --timeout the primary sends
SIGABRT, the worker logs the request it was stuck on and every thread's traceback, and the
primary SIGKILLs it after a short grace. Both backends; waits on events, then reads the log
(the log text is the feature here)."""
import signal
import threading

import pytest

import obs_harness as O
import supervisor_harness as H

pytestmark = [pytest.mark.usefixtures("fd_guard"), pytest.mark.timeout(180)]


def test_timeout_logs_traceback_naming_the_stuck_function(tmp_path, backend):
    O.write_apps(tmp_path)
    with H.Server(tmp_path, backend.BACKEND, "--interface", "wsgi", "--timeout", "3", app="wapp:app",
                  workers=1) as srv:
        srv.start(ready=1)

        def stuck():
            try:
                O.request(srv.port, "/stuck?why=test")
            except (OSError, IndexError, ValueError):
                pass
        t = threading.Thread(target=stuck, daemon=True)
        t.start()
        kill = srv.wait_event("kill", reason="hung", timeout=60)
        srv.wait_event("exit", pid=kill["pid"], signal=signal.SIGKILL, cause="hung", timeout=60)
        srv.wait_event("ready", n=2, timeout=60)
        t.join(30)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
        log = srv.log()
    assert f"(pid {kill['pid']}) hung: stuck on GET /stuck?why=test for " in log
    assert "in stuck_in_this_function" in log          # faulthandler's traceback names it
    assert log.index("hung: stuck on") < log.index("in stuck_in_this_function")


def test_worker_abort_hook_runs_in_the_hung_worker(tmp_path, backend):
    # The config file's worker_abort hook runs in the worker the primary found hung, after
    # the report (README "Config file and hooks").
    O.write_apps(tmp_path)
    (tmp_path / "conf.py").write_text(
        "import os\n"
        "def worker_abort(worker):\n"
        "    with open('aborted.txt', 'a') as f:\n"
        "        f.write('%d %d\\n' % (worker.id, os.getpid()))\n")
    with H.Server(tmp_path, backend.BACKEND, "-c", "conf.py", "--interface", "wsgi", "--timeout", "3",
                  app="wapp:app", workers=1) as srv:
        srv.start(ready=1)
        t = threading.Thread(target=lambda: _ignore_errors(O.request, srv.port, "/stuck"), daemon=True)
        t.start()
        kill = srv.wait_event("kill", reason="hung", timeout=60)
        srv.wait_event("exit", pid=kill["pid"], timeout=60)
        t.join(30)
        srv.signal(signal.SIGTERM)
        assert srv.wait() == 0
    lines = (tmp_path / "aborted.txt").read_text().split()
    assert lines == [str(kill["worker"]), str(kill["pid"])]


def _ignore_errors(fn, *args):
    try:
        fn(*args)
    except (OSError, IndexError, ValueError):
        pass
