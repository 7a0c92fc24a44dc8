"""Interfaces: how a worker serves an app on the sockets the primary hands it.

Theory of operation: each interface is a module `pyfork.serve.<name>` exposing
`NAME`, `CAPACITY` (requests a worker can run at once: 1 for the inline wsgi and raw
loops; the dispatcher sends a worker a connection only while it has room),
`detect(app) -> bool` and `serve(app, rt)`; `rt` implements the runtime
contract, the `Runtime` protocol in pyfork/serve/runtime.py (`rt.take()` gives
connected sockets, `rt.closed()` is called once per socket, and so on). `resolve()` picks the module for an app: explicitly by name,
from an `app.pyfork_interface` attribute, or by asking each auto-detectable
interface in a fixed order. The order matters: an ASGI app is also a coroutine
function (asyncio would take it if asked first) and a plain `def app(a, b)` could
be WSGI or raw, so ASGI goes first, then asyncio, then WSGI; `raw` has a signature
indistinguishable from WSGI (two positional parameters), so it is never guessed.

Modules are imported lazily: `resolve()` guesses with pyfork.serve.detect's signature
tests and imports only the module that matched, so a worker
serving WSGI never imports uvicorn and a missing optional dependency (uvicorn for
asgi) only matters to the apps that need it.
"""
from __future__ import annotations

import importlib
from types import ModuleType

INTERFACES = ("asgi", "asyncio", "wsgi", "raw", "embed")
AUTO_ORDER = ("asgi", "asyncio", "wsgi")  # raw and embed are never guessed: see the module docstring

# Interface name -> module name inside this package ("asyncio" would shadow the stdlib
# inside the package if the file had that name, hence aio.py).
_MODULES = {"asgi": "asgi", "asyncio": "aio", "wsgi": "wsgi", "raw": "raw", "embed": "embed"}

ACCEPTED_SIGNATURES = (
    "asgi: async def app(scope, receive, send) (or an object with an async __call__); "
    "asyncio: async def handler(reader, writer); "
    "wsgi: def app(environ, start_response); "
    "raw: def handler(sock, addr) (only with --interface raw or app.pyfork_interface = 'raw'); "
    "embed: def main(rt), a worker body of your own (only with --interface embed or "
    "@pyfork.embed.worker_body)"
)


def load(name: str) -> ModuleType:
    """Returns the interface module called `name` (one of INTERFACES); ValueError otherwise."""
    if name not in _MODULES:
        raise ValueError(f"unknown interface {name!r}; choose one of: auto, {', '.join(INTERFACES)}")
    return importlib.import_module(f"{__name__}.{_MODULES[name]}")


def resolve(app, name: str = "auto") -> ModuleType:
    """Returns the interface module that serves `app`.

    `name` is "auto" or one of INTERFACES. With "auto", `app.pyfork_interface` (a
    name) wins when present; otherwise asgi, asyncio and wsgi are asked in that order.
    Raises ValueError for an unknown name or an app no interface recognises.
    """
    if name is None:
        name = "auto"
    if name != "auto":
        return load(name)
    declared = getattr(app, "pyfork_interface", None)
    if isinstance(declared, str):
        return load(declared)
    from .detect import GUESSABLE
    for candidate in AUTO_ORDER:
        if not GUESSABLE[candidate](app):
            continue
        try:
            return load(candidate)      # only the interface that matched is imported
        except ImportError:
            # An interface whose dependency is missing (uvicorn for asgi) cannot serve
            # the app anyway; the next one may. If none matches, the error below says
            # what the app should look like.
            continue
    raise ValueError(
        f"cannot tell how to serve {app!r}: it matches no interface. Accepted signatures: "
        f"{ACCEPTED_SIGNATURES}. Pass --interface to choose one explicitly."
    )
