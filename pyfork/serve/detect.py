"""Signature tests the interfaces' detect(app) functions share.

Theory of operation: an app's interface is guessed from its call signature (see
pyfork.serve.resolve): how many parameters it takes positionally, and whether it (or its
__call__) is a coroutine function. These two questions are asked by more than one interface
(asyncio wants `async (reader, writer)`, ASGI wants `async (scope, receive, send)`), so they
live here rather than in either.
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
