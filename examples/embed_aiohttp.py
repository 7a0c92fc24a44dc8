"""aiohttp's low-level server in pyfork's workers: pyfork's primary accepts, aiohttp serves.

    python examples/embed_aiohttp.py [HOST:PORT] [WORKERS]

Theory of operation: `main(rt)` is a pyfork worker body (pyfork.embed). In each worker,
pyfork.embed.run_asyncio runs the loop; `on_start` builds an `aiohttp.web.Server` (it needs
the running loop) before the worker says READY, and every connection the primary hands over
goes to `loop.connect_accepted_socket(server, sock)`, the asyncio way to adopt an accepted
socket. What pyfork needs from the worker:
  * closes: the transport closes its socket, which reports the close (pyfork.embed sockets);
  * requests: `counted()` reports each handler call as a request (the response is written
    just after the handler returns);
  * drain: `server.shutdown()` closes idle kept-alive connections and waits for the
    handlers in flight, then the worker returns.
"""
import asyncio
import os
import sys

from aiohttp import web

import pyfork
import pyfork.embed


async def hello(request):
    return web.json_response({"message": "hello from aiohttp", "workerPid": os.getpid()})


def counted(handler, rt):
    async def handle(request):
        rt.request_started()
        try:
            return await handler(request)
        finally:
            rt.request_finished()
    return handle


@pyfork.embed.worker_body
def main(rt):
    state = {}

    def on_start():
        state["server"] = web.Server(counted(hello, rt))

    def adopt(sock):
        return asyncio.get_running_loop().connect_accepted_socket(state["server"], sock)

    async def on_drain():
        await state["server"].shutdown(timeout=10.0)

    pyfork.embed.run_asyncio(rt, adopt, on_drain=on_drain, on_start=on_start)


if __name__ == "__main__":
    bind = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8000"
    workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    sys.exit(pyfork.Cluster(main, bind=[bind], workers=workers).run())
