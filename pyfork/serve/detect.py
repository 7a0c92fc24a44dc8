"""Signature tests the interfaces' detect(app) functions share.

Theory of operation: an app's interface is guessed from its call signature (see
pyfork.serve.resolve): how many parameters it takes positionally, and whether it (or its
__call__) is a coroutine function. These two questions are asked by more than one interface
(asyncio wants `async (reader, writer)`, ASGI wants `async (scope, receive, send)`), so they
live here rather than in either. The detectors themselves live here too (each interface
module re-exports its own as ``detect``), so guessing an app's interface imports only the
interface that wins: a WSGI app's primary never imports asyncio or uvicorn (~6 MB of RSS).
"""
from __future__ import annotations

import inspect


def positional_params(func) -> int | None:
    """Number of parameters `func` can take positionally (None when unknown or *args)."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return None
    n = 0
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return None
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return n


def async_callable(app):
    """The coroutine function `app` stands for (itself or its async __call__), or None.

    Classes are excluded: calling one builds an instance (an ASGI 2 app), not a coroutine.
    """
    if inspect.isclass(app):
        return None
    if inspect.iscoroutinefunction(app):  # also sees through functools.partial
        return app
    call = getattr(app, "__call__", None)
    if call is not None and inspect.iscoroutinefunction(call):
        return call
    return None


def is_asgi(app) -> bool:
    """True for an ASGI 3 app: async callable taking (scope, receive, send)."""
    target = async_callable(app)
    return target is not None and positional_params(target) == 3


def is_asyncio_handler(app) -> bool:
    """True for a coroutine function taking exactly two parameters (reader, writer)."""
    target = async_callable(app)
    return target is not None and positional_params(target) == 2


def is_wsgi(app) -> bool:
    """A plain callable taking two positional arguments (environ, start_response), not async."""
    if not callable(app):
        return False
    if (inspect.iscoroutinefunction(app) or inspect.isasyncgenfunction(app)
            or inspect.iscoroutinefunction(getattr(app, "__call__", None))):
        return False
    try:
        inspect.signature(app).bind(None, None)
    except (TypeError, ValueError):
        return False
    return True


# The interfaces pyfork.serve.resolve() guesses, by name.
GUESSABLE = {"asgi": is_asgi, "asyncio": is_asyncio_handler, "wsgi": is_wsgi}
