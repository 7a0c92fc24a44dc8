"""pyfork: Node's cluster model for Python.

One primary owns the listening sockets and hands each accepted connection to a
forked worker over a socketpair (sendmsg/SCM_RIGHTS). Everything heavier than
the version string is imported lazily, so ``import pyfork`` is cheap and never
fails because an optional part (the C extension, the supervisor) is missing.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Cluster", "__version__"]

_SUBMODULES = frozenset(("worker", "primary", "backend", "scoreboard", "cluster", "config", "cli",
                         "serve", "demo", "applib"))


def __getattr__(name):
    if name == "Cluster":
        from pyfork.cluster import Cluster
        return Cluster
    if name in _SUBMODULES:
        return importlib.import_module("pyfork." + name)
    raise AttributeError("module 'pyfork' has no attribute %r" % name)


def __dir__():
    return sorted(set(globals()) | {"Cluster"} | _SUBMODULES)
