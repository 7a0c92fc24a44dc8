"""pyfork: Node's cluster model for Python.

One primary owns the listening sockets and hands each accepted connection to a
forked worker over a socketpair (sendmsg/SCM_RIGHTS). Everything heavier than
the version string is imported lazily, so ``import pyfork`` is cheap and never
fails because an optional part (the C extension, the supervisor) is missing.

For embedding the C core in another program (README "Embedding"), the wheel
ships pyfork.h and the static libpyfork.a; ``get_include()``, ``get_library_dir()``
and ``get_cmake_dir()`` say where, as numpy's and pybind11's functions do.
"""

import importlib
import os

__version__ = "0.1.0"
__all__ = ["Cluster", "__version__", "get_include", "get_library_dir", "get_cmake_dir"]

_SUBMODULES = frozenset(("embed", "worker", "primary", "backend", "scoreboard", "cluster", "config", "cli",
                         "serve", "demo", "applib"))

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_include() -> str:
    """The directory holding pyfork.h (the C core's public header), for ``-I``."""
    return os.path.join(_HERE, "include")


def get_library_dir() -> str:
    """The directory holding libpyfork.a (``-L``; ``-lpyfork``); its ``pkgconfig``
    subdirectory holds pyfork.pc, for ``PKG_CONFIG_PATH``."""
    return os.path.join(_HERE, "lib")


def get_cmake_dir() -> str:
    """The directory holding pyforkConfig.cmake: ``-Dpyfork_DIR=`` it, then
    ``find_package(pyfork)`` gives the imported target ``pyfork::pyfork``."""
    return os.path.join(_HERE, "lib", "cmake", "pyfork")


def __getattr__(name):
    if name == "Cluster":
        from pyfork.cluster import Cluster
        return Cluster
    if name in _SUBMODULES:
        return importlib.import_module("pyfork." + name)
    raise AttributeError("module 'pyfork' has no attribute %r" % name)


def __dir__():
    return sorted(set(globals()) | {"Cluster"} | _SUBMODULES)
