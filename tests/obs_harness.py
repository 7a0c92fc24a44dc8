"""Helpers (no tests here) for the observability tests: test apps (WSGI and ASGI) that
say which worker answered and can hang, a client that sends chosen headers, and a
/metrics scraper that parses with prometheus_client.parser."""
import json
import socket
import urllib.request

WSGI_APP = r'''
import json, os, time

def stuck_in_this_function():
    time.sleep(3600)

def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/stuck":
        stuck_in_this_function()
    if path == "/sleep":                   # /sleep?ms=N: answers after N ms
        time.sleep(int(environ["QUERY_STRING"].partition("ms=")[2] or 0) / 1000)
    body = json.dumps({"pid": os.getpid(), "q": environ.get("QUERY_STRING", "")}).encode()
    status = "404 Not Found" if path.startswith("/missing") else "200 OK"
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("X-Test", "yes")])
    return [body]
'''

ASGI_APP = r'''
import json, os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif m["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"pid": os.getpid(), "q": scope["query_string"].decode()}).encode()
    status = 404 if scope["path"].startswith("/missing") else 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-test", b"yes")]})
    await send({"type": "http.response.body", "body": body})
'''


def write_apps(tmp_path):
    (tmp_path / "wapp.py").write_text(WSGI_APP)
    (tmp_path / "aapp.py").write_text(ASGI_APP)


def request(port, target="/", headers=(), timeout=30.0):
    """HTTP/1.1 GET with Connection: close and extra `headers`; returns (status, body)."""
    lines = [f"GET {target} HTTP/1.1", "Host: t", "Connection: close", *(f"{k}: {v}" for k, v in headers)]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def pid_of(port, target="/"):
    status, body = request(port, target)
    assert status == 200, (status, body)
    return json.loads(body)["pid"]


def scrape(url):
    """{(name, labels...): value} of every sample, parsed by prometheus_client.parser."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples, name):
    return sum(v for (n, _), v in samples.items() if n == name)


def by_label(samples, name, label):
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}
