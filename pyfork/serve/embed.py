"""The embed interface: the app is a worker body of the user's own, `main(rt)`.

Theory of operation: pyfork forks, does its hygiene and signal set-up as for any interface,
then calls `main(rt)` with the worker runtime (the Runtime protocol, pyfork/serve/runtime.py)
and the worker ends when it returns. The body owns the loop and the server: it watches
`rt.fileno()`, takes connections, reports closes and requests, ticks, and returns once
`rt.draining` is true and its connections are done. pyfork.embed has the helpers (sockets
that report their own close, an asyncio driver) and examples/embedding.md the duties.

Never guessed from a signature (any one-argument callable would match): choose it with
`--interface embed`, `Cluster(main, interface="embed")`, or mark the body with
`pyfork.embed.worker_body` (which sets `pyfork_interface = "embed"`).
"""
from .runtime import Runtime

NAME = "embed"
# Requests a worker body can run at once, for the central queue (README "Nothing waits behind
# a slow request"): the servers embedded here (Tornado, aiohttp) run an event loop, like the
# asyncio interface. A body that serves one request at a time sets `pyfork_capacity = 1`
# (pyfork.embed.worker_body(capacity=1)).
CAPACITY = 100


def detect(app) -> bool:
    """True only for a body explicitly marked `pyfork_interface = "embed"`."""
    return getattr(app, "pyfork_interface", None) == NAME


def serve(app, rt: Runtime) -> None:
    """Runs the worker body `app(rt)`; the worker exits when it returns."""
    app(rt)
