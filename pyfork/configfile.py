"""``-c/--config FILE.py``: settings and server hooks from a Python file, gunicorn's style.

Theory of operation: the file is run once, in the primary, before anything is bound
(``runpy.run_path``), and its module globals are read:

* a global named like an option sets it: ``workers = 4``, ``bind = ["127.0.0.1:8000"]``,
  ``max_worker_memory = 512``, ``pid_file = "/run/app.pid"`` (names as in
  pyfork.config.OPTIONS; a string is parsed as on the command line, other values are
  checked as in ``pyfork.Cluster``);
* a function named like a hook (``HOOKS``) is that hook (pyfork.primary.hooks runs them);
* anything else that is a module, a class, a function, or whose name starts with ``_``
  or has a capital letter is the file's own business and ignored; any other lowercase
  global is an unknown setting, and an error (a typo must not be silently ignored).

Precedence (pyfork.cli): command line > PYFORK_* environment > this file > defaults.
Every failure -- the file missing, a syntax error, an exception while it runs, an
unknown setting, a hook that is not callable -- is a ConfigError with one line that
names the file (and the line, when there is one).
"""

from __future__ import annotations

import inspect
import os
import runpy
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict

from pyfork.config import OPTION_BY_NAME, ConfigError

# Server hooks, in the order they run (README "Config file and hooks" documents each).
HOOKS = ("on_starting", "when_ready", "pre_fork", "post_fork", "child_exit", "worker_abort",
         "on_reload", "on_exit")
# Options that make no sense inside the file.
NOT_IN_FILE = ("config", "check_config", "print_config")


@dataclass
class ConfigFile:
    path: str
    values: Dict[str, object] = field(default_factory=dict)     # option name -> value, as written
    hooks: Dict[str, Callable] = field(default_factory=dict)    # hook name -> function


def _where(path: str, exc: BaseException) -> str:
    """' (line N)' of the innermost frame inside the config file, if any."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    for fr in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(fr.filename) == os.path.abspath(path):
            line = fr.lineno
    return f" (line {line})" if line else ""


def load(path: str) -> ConfigFile:
    """Runs the file and returns what it sets; ConfigError (one line) on any problem."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        scope = runpy.run_path(path, run_name="__pyfork_config__")
    except SystemExit as e:
        raise ConfigError(f"config file {path}: called sys.exit({e.code!r})") from None
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = (e.msg if isinstance(e, SyntaxError) else str(e)).splitlines()
        raise ConfigError(f"config file {path}: {type(e).__name__}: {msg[0] if msg else ''}"
                          f"{_where(path, e)}") from None
    out = ConfigFile(path=path)
    for name, value in scope.items():
        if name.startswith("_") or name != name.lower():
            continue
        if name in HOOKS:
            if not callable(value):
                raise ConfigError(f"config file {path}: hook {name} must be a function, got {type(value).__name__}")
            out.hooks[name] = value
        elif name in OPTION_BY_NAME and name not in NOT_IN_FILE:
            out.values[name] = value
        elif inspect.ismodule(value) or inspect.isclass(value) or callable(value):
            continue
        elif name in NOT_IN_FILE:
            raise ConfigError(f"config file {path}: {name} cannot be set in a config file")
        else:
            raise ConfigError(f"config file {path}: unknown setting {name!r} "
                              "(prefix the file's own variables with _)")
    return out


def parse_value(name: str, value):
    """A file value for option ``name``: strings are parsed like the command line (a list
    for a repeatable option), other values are returned as they are for validate()."""
    opt = OPTION_BY_NAME[name]
    if opt.repeat:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"bad {name} {value!r}: expected a string or a list of strings")
        return [opt.kind(v) if isinstance(v, str) else v for v in items]
    if isinstance(value, str):
        return opt.kind(value)
    return value
