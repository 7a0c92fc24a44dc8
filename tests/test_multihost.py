"""More than one machine: two pyfork hosts behind a real HAProxy (PROXY v2, health checks) and
behind a real nginx (X-Forwarded-For), sharing one real Redis.

The hosts are two loopback addresses, 127.0.0.2 and 127.0.0.3, on the same port: each is a
whole `pyfork serve` (primary and workers, its own process group). The balancers' configs are
rendered from examples/deploy/*.template, the files the README tells users to start from.
Clients connect from 127.0.0.9 so that the address the app reports can only be the client's,
never the balancer's (127.0.0.1).

Shown: the app sees the client's own address; /good-counter (the demo's Redis INCR) gives
each of 1,000 concurrent increments a distinct value across both hosts; a rolling restart
(HUP) of each host in turn under load through HAProxy fails no request, and so does stopping
and starting each host in turn (TERM: --health-path answers 503 for --drain-delay seconds, so
HAProxy's health check takes the host out before its listeners close); a SIGKILL of one
whole host loses at most the requests in flight on it and HAProxy's health check takes it out.

haproxy and nginx come from Debian (apt-get install -y haproxy nginx). Missing, these tests
skip, or fail when PYFORK_REQUIRE_BALANCERS=1 (CI sets it: a silent skip there would hide a
missing install step), as PYFORK_REQUIRE_REDIS does for redis-server.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import redis_server as _redis_helper
import supervisor_harness as H
from supervisor_harness import Server, wait_until

redis_server = _redis_helper.redis_server       # module-scoped fixture: a private real redis-server
pytestmark = pytest.mark.usefixtures("fd_guard")

REQUIRE_ENV = "PYFORK_REQUIRE_BALANCERS"
HOSTS = ("127.0.0.2", "127.0.0.3")
CLIENT = "127.0.0.9"
DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"
LIVENESS = 60.0

APP = r'''
import json
from pyfork.demo import app as demo

def app(environ, start_response):
    host = environ.get("SERVER_NAME", "")
    if environ.get("PATH_INFO") == "/whoami":
        body = json.dumps({"addr": environ["REMOTE_ADDR"], "scheme": environ["wsgi.url_scheme"],
                           "host": host}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def start(status, headers, exc_info=None):
        return start_response(status, list(headers) + [("X-Pyfork-Host", host)], exc_info)
    return demo(environ, start)
'''


def require(binary):
    path = shutil.which(binary) or next((p for p in (f"/usr/sbin/{binary}", f"/usr/bin/{binary}")
                                         if os.access(p, os.X_OK)), None)
    if path:
        return path
    reason = f"{binary} not found (install it: apt-get install -y {binary})"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_ENV}=1 makes this a failure")
    pytest.skip(reason)


def _backend():
    env = (os.environ.get("PYFORK_BACKEND") or "auto").lower()
    return "python" if env == "python" else ("c" if env == "c" else "auto")


def shared_port():
    """A port free on both host addresses (and on 127.0.0.1 for a balancer's front)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOSTS[0], 0))
            port = s.getsockname()[1]
        try:
            for host in HOSTS[1:] + ("127.0.0.1",):
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every host address")


def render(template, dest, **values):
    text = string.Template((DEPLOY / template).read_text()).substitute(**values)
    dest.write_text(text)
    return dest


# ---- the rig --------------------------------------------------------------------------------
class Host:
    """One pyfork host: `pyfork serve` on HOST:PORT in its own process group."""

    def __init__(self, tmp, addr, port, redis_url, *extra):
        self.tmp, self.addr, self.port, self.redis_url, self.extra = tmp, addr, port, redis_url, extra
        self.server = None

    def start(self):
        argv = [sys.executable, "-m", "pyfork", "serve", "hostapp:app", "-b", f"{self.addr}:{self.port}",
                "--interface", "wsgi", "-w", "2", "--graceful-timeout", "20", *self.extra]
        self.server = Server(self.tmp, _backend(), argv=argv, env={"REDIS_URL": self.redis_url})
        self.server.start(ready=2)
        return self

    def kill_whole_host(self):
        """SIGKILL to the primary and every worker (the host's process group)."""
        os.killpg(self.server.proc.pid, signal.SIGKILL)
        self.server.proc.wait(LIVENESS)

    def close(self):
        if self.server is not None:
            if self.server.proc.poll() is None:
                self.server.signal(signal.SIGTERM)
                try:
                    self.server.proc.wait(LIVENESS)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.server.proc.pid, signal.SIGKILL)     # any worker left behind
            except (ProcessLookupError, PermissionError):
                pass
            self.server.close()


class Balancer:
    """A haproxy or nginx process in the foreground, configured from examples/deploy/."""

    def __init__(self, argv, run_dir, front_port):
        self.run_dir, self.port = run_dir, front_port
        self.log = open(run_dir / "balancer.out", "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(20)
        self.log.close()

    def output(self):
        return (self.run_dir / "balancer.out").read_text(errors="replace")[-3000:]


def get(port, path, source=CLIENT, timeout=30.0):
    """GET through the balancer from `source`: (status, headers dict, body bytes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def wait_serving(port, hosts=HOSTS):
    """Until requests through the balancer reach every one of `hosts`."""
    seen = set()

    def both():
        try:
            status, headers, _ = get(port, "/health")
        except OSError:
            return False
        if status == 200:
            seen.add(headers.get("x-pyfork-host"))
        return seen >= set(hosts)
    wait_until(both, timeout=LIVENESS, what=f"the balancer on {port} reaching {hosts}")


class Rig:
    def __init__(self, hosts, balancer):
        self.hosts, self.balancer, self.port = hosts, balancer, balancer.port


def _start_rig(tmp, redis_url, kind):
    port = shared_port()
    front = shared_port()
    (tmp / "hostapp.py").write_text(APP)
    run_dir = tmp / kind
    run_dir.mkdir()
    extra = ("--proxy-protocol", "--health-path", "/healthz", "--drain-delay", "2") if kind == "haproxy" else ()
    hosts = []
    balancer = None
    try:
        for addr in HOSTS:
            hosts.append(Host(tmp, addr, port, redis_url, *extra).start())
        values = dict(RUN_DIR=str(run_dir), FRONT=f"127.0.0.1:{front}", HOST1=f"{HOSTS[0]}:{port}",
                      HOST2=f"{HOSTS[1]}:{port}")
        if kind == "haproxy":
            conf = render("haproxy.cfg.template", run_dir / "haproxy.cfg", CHECK_INTER="200ms", **values)
            balancer = Balancer([require("haproxy"), "-db", "-f", str(conf)], run_dir, front)
        else:
            user = "user root;" if os.geteuid() == 0 else ""
            conf = render("nginx.conf.template", run_dir / "nginx.conf", USER_LINE=user, **values)
            balancer = Balancer([require("nginx"), "-p", str(run_dir), "-e", str(run_dir / "error.log"),
                                 "-c", str(conf)], run_dir, front)
        try:
            wait_serving(front)
        except AssertionError:
            raise AssertionError(f"{kind} did not serve:\n{balancer.output()}") from None
        return Rig(hosts, balancer)
    except BaseException:
        if balancer is not None:
            balancer.close()
        for h in hosts:
            h.close()
        raise


@pytest.fixture(scope="module")
def haproxy(redis_server, tmp_path_factory):
    require("haproxy")
    rig = _start_rig(tmp_path_factory.mktemp("haproxy"), redis_server.url, "haproxy")
    yield rig
    rig.balancer.close()
    for h in rig.hosts:
        h.close()


@pytest.fixture(scope="module")
def nginx(redis_server, tmp_path_factory):
    require("nginx")
    rig = _start_rig(tmp_path_factory.mktemp("nginx"), redis_server.url, "nginx")
    yield rig
    rig.balancer.close()
    for h in rig.hosts:
        h.close()


def haproxy_status(rig):
    """{server name: status} from HAProxy's admin socket (`show stat`)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(rig.balancer.run_dir / "haproxy.sock"))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    cols = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(cols, line.split(",")))
        if row.get("pxname") == "pyfork" and row.get("svname", "").startswith("host"):
            out[row["svname"]] = row["status"]
    return out


class Load(H.Load):
    """`threads` clients sending GET `path` through the balancer in a loop, each with at
    most one request in flight; counts the answers, per host, and the failures."""

    def __init__(self, port, threads=4, path="/"):
        super().__init__(port, threads, path)
        self.by_host = {}
        self.in_flight = threads

    def fetch(self):
        status, headers, _ = get(self.port, self.path)
        return status, headers

    def answered(self, headers) -> None:
        host = headers.get("x-pyfork-host")
        self.by_host[host] = self.by_host.get(host, 0) + 1

    def wait_for(self, n):
        start = self.ok
        wait_until(lambda: self.ok >= start + n, timeout=LIVENESS, what=f"{n} more answers")


# ---- the tests ------------------------------------------------------------------------------
def test_haproxy_app_sees_the_client_address(haproxy):
    hosts = set()
    for _ in range(6):
        status, _, body = get(haproxy.port, "/whoami")
        assert status == 200
        got = json.loads(body)
        assert got["addr"] == CLIENT, got           # not HAProxy's 127.0.0.1
        hosts.add(got["host"])
    assert hosts == set(HOSTS)


def test_nginx_app_sees_the_client_address(nginx):
    hosts = set()
    for _ in range(6):
        status, _, body = get(nginx.port, "/whoami")
        assert status == 200
        got = json.loads(body)
        assert got["addr"] == CLIENT, got           # X-Forwarded-For from a trusted nginx
        assert got["scheme"] == "http"
        hosts.add(got["host"])
    assert hosts == set(HOSTS)


@pytest.mark.parametrize("balancer", ["haproxy", "nginx"])
def test_counter_is_exact_across_hosts(balancer, request):
    rig = request.getfixturevalue(balancer)

    def incr(_):
        status, headers, body = get(rig.port, "/good-counter")
        assert status == 200, body
        return json.loads(body)["globalVisitCount"], headers.get("x-pyfork-host")

    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(incr, range(1000)))
    values = sorted(v for v, _ in results)
    assert len(set(values)) == 1000, "a value was handed out twice"
    assert values == list(range(values[0], values[0] + 1000)), "the values are not consecutive"
    served = {h for _, h in results}
    assert served == set(HOSTS), served


def test_rolling_restart_host_by_host_fails_nothing(haproxy):
    with Load(haproxy.port, threads=4) as load:
        load.wait_for(50)
        for host in haproxy.hosts:
            srv = host.server
            before = srv.count_events("ready")
            srv.signal(signal.SIGHUP)
            srv.wait_event("ready", n=before + 2, timeout=LIVENESS)   # both workers replaced
            load.wait_for(50)
    assert load.failed == [], load.failed[:5]
    assert set(load.by_host) == set(HOSTS)
    print(f"\nrolling restart through HAProxy: {load.ok} requests, {len(load.failed)} failed")


def test_stopping_and_starting_host_by_host_fails_nothing(haproxy):
    with Load(haproxy.port, threads=4) as load:
        load.wait_for(50)
        for i, host in enumerate(haproxy.hosts):
            name = f"host{i + 1}"
            host.server.signal(signal.SIGTERM)
            wait_until(lambda: haproxy_status(haproxy).get(name, "").startswith("DOWN"),
                       timeout=LIVENESS, what=f"HAProxy taking {name} out")
            assert host.server.wait(LIVENESS) == 0
            host.server.close()
            host.start()
            wait_until(lambda: haproxy_status(haproxy).get(name) == "UP",
                       timeout=LIVENESS, what=f"HAProxy taking {name} back")
            load.wait_for(50)
    assert load.failed == [], load.failed[:5]
    assert set(load.by_host) == set(HOSTS)
    print(f"\nstop/start host by host through HAProxy: {load.ok} requests, {len(load.failed)} failed")


def test_killing_a_whole_host_costs_at_most_its_requests_in_flight(haproxy):
    victim, survivor = haproxy.hosts
    with Load(haproxy.port, threads=4) as load:
        load.wait_for(50)
        victim.kill_whole_host()
        wait_until(lambda: haproxy_status(haproxy).get("host1", "").startswith("DOWN"),
                   timeout=LIVENESS, what="HAProxy's health check taking host1 out")
        failed_at_down = len(load.failed)
        load.wait_for(100)
    # Each client has at most one request in flight: that bounds what the dead host held.
    assert len(load.failed) <= load.in_flight, load.failed
    assert len(load.failed) == failed_at_down, "requests failed after the host was taken out"
    status, headers, _ = get(haproxy.port, "/health")
    assert status == 200 and headers["x-pyfork-host"] == survivor.addr
    print(f"\nSIGKILL of one host under load: {load.ok} requests, {len(load.failed)} failed")
