"""Shared pytest fixtures for pyfork.

- ``backend``: parametrised over "c" and "python"; the backend module from
  pyfork.backend.load(name). With PYFORK_BACKEND=c the "c" case must load (a
  missing build FAILS, it is never skipped); with PYFORK_BACKEND unset/auto an
  unbuilt C backend is skipped with the reason; PYFORK_BACKEND=python skips it.
  The "python" case always runs.
- ``fd_guard``: asserts the process's open-fd count is the same after the test
  as before (opt in with ``pytest.mark.usefixtures("fd_guard")``).
- ``open_fds`` / ``free_port`` fixtures hand out the helper functions of the same
  names (fixtures work under --import-mode=importlib, where conftest is not
  importable as a module).
- ``procs``, ``rig``, ``ends``: the backend suites' forked children, dispatcher
  with forked workers, and dispatcher with test-held channel ends
  (backend_harness.Procs, Rig, Ends), cleaned up after the test.
- Session start: with PYFORK_BACKEND=c, a pyfork without its compiled module
  (typically imported from a source tree) stops the run with an explicit error.
"""

import gc
import os
import socket
import sys
import time

import pytest

# The shared test harnesses (wsgi_harness.py, asgi_harness.py, supervisor_harness.py,
# redis_server.py) are plain modules beside this file. --import-mode=importlib leaves
# sys.path alone, so put this folder on it (never the repo root: that would import the
# source tree's pyfork/ without its compiled module).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BACKENDS = ("c", "python")


def _env_backend():
    return (os.environ.get("PYFORK_BACKEND", "") or "auto").strip().lower()


def open_fds():
    """Number of fds open in this process (the listdir fd is counted every time,
    so differences are exact)."""
    return len(os.listdir("/proc/self/fd"))


def free_port(host="127.0.0.1"):
    """A TCP port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pytest_sessionstart(session):
    if _env_backend() != "c":
        return
    import importlib
    try:
        importlib.import_module("pyfork._core")
    except Exception as exc:  # noqa: BLE001 -- any failure here is fatal
        pkg = sys.modules.get("pyfork")
        where = getattr(pkg, "__file__", None) or "(pyfork itself did not import)"
        pytest.exit(
            "PYFORK_BACKEND=c but the C backend cannot be imported: %s: %s\n"
            "pyfork is imported from %s. Running from a source tree without a "
            "compiled build? Install the checkout (pip install .) and run pytest "
            "with --import-mode=importlib, or unset PYFORK_BACKEND."
            % (type(exc).__name__, exc, where), returncode=4)


@pytest.fixture(params=BACKENDS)
def backend(request):
    import pyfork.backend
    name = request.param
    env = _env_backend()
    if name == "c":
        if env == "python":
            pytest.skip("PYFORK_BACKEND=python: C backend not under test")
        if env != "c":
            try:
                return pyfork.backend.load("c")
            except ImportError as exc:
                pytest.skip("C backend not built (%s)" % str(exc).split(". ")[0])
    # PYFORK_BACKEND=c: any ImportError is a failure, on purpose.
    mod = pyfork.backend.load(name)
    assert mod.BACKEND == name
    return mod


@pytest.fixture(name="open_fds")
def _open_fds_fixture():
    return open_fds


@pytest.fixture(name="free_port")
def _free_port_fixture():
    return free_port


@pytest.fixture
def fd_guard():
    """Fails the test if it leaves fds open (or closes someone else's)."""
    gc.collect()
    before = open_fds()
    yield before
    # A socket object dropped without close() is closed by the collector.
    deadline = time.monotonic() + 2.0
    while True:
        gc.collect()
        after = open_fds()
        if after == before or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    if after != before:
        listing = sorted(os.listdir("/proc/self/fd"), key=int)
        targets = []
        for fd in listing:
            try:
                targets.append("%s->%s" % (fd, os.readlink("/proc/self/fd/" + fd)))
            except OSError:
                pass
        pytest.fail("open fds changed %d -> %d: %s" % (before, after, ", ".join(targets)))


@pytest.fixture
def procs():
    from backend_harness import Procs
    p = Procs()
    yield p
    p.cleanup()


@pytest.fixture
def rig(backend, procs, tmp_path):
    from backend_harness import Rig
    made = []

    def make(capacity, **kw):
        r = Rig(backend, procs, capacity, tmp_path=tmp_path, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.fixture
def ends(backend):
    from backend_harness import Ends
    made = []

    def make(capacity, **cfg):
        e = Ends(backend, capacity, **cfg)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()
