"""TLS in the worker: the server's SSLContext, and a non-blocking socket for the WSGI loop.

Theory of operation. The TLS options (--certfile, --keyfile, --ca-certs, --ssl-ciphers,
--cert-reqs) are checked by pyfork/config.py before any fork: `check()` builds a context once
from the files, so a missing file, a key that does not match its certificate or a cipher
string OpenSSL rejects is one line and exit code 2. The primary never handshakes: it hands
the accepted TCP socket over as it does for plain HTTP. Each worker builds its own context
from the same files when it starts serving (`server_context`), so a rolling restart (HUP)
picks up a renewed certificate, and a worker that cannot read it fails to boot (the reload
is aborted and the old workers keep serving).

The ASGI and asyncio interfaces give the context to the event loop
(connect_accepted_socket(ssl=...)), which runs the handshake and the records; the raw
interface, one blocking connection at a time, handshakes before calling its handler
(`handshake_blocking`). The WSGI interface is one selectors loop per
worker: a connection is wrapped with `wrap()` (nothing is sent yet), `handshake_step()` is
called whenever the socket is ready until it reports done, and the socket's recv()/send()
then raise BlockingIOError when TLS wants the socket, as a plain non-blocking socket does.
A handshake that fails (plain HTTP on the TLS port, an untrusted client certificate) raises
ssl.SSLError, an OSError: that connection is closed, nothing else happens.
"""
from __future__ import annotations

import os
import re
import ssl
from typing import NamedTuple, Optional

# --cert-reqs names (pyfork.config checks them, and takes gunicorn's numbers for them too).
CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
# Seconds a client has to complete the handshake (asyncio's default is 60; a real client
# needs one or two round trips, so 10 s only cuts connections that send nothing).
HANDSHAKE_TIMEOUT = 10.0


class TLSConfig(NamedTuple):
    certfile: str
    keyfile: Optional[str] = None       # None: the key is in certfile
    ca_certs: Optional[str] = None      # CA bundle that client certificates must chain to
    ciphers: Optional[str] = None       # OpenSSL cipher string (TLS 1.2 and below)
    cert_reqs: str = "none"             # none | optional | required (client certificates)


class TLSError(ValueError):
    """A TLS option that cannot work; the message is one line for the user."""


def _no_password():
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key.
    raise TLSError("the key is encrypted (pyfork needs an unencrypted key file)")


def build_context(cfg: TLSConfig) -> ssl.SSLContext:
    """The server-side SSLContext for `cfg`; TLSError (one line) when it cannot be built."""
    for flag, path in (("--certfile", cfg.certfile), ("--keyfile", cfg.keyfile), ("--ca-certs", cfg.ca_certs)):
        if path is not None and not os.path.isfile(path):
            raise TLSError(f"bad {flag} {path!r}: no such file")
        if path is not None and not os.access(path, os.R_OK):
            raise TLSError(f"bad {flag} {path!r}: not readable")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_RENEGOTIATION      # a renegotiation would need reads inside send()
    try:
        ctx.load_cert_chain(cfg.certfile, cfg.keyfile, password=_no_password)
    except TLSError:
        raise
    except (ssl.SSLError, OSError, ValueError) as e:
        where = f"--certfile {cfg.certfile!r}" + (f" / --keyfile {cfg.keyfile!r}" if cfg.keyfile else "")
        raise TLSError(f"bad {where}: {_reason(e)}") from None
    if cfg.ca_certs is not None:
        try:
            ctx.load_verify_locations(cafile=cfg.ca_certs)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise TLSError(f"bad --ca-certs {cfg.ca_certs!r}: {_reason(e)}") from None
    if cfg.ciphers is not None:
        try:
            ctx.set_ciphers(cfg.ciphers)
        except ssl.SSLError as e:
            raise TLSError(f"bad --ssl-ciphers {cfg.ciphers!r}: {_reason(e)}") from None
    ctx.verify_mode = CERT_REQS[cfg.cert_reqs]
    ctx.set_alpn_protocols(["http/1.1"])        # pyfork speaks HTTP/1.1; say so to h2 clients
    ctx.sslsocket_class = NonBlockingTLSSocket
    return ctx


def _reason(exc) -> str:
    """One line from an ssl/OS error: OpenSSL's reason without the source location."""
    reason = getattr(exc, "reason", None)
    if reason:
        return reason.lower().replace("_", " ")
    text = getattr(exc, "strerror", None) or (exc.args[-1] if exc.args else "") or type(exc).__name__
    text = re.sub(r"^\[\w+\] | \(_ssl\.c:\d+\)$", "", str(text).splitlines()[0]).rstrip(".")
    if text == "PEM lib":
        # What OpenSSL says when a file is not the PEM object expected, or the key is missing.
        return "not a PEM certificate (--certfile) and private key (--keyfile, or in --certfile)"
    return text


def check(cfg: TLSConfig) -> None:
    """In the primary, before any fork: the context builds (TLSError otherwise)."""
    build_context(cfg)


def server_context(cfg: Optional[TLSConfig]) -> Optional[ssl.SSLContext]:
    """In a worker when it starts serving: the context, or None when TLS is off."""
    return None if cfg is None else build_context(cfg)


def wrap(ctx: ssl.SSLContext, sock):
    """The accepted `sock` as a server-side TLS socket; the handshake is not started (the
    original socket object is detached: the returned one owns the fd)."""
    return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)


def handshake_blocking(ctx: ssl.SSLContext, sock):
    """For the raw interface (one blocking connection at a time): the handshake, within
    HANDSHAKE_TIMEOUT; returns the blocking TLS socket. OSError (ssl.SSLError, a timeout)
    when it failed; the fd is closed then (the original socket object is detached either way)."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    tls_sock = ctx.wrap_socket(sock, server_side=True)
    tls_sock.settimeout(None)
    return tls_sock


WANT_READ, WANT_WRITE = 1, 2


def handshake_step(sock) -> int:
    """Advances the handshake: 0 when done, WANT_READ or WANT_WRITE when it waits for the
    socket. ssl.SSLError (or another OSError) when it failed."""
    try:
        sock.do_handshake()
    except ssl.SSLWantReadError:
        return WANT_READ
    except ssl.SSLWantWriteError:
        return WANT_WRITE
    return 0


class NonBlockingTLSSocket(ssl.SSLSocket):
    """An SSLSocket that reports "try again later" the way a plain non-blocking socket does
    (BlockingIOError), so the WSGI loop's read and write paths are the same for both, and
    that says close_notify when closed (a client reading to EOF then sees a clean end)."""

    def recv(self, bufsize, flags=0):
        try:
            data = super().recv(bufsize, flags)
            # Bytes already decrypted stay in OpenSSL's buffer, where select() cannot see
            # them: take them now.
            while data and len(data) < bufsize and self.pending():
                data += super().recv(min(self.pending(), bufsize - len(data)), flags)
            return data
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def send(self, data, flags=0):
        try:
            return super().send(data, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def close(self):
        if self.fileno() >= 0:
            try:
                # Non-blocking first: unwrap() on a blocking socket would wait for the peer's
                # close_notify, which a client keeping its connection open never sends.
                self.setblocking(False)
                self.unwrap()           # sends close_notify; the peer's is not waited for
            except (OSError, ValueError):
                pass                    # not connected, handshake unfinished, peer gone
        super().close()
