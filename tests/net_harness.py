"""Plumbing shared by asgi_harness and wsgi_harness (no tests here): fd counting, listeners,
the pipes between a test and the worker it forks, and a minimal HTTP response reader.

`ForkedChild` owns three pipes to one forked child: `events` (child -> parent, single bytes:
b"S" once the child may be signalled, and whatever test apps `notify`), `release` (parent ->
child, one byte per `release()`) and `stats` (the child's counters as JSON, written once just
before it `_exit`s). Subclasses decide what the child runs and how it is reaped.
"""
import json
import os
import select
import signal
import socket
import time
import traceback

LIVENESS = 30.0   # s: generous bound for anything that should happen "soon" (2 shared cores)


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def listener(family=socket.AF_INET, backlog=128, blocking=True):
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    sock.setblocking(blocking)
    return sock


def own_socket_option(peer, option, level=socket.IPPROTO_TCP):
    """`option` of this process's TCP socket whose peer is `peer` (found via /proc/self/fd),
    or None: lets an app under test report what its server did to its connection."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.fromfd(int(name), socket.AF_INET, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            try:
                if sock.getpeername() == tuple(peer):
                    return sock.getsockopt(level, option)
            except OSError:
                continue
    return None


CHILD = {}   # in the child only: pipe ends for the harnesses' notify/wait-release helpers


class ForkedChild:
    """A forked child and the three pipes between it and the test (see the module docstring)."""

    def _fork(self, run_child):
        """Forks. The child calls run_child(events_w) -> dict, writes that dict (or the
        traceback, as {"error": ...}) as JSON on the stats pipe and _exits (0 if it returned)."""
        self.events_r, events_w = os.pipe2(os.O_CLOEXEC)
        release_r, self.release_w = os.pipe2(os.O_CLOEXEC)
        self.stats_r, stats_w = os.pipe2(os.O_CLOEXEC)
        self.stats = None
        pid = os.fork()
        if pid == 0:  # child: never returns
            code = 1
            try:
                os.close(self.events_r)
                os.close(self.release_w)
                os.close(self.stats_r)
                CHILD.update(events_w=events_w, release_r=release_r)
                out = run_child(events_w)
                code = 0
            except BaseException:
                out = {"error": traceback.format_exc()}
            try:
                os.write(stats_w, json.dumps(out).encode())
            finally:
                os._exit(code)
        self.pid = pid
        os.close(events_w)
        os.close(release_r)
        os.close(stats_w)

    def wait_event(self, expected, timeout=LIVENESS):
        """Blocks until the child writes `expected` on the events pipe (other bytes are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.events_r], [], [], left)[0]:
                raise AssertionError(f"child {self.pid} did not signal {expected!r} within {timeout} s")
            got = os.read(self.events_r, 1)
            if got == expected:
                return
            if not got:
                raise AssertionError(f"child {self.pid} exited before signalling {expected!r}")

    def release(self):
        os.write(self.release_w, b"R")

    def kill(self):
        """Last resort in a finally: kill and reap if still running; close our fds."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self._close_pipes()

    def _close_pipes(self):
        for name in ("events_r", "release_w", "stats_r"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


class StopOnExit:
    """`with` support for anything with stop() and kill(): a clean exit stops (and so checks),
    an exception kills."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.stop()
        else:
            self.kill()


def read_response(sock):
    """Reads one Content-Length response from a blocking socket: (status, headers, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip()
    length = int(hdrs.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, hdrs, rest[:length]


def events_file(tmp_path):
    """Where a `pyfork serve` child writes its event stream (PYFORK_EVENTS, README "Events")."""
    return tmp_path / "events.jsonl"


def count_events(path, kind):
    """How many records of `kind` the JSON-lines event file at `path` holds so far (a line
    still being written is not counted)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 0
    n = 0
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and json.loads(line).get("kind") == kind:
            n += 1
    return n


def installed_backend():
    """"c" when the installed pyfork has its compiled core, else "python": the backend a
    test that starts `pyfork serve` runs with."""
    try:
        import pyfork.backend
        pyfork.backend.load("c")
        return "c"
    except ImportError:
        return "python"


def exchange(port, *parts, source="127.0.0.1", then_close=False, timeout=LIVENESS):
    """Connects from `source` to 127.0.0.1:`port`, sends each part in its own write (and
    half-closes with `then_close`); returns all the server sent before closing (a reset
    ends it too)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        for part in parts:
            if part:
                s.sendall(part)
        if then_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out
