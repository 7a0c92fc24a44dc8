"""A private, real redis-server for tests: started on a free loopback port in a temp dir.

Theory of operation: `RedisServer().start()` picks a free port on 127.0.0.1, runs
`redis-server` in the foreground (no persistence, no config file, its own temp
dir) and waits until it answers PING over a raw socket; `stop()` sends SIGTERM,
waits, escalates to SIGKILL and removes the dir. Nothing here talks to a shared
or system Redis, so tests may FLUSHDB freely.

`find_redis_server()` looks the binary up; `require_redis_server()` turns "not
found" into a pytest skip with a clear reason, or into a failure when
PYFORK_REQUIRE_REDIS=1 (CI sets it: a silent skip there would hide a missing
install step). Other test modules may import this file (load it by path, see
tests/test_examples.py, so it works under --import-mode=importlib too) and use
the `redis_server` fixture defined at the bottom.

The module uses only the standard library (pytest only inside the helpers that
skip/fail), so it can also be run by hand: `python tests/redis_server.py`.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

REQUIRE_ENV = "PYFORK_REQUIRE_REDIS"
# Debian puts the binary in /usr/bin; some images only have /usr/sbin or /usr/local/bin.
_CANDIDATES = ("/usr/bin/redis-server", "/usr/sbin/redis-server", "/usr/local/bin/redis-server")


def find_redis_server() -> str | None:
    """Returns the path of a redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    for path in _CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return None


def require_redis_server() -> str:
    """Returns the redis-server path; skips the test when absent, fails if PYFORK_REQUIRE_REDIS=1."""
    import pytest

    path = find_redis_server()
    if path:
        return path
    reason = ("redis-server not found on PATH (install it: apt-get install -y redis-server); "
              "these tests need a real Redis, never a fake")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this a failure")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process. Use as a context manager or call start()/stop()."""

    def __init__(self, executable: str | None = None):
        self.executable = executable or find_redis_server()
        if not self.executable:
            raise FileNotFoundError("redis-server not found")
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 15.0) -> "RedisServer":
        self.dir = tempfile.mkdtemp(prefix="pyfork-redis-")
        # The free port can be taken between our probe and redis' bind: retry a few times.
        for _attempt in range(5):
            port = _free_port()
            log = os.path.join(self.dir, "redis.log")
            self.proc = subprocess.Popen(
                [self.executable, "--port", str(port), "--bind", self.host,
                 "--dir", self.dir, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--protected-mode", "yes",
                 "--logfile", log, "--databases", "4"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # died: most likely the port was taken; try another
                if _ping(port):
                    self.port = port
                    return self
                time.sleep(0.05)
            self._kill()
        tail = ""
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                tail = f.read()[-2000:]
        except OSError:
            pass
        self.stop()
        raise RuntimeError(f"redis-server did not start; log tail:\n{tail}")

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        self._kill()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


try:  # the fixture exists only when pytest is importable (it always is under pytest)
    import pytest as _pytest

    @_pytest.fixture(scope="module")
    def redis_server():
        """A private redis-server for the module; skip (or fail under PYFORK_REQUIRE_REDIS=1) if absent."""
        server = RedisServer(require_redis_server()).start()
        try:
            yield server
        finally:
            server.stop()
except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    with RedisServer() as srv:
        print("redis-server up at", srv.url, "- Ctrl-C to stop")
        try:
            srv.proc.wait()
        except KeyboardInterrupt:
            pass
