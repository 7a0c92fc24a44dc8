"""Backend selection and the one interface both backends have (pyfork.backend, pyfork._api).

Theory of operation: pyfork.backend.load picks pyfork._core (C) or pyfork._pure
(Python) and never falls back silently when C was asked for; both modules must
expose exactly pyfork._api.PUBLIC_NAMES with the same constants and tuples, which
is what lets the rest of the suite run one set of tests against either.
"""

import os
import sys
import types

import pytest

import pyfork
import pyfork.backend
from pyfork import _api

from backend_harness import LIVENESS

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("fd_guard")]


# ---- backend selection -----------------------------------------------------

def test_backend_name_matches_env():
    env = (os.environ.get("PYFORK_BACKEND", "") or "auto").lower()
    got = pyfork.backend.name()
    if env == "c":
        # The check CI relies on: the C backend is really the one in use.
        assert got == "c"
    elif env == "python":
        assert got == "python"
    else:
        assert got in ("c", "python")
    assert pyfork.__version__ == "0.1.0"


def test_backend_load_names():
    assert pyfork.backend.load("python").BACKEND == "python"
    assert pyfork.backend.name("python") == "python"
    assert pyfork.backend.name(pyfork.backend.load("python")) == "python"
    with pytest.raises(ValueError, match="unknown backend"):
        pyfork.backend.load("cython")
    with pytest.raises(ValueError):
        pyfork.backend.load(3)


def test_import_pyfork_is_lazy(tmp_path):
    """import pyfork loads nothing heavy, and works even if cluster.py is broken."""
    import subprocess
    code = ("import sys, pyfork\n"
            "heavy = [m for m in ('pyfork.cluster', 'pyfork._core', 'pyfork._pure', 'cffi')"
            " if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert pyfork.backend.name('python') == 'python'\n"
            "assert pyfork.scoreboard.SLOT_SIZE == 256\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       timeout=LIVENESS)
    assert r.returncode == 0, r.stderr.decode()
    # A package whose cluster module is broken still imports.
    pkg = tmp_path / "pyfork"
    pkg.mkdir()
    pkg.joinpath("__init__.py").write_bytes(open(pyfork.__file__, "rb").read())
    pkg.joinpath("cluster.py").write_text("raise RuntimeError('broken on purpose')\n")
    code = ("import pyfork\n"
            "assert pyfork.__version__ == '0.1.0'\n"
            "try:\n    pyfork.Cluster\nexcept RuntimeError:\n    pass\n"
            "else:\n    raise SystemExit('Cluster should fail')\n")
    # -S: no site-packages (an editable install's finder would pick the real one).
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=str(tmp_path),
                       env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(tmp_path)},
                       capture_output=True, timeout=LIVENESS)
    assert r.returncode == 0, r.stderr.decode()


def test_backend_interface(backend):
    assert backend.MAX_FDS == 32 and backend.MAX_PAYLOAD == 65536 and backend.SLOT_SIZE == 256
    assert (backend.MSG_CONN, backend.MSG_READY, backend.MSG_CREDIT, backend.MSG_DRAIN,
            backend.MSG_USER, backend.MSG_CTL, backend.MSG_PARK) == (1, 2, 3, 4, 5, 6, 7)
    assert (backend.STATE_FREE, backend.STATE_SPAWNING, backend.STATE_READY,
            backend.STATE_DRAINING, backend.STATE_GONE) == (0, 1, 2, 3, 4)
    assert backend.Message._fields == ("type", "arg", "payload", "fds")
    assert backend.Event._fields == ("kind", "slot", "tag")


def public_names(mod):
    """What a module offers by name: dir() without underscore names and without a
    package's own submodules (pyfork._pure.fdpass & co. are its layout, not its API)."""
    def own_submodule(value):
        return isinstance(value, types.ModuleType) and value.__name__.startswith(mod.__name__ + ".")
    return {n for n in dir(mod) if not n.startswith("_") and not own_submodule(getattr(mod, n))}


def test_backends_export_the_same_names(backend):
    # Each backend's names are exactly PUBLIC_NAMES, so the two have the same ones:
    # nothing leaks (ffi, lib, errno, NamedTuple, Scoreboard, HDR_SIZE ...).
    assert backend.__all__ == list(_api.PUBLIC_NAMES)
    assert public_names(backend) == set(_api.PUBLIC_NAMES)
    for name in backend.__all__:
        assert getattr(backend, name, None) is not None, name
    # The shared types are one type, not two look-alikes.
    assert backend.Message is _api.Message and backend.Event is _api.Event


def test_both_backends_have_one_interface(backend):
    # The python backend always loads: compare whichever one this is against it.
    pure = pyfork.backend.load("python")
    assert public_names(backend) == public_names(pure)
    for name in _api.PUBLIC_NAMES:
        a, b = getattr(backend, name), getattr(pure, name)
        if isinstance(a, int):
            assert a == b, name
