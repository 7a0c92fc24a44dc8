"""The limits `pyfork serve` gives every worker's interface: --limit-concurrency and --keep-alive.

Theory of operation: the primary calls configure() before the first fork (as it does for
pyfork.serve.accesslog), so every worker inherits the values; an interface reads current()
once when it starts serving. current() is None when nothing was configured (an interface
served without a primary, e.g. pyfork.worker.standalone): the interface's defaults apply.

Rejections: an interface that answers 503 because of --limit-concurrency calls rejected()
(one integer add, nothing else). The worker runtime's tick (about once a second) takes the
count with take_rejections() and reports it to the primary in one control message, so the
primary pays per second per worker, never per request.
"""

from __future__ import annotations

from typing import NamedTuple, Optional


class ConnLimits(NamedTuple):
    limit_concurrency: int      # per worker; 0 = off
    keep_alive: float           # idle seconds between requests; 0 = every response closes


_config: Optional[ConnLimits] = None
_rejected = [0]                 # 503s sent because of limit_concurrency, not yet reported


def configure(limit_concurrency: int = 0, keep_alive: float = 5.0) -> None:
    """In the primary, before any fork (values checked by pyfork.config.validate_limits)."""
    global _config
    _config = ConnLimits(int(limit_concurrency), float(keep_alive))


def current() -> Optional[ConnLimits]:
    return _config


def rejected(n: int = 1) -> None:
    """An interface answered `n` requests with 503 because of limit_concurrency."""
    _rejected[0] += n


def take_rejections() -> int:
    """The rejections since the last call (the worker's tick reports them)."""
    n = _rejected[0]
    _rejected[0] = 0
    return n
