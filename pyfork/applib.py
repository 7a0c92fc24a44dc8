"""Loading the app: "module:attribute" -> object, in the primary and in workers.

Theory of operation. The primary imports the app once before any fork, so a
typo, a missing module or an import-time exception is a one-line error and
exit code 2 instead of a crash loop (and ``--interface auto`` can be decided
and checked up front). Then it *forgets* the application's own modules
(``forget()``): every module that the import added to ``sys.modules`` and
whose file lives outside the interpreter's stdlib and site-packages
directories. Workers import the app again after fork, so

* a rolling restart (HUP) runs the code now on disk, as gunicorn without
  --preload does; and
* a worker whose import fails anyway (an env difference, a file changed since
  start, code that only fails inside a worker) crashes before READY and is
  covered by the crash-loop backoff and, eventually, exit code 3.

Installed libraries (site-packages, stdlib) and C extensions stay imported in
the primary and are shared copy-on-write by the workers: importing them again
per fork would cost time, and some extensions cannot be initialised twice in
one process. The consequence: upgrading an installed dependency needs a full
restart, not a HUP. The pyfork package itself is never forgotten (its state,
e.g. ``pyfork.worker.current()``, must stay the same object).
"""

from __future__ import annotations

import importlib
import os
import sys
import sysconfig
from typing import Iterable, List, Tuple

DEFAULT_ATTR = "app"


class AppImportError(Exception):
    """The app could not be loaded; str() is one line for the user."""


def split_spec(spec: str) -> Tuple[str, str]:
    spec = spec.strip()
    mod, sep, attr = spec.partition(":")
    if not sep:
        attr = DEFAULT_ATTR
    if not mod or not attr:
        raise AppImportError(f"bad APP {spec!r}: expected module:attribute")
    for part in mod.split(".") + attr.split("."):
        if not part.isidentifier():
            raise AppImportError(f"bad APP {spec!r}: expected module:attribute")
    return mod, attr


def _ensure_cwd_on_path() -> None:
    # `pyfork serve app:app` should find app.py in the current directory, as
    # gunicorn and uvicorn do (python -m puts cwd first, a console script does not).
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_app(spec: str):
    """Imports "module:attr" (attr may be dotted; default "app") and returns the object.
    Raises AppImportError with a one-line message; the exception it wraps is
    chained so a worker can log the whole traceback."""
    mod_name, attr = split_spec(spec)
    _ensure_cwd_on_path()
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise AppImportError(f"cannot import APP {spec!r}: no module named {e.name!r}") from e
        raise AppImportError(f"cannot import APP {spec!r}: {type(e).__name__}: {e}") from e
    except BaseException as e:  # noqa: BLE001 - app code may raise anything, SystemExit included
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = str(e).splitlines()[0] if str(e) else ""
        raise AppImportError(f"cannot import APP {spec!r}: {type(e).__name__}: {msg}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppImportError(f"cannot import APP {spec!r}: module {mod_name!r} has no attribute {attr!r}") from None
    return obj


def _library_dirs() -> List[str]:
    dirs = set()
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        try:
            p = sysconfig.get_path(key)
        except KeyError:
            continue
        if p:
            dirs.add(os.path.realpath(p))
    for p in sys.path:
        if p and os.path.basename(p.rstrip(os.sep)) in ("site-packages", "dist-packages"):
            dirs.add(os.path.realpath(p))
    return sorted(dirs)


def app_modules(names: Iterable[str]) -> List[str]:
    """The subset of module names that are application code (re-imported by workers)."""
    libs = _library_dirs()
    out = []
    for name in names:
        if name == "pyfork" or name.startswith("pyfork."):
            continue
        mod = sys.modules.get(name)
        path = getattr(mod, "__file__", None) if mod is not None else None
        if not path or not path.endswith(".py"):   # builtins, namespace packages, C extensions
            continue
        real = os.path.realpath(path)
        if any(real == d or real.startswith(d + os.sep) for d in libs):
            continue
        out.append(name)
    return out


def validate_app(spec: str):
    """Primary side: import the app once to check it, then forget the application
    modules so forked workers import them fresh. Returns the app object (valid
    for checks such as interface detection, not for serving)."""
    before = set(sys.modules)
    try:
        app = load_app(spec)
    finally:
        new = [n for n in list(sys.modules) if n not in before]
        forget(app_modules(new))
    return app


def check_app(app, interface: str):
    """Primary side, before any fork: the app imports (when given as "module:attr") and
    ``interface`` can serve it. Returns that interface's module (None when the
    interfaces are not installed). Raises AppImportError with a one-line message."""
    if isinstance(app, str):
        app = validate_app(app)
    try:
        import pyfork.serve
    except ImportError:  # interfaces not installed: the worker reports it
        return None
    try:
        return pyfork.serve.resolve(app, interface)
    except ImportError as e:
        raise AppImportError(f"interface {interface!r} is not available: {e}") from None
    except ValueError as e:
        raise AppImportError(str(e).splitlines()[0]) from None


def forget(names: Iterable[str]) -> None:
    for n in names:
        sys.modules.pop(n, None)
    importlib.invalidate_caches()
