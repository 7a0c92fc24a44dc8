"""Helpers (no tests here) for the supervisor integration tests: run `python -m pyfork serve` as a subprocess,
follow its event stream, and talk to it with a tiny HTTP/1.0 client (Connection: close).

Tests observe the primary through its public event stream (README "Events"): the
subprocess gets PYFORK_EVENTS=fd://N, the write end of a pipe whose read end an
`EventReader` thread parses (one JSON record per line); `wait_event(kind, n, **fields)`
waits for records, never for log wording. Its stderr is kept too, for the failure
report and the few tests whose feature is a log line.

The subprocess runs in the test's tmp dir (so the test app module is importable and the repo
root is not on sys.path: the pyfork under test is the one this interpreter imports, through
the inherited environment) with PYFORK_BACKEND set to the backend under test.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

READ_HEAD = r'''
def read_head(sock):
    """The request head (and anything after it), or None if the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
    return data
'''

RAW_APP = READ_HEAD + r'''
import json, os, time
import pyfork.worker

_last = {}
if pyfork.worker.current() is not None:
    pyfork.worker.current().on_message(lambda obj: _last.update(msg=obj))

def app(sock, addr):
    data = read_head(sock)
    if data is None:
        return
    path = data.split(b" ", 2)[1].decode()
    if path.startswith("/sleep"):
        time.sleep(int(path.split("=", 1)[1]) / 1000)
    elif path == "/block":
        with open("blocked.pid", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)          # never answers; stalls this worker (and its heartbeat)
    elif path == "/garbage":
        import socket as _socket, struct
        w = pyfork.worker.current()
        raw = _socket.socket(fileno=os.dup(w._chan))
        raw.send(b"not a pyfork message at all")                           # bad magic
        raw.send(struct.pack("<IHHII", 0x31464B50, 5, 0, 10 ** 6, 0))     # claims a 1 MB payload
        raw.close()
        w._b.send_msg(w._chan, w._b.MSG_USER, 0, b"{not json")             # not JSON
        w._b.send_msg(w._chan, w._b.MSG_CTL, 0, b"[1]")                    # not a control object
        try:
            w.send("x" * 70000)                                            # too large: refused here
        except ValueError:
            pass
        w.send({"after": "garbage"})
    elif path == "/send":
        pyfork.worker.current().send({"from": pyfork.worker.current().id})
    body = json.dumps({"pid": os.getpid(), "id": pyfork.worker.current().id, "last": _last.get("msg")}).encode()
    sock.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))

app.pyfork_interface = "raw"
'''

# The asyncio interface, whose /block stalls the worker's event loop in a blocking call: an
# asyncio worker is sent up to its capacity (100) at once, so connections sent to it meanwhile
# stay unread in its channel (a sync worker is sent none while it runs a request).
LOOP_APP = r'''
import json, os, time
import pyfork.worker

async def app(reader, writer):
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except Exception:
        writer.close()
        return
    if data.split(b" ", 2)[1] == b"/block":
        with open("blocked.pid", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)          # blocks the event loop: nothing more is taken from the channel
    body = json.dumps({"pid": os.getpid(), "id": pyfork.worker.current().id}).encode()
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    writer.close()

app.pyfork_interface = "asyncio"
'''

# Imports fine in the primary (which only checks it), raises in every worker.
BAD_IN_WORKER_APP = r'''
import pyfork.worker
if pyfork.worker.current() is not None:
    raise RuntimeError("boom: this app fails to import inside a worker")
from app import app
'''

MARKER_APP = r'''
import os
import pyfork.worker
if pyfork.worker.current() is not None:
    open("forked.marker", "a").write("%d\n" % os.getpid())
from app import app
'''


def write_apps(tmp_path):
    (tmp_path / "app.py").write_text(RAW_APP)
    (tmp_path / "badapp.py").write_text(BAD_IN_WORKER_APP)
    (tmp_path / "markapp.py").write_text(MARKER_APP)
    (tmp_path / "loopapp.py").write_text(LOOP_APP)


def matches(rec, fields):
    """True when every field of `fields` equals rec's (a callable value is a predicate)."""
    for k, want in fields.items():
        got = rec.get(k)
        if callable(want):
            if not want(got):
                return False
        elif got != want:
            return False
    return True


class EventReader:
    """Reads JSON-lines event records from an fd (a thread); wait() blocks on a condition."""

    def __init__(self, fd, describe=lambda: ""):
        self.records = []
        self.eof = False
        self._describe = describe
        self._cond = threading.Condition()
        self._file = os.fdopen(fd, "rb")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self._file:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"kind": "unparsable", "line": line.decode(errors="replace")}
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def events(self, kind=None, **fields):
        with self._cond:
            return [r for r in self.records if (kind is None or r["kind"] == kind) and matches(r, fields)]

    def count(self, kind, **fields):
        return len(self.events(kind, **fields))

    def wait(self, kind, n=1, timeout=30.0, **fields):
        """Waits until n records of `kind` match `fields`; returns the n-th."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [r for r in self.records if r["kind"] == kind and matches(r, fields)]
                if len(hits) >= n:
                    return hits[n - 1]
                left = deadline - time.monotonic()
                if left <= 0 or self.eof:
                    kinds = [r["kind"] for r in self.records]
                    raise AssertionError(f"no {n} x {kind} {fields} in events {kinds}\n{self._describe()}")
                self._cond.wait(min(left, 0.5))

    def wait_eof(self, timeout=10.0):
        with self._cond:
            self._cond.wait_for(lambda: self.eof, timeout)

    def close(self):
        self._thread.join(10)
        self._file.close()


def port_of(start_event):
    """The TCP port of the first http:// address in a 'start' event."""
    url = next(u for u in start_event["urls"] if u.startswith("http://"))
    return int(url.rsplit(":", 1)[1])


class Server:
    """`python -m pyfork serve ...` in a subprocess: its events and its stderr followed."""

    def __init__(self, tmp_path, backend_name, *args, app="app:app", env=None, workers=2, argv=None, pass_fds=()):
        self.tmp = tmp_path
        e = dict(os.environ)
        e["PYFORK_BACKEND"] = backend_name
        e.pop("PYFORK_WORKERS", None)
        r, w = os.pipe()
        e["PYFORK_EVENTS"] = f"fd://{w}"
        if env:
            e.update(env)
        if argv is None:
            argv = [sys.executable, "-m", "pyfork", "serve"]
            if app is not None:
                argv.append(app)
            argv += ["-b", "127.0.0.1:0", "--interface", "raw", "-w", str(workers), *args]
        self.lines = []
        self._cond = threading.Condition()
        try:
            self.proc = subprocess.Popen(argv, cwd=str(tmp_path), env=e, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         pass_fds=(w, *pass_fds), start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)       # the child has its copy: EOF once the primary is gone
        self.ev = EventReader(r, describe=lambda: "log:\n" + self.log())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = None

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.lines.append(None)   # EOF marker
            self._cond.notify_all()

    def log(self):
        with self._cond:
            return "\n".join(l for l in self.lines if l is not None)

    # ---- events (the public surface the tests observe) -----------------------------
    def wait_event(self, kind, n=1, timeout=30.0, **fields):
        """Waits for the n-th event of `kind` whose fields match; returns it (a dict)."""
        return self.ev.wait(kind, n, timeout, **fields)

    def events(self, kind=None, **fields):
        return self.ev.events(kind, **fields)

    def count_events(self, kind, **fields):
        return self.ev.count(kind, **fields)

    def start(self, ready=None, timeout=30.0):
        self.started = self.wait_event("start", timeout=timeout)
        self.port = port_of(self.started)
        self.wait_event("ready", n=ready if ready is not None else 1, timeout=timeout)
        return self

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=60.0):
        code = self.proc.wait(timeout)
        self._reader.join(10)
        self.ev.wait_eof(10)      # every record the primary wrote has been read
        return code

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._reader.join(10)
        self.proc.stderr.close()
        self.ev.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def http_get(port, path="/", timeout=20.0, host="127.0.0.1"):
    """GET with Connection: close; returns (status, body bytes). Raises OSError on failure."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError("empty response")
    head, _, body = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def pid_of(port, path="/"):
    import json
    status, body = http_get(port, path)
    assert status == 200, (status, body)
    return json.loads(body)["pid"]


def serving_pids(port, requests=4):
    """The set of worker pids that answered `requests` fresh requests (round robin over them)."""
    return {pid_of(port) for _ in range(requests)}


def alive(pid):
    """True when pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def wait_until(pred, timeout=30.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class Load:
    """Client threads sending GET / (Connection: close) in a loop; counts ok and failed."""

    def __init__(self, port, threads=2, path="/"):
        self.port, self.path = port, path
        self.ok = 0
        self.failed = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def fetch(self):
        """One request: (status, response headers or None). Subclasses send it elsewhere."""
        status, _ = http_get(self.port, self.path, timeout=30)
        return status, None

    def answered(self, headers) -> None:
        """Called (under the lock) for each 200; subclasses count more about it."""

    def _run(self):
        while not self._stop.is_set():
            try:
                status, headers = self.fetch()
                err = None if status == 200 else f"status {status}"
            except OSError as e:
                err, headers = repr(e), None
            with self._lock:
                if err is None:
                    self.ok += 1
                    self.answered(headers)
                else:
                    self.failed.append(err)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)
