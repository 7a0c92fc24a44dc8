"""Backend selection: the C core (pyfork._core) or its pure-Python twin (pyfork._pure).

Both modules expose the same interface, the names of pyfork._api.PUBLIC_NAMES (what
they share is defined there once). ``auto`` picks C
when the extension was built and imports, else Python. Asking for ``c``
explicitly never falls back: a silent fall-back to Python in CI is a defect,
so it raises ImportError saying why.
"""

import importlib
import os

NAMES = ("auto", "c", "python")
ENV = "PYFORK_BACKEND"

__all__ = ["load", "name", "NAMES"]


def _normalize(name):
    if name is None:
        name = os.environ.get(ENV, "") or "auto"
    if not isinstance(name, str):
        raise ValueError("backend must be a string, one of %s; got %r" % ("|".join(NAMES), name))
    key = name.strip().lower()
    if key not in NAMES:
        raise ValueError("unknown backend %r: expected one of %s" % (name, "|".join(NAMES)))
    return key


def _load_c():
    try:
        return importlib.import_module("pyfork._core")
    except ImportError as exc:
        import pyfork
        where = os.path.dirname(os.path.abspath(pyfork.__file__))
        raise ImportError(
            "pyfork backend 'c' requested but the C extension pyfork._core could not be "
            "imported (%s). pyfork was imported from %s; if that is a source checkout, the "
            "extension has not been built or installed there: run "
            "`pip install .` (or `pip install --no-build-isolation -e .`) and use the "
            "installed package, or choose backend 'python'." % (exc, where)) from exc


def load(name=None):
    """Returns the backend module. ``name`` is "auto", "c" or "python"; None reads
    the PYFORK_BACKEND environment variable (default "auto")."""
    key = _normalize(name)
    if key == "python":
        return importlib.import_module("pyfork._pure")
    if key == "c":
        return _load_c()
    try:
        return importlib.import_module("pyfork._core")
    except ImportError:
        return importlib.import_module("pyfork._pure")


def name(backend=None):
    """Returns "c" or "python": the BACKEND of a backend module, or of the backend
    that load(backend) selects when given a name or None."""
    if backend is None or isinstance(backend, str):
        backend = load(backend)
    return backend.BACKEND
