"""The command line: ``pyfork --version``, ``pyfork serve``, ``pyfork status``.

Theory of operation: options come from pyfork/config.py's table (command
line > PYFORK_<NAME> environment variable > default). Every check that can
fail -- option values, the backend, the app import, interface detection,
binding every address, the control socket -- runs before the first fork, and
a failure is one line on stderr and exit code 2. Then ``Cluster.run()`` owns
the process until it returns the exit code (0 stopped, 3 every slot gave up).
The CLI holds no logic the Python API lacks: it builds a pyfork.Cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import List, Optional

import pyfork
from pyfork import config

PROG = "pyfork"
from pyfork.logfmt import TEXT_FORMAT as LOG_FORMAT  # noqa: E402,F401 - kept for importers


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but every error is one line and exit code 2 (no usage dump)."""

    def error(self, message):
        raise UsageError(message)


def _version() -> str:
    try:
        import pyfork.backend
        name = pyfork.backend.name()
    except (ImportError, ValueError) as e:
        name = f"unavailable: {str(e).splitlines()[0]}"
    return f"{PROG} {pyfork.__version__} (backend: {name})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Node's cluster model for Python: one primary, forked workers.")
    p.add_argument("--version", action="store_true", help="print the version and the backend, then exit")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    s = sub.add_parser("serve", help="serve an app on every core",
                       description="Serve a WSGI, ASGI, raw or asyncio app with forked workers. "
                                   "Every option also reads PYFORK_<NAME> from the environment. "
                                   "The primary imports APP once to check it (an error exits with code 2 "
                                   "before any fork); every worker imports it again after fork, so SIGHUP "
                                   "(rolling restart) runs the code now on disk. Signals: TERM/INT graceful "
                                   "stop, QUIT immediate stop, HUP rolling restart, TTIN/TTOU one worker "
                                   "more/less, USR1 reopen log files. Exit codes: 0 stopped, 2 usage or startup error, 3 every "
                                   "worker slot gave up (failed to boot --max-restarts times in a row).")
    for opt in config.OPTIONS:
        env = f" [env {opt.env}]"
        if not opt.flags:
            s.add_argument(opt.name, nargs="?", default=None, metavar=opt.metavar, help=opt.help + env)
        elif opt.repeat:
            s.add_argument(*opt.flags, dest=opt.name, action="append", default=None, metavar=opt.metavar,
                           help=opt.help + env)
        else:
            s.add_argument(*opt.flags, dest=opt.name, default=None, metavar=opt.metavar, help=opt.help + env)
    st = sub.add_parser("status", help="show the workers of a running primary",
                        description="One row per worker: id, pid, state, uptime, handled, restarts.")
    st.add_argument("--control", default=None, metavar="PATH", help="control socket [env PYFORK_CONTROL]")
    st.add_argument("--json", action="store_true", help="print the raw JSON reply")
    return p


def _fail(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def settings_from(args, environ=None) -> config.Settings:
    """Command line > environment > default -> validated Settings (ConfigError)."""
    values = config.from_env(environ)
    for opt in config.OPTIONS:
        raw = getattr(args, opt.name, None)
        if raw is None:
            continue
        try:
            values[opt.name] = [opt.kind(r) for r in raw] if opt.repeat else opt.kind(raw)
        except config.ConfigError as e:
            flag = opt.flags[-1] if opt.flags else "APP"
            raise config.ConfigError(f"bad {flag}: {e}") from None
    return config.validate(**values)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    from pyfork.logfmt import setup_logging as setup
    setup(level, fmt)


def cmd_serve(args) -> int:
    try:
        s = settings_from(args)
    except config.ConfigError as e:
        return _fail(str(e))
    setup_logging(s.log_level, s.log_format)
    from pyfork.cluster import Cluster, StartupError
    cluster = Cluster(s.app, bind=s.bind, workers=s.workers, policy=s.policy, backend=s.backend,
                      interface=s.interface, graceful_timeout=s.graceful_timeout, timeout=s.timeout,
                      min_uptime=s.min_uptime, max_restarts=s.max_restarts, give_up_cooldown=s.give_up_cooldown,
                      max_requests=s.max_requests, max_requests_jitter=s.max_requests_jitter, control=s.control,
                      metrics=s.metrics, access_log=s.access_log, access_log_format=s.access_log_format)
    try:
        cluster.prepare()
    except StartupError as e:
        return _fail(str(e))
    return cluster.run()


def _fmt_uptime(sec: float) -> str:
    sec = int(sec)
    if sec < 120:
        return f"{sec}s"
    if sec < 7200:
        return f"{sec // 60}m{sec % 60:02d}s"
    return f"{sec // 3600}h{(sec % 3600) // 60:02d}m"


def cmd_status(args) -> int:
    path = args.control or os.environ.get(config.ENV_PREFIX + "CONTROL")
    if not path:
        return _fail("status needs --control PATH (or PYFORK_CONTROL)")
    from pyfork.primary import control
    try:
        reply = control.request(path, {"cmd": "status"})
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: cannot query {path}: {e}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"{PROG}: error: {reply.get('error', 'request refused')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0
    print(f"primary pid {reply['pid']}  policy {reply['policy']}  backend {reply['backend']}  "
          f"workers {len(reply['workers'])}/{reply['workers_wanted']}"
          + ("  STOPPING" if reply.get("stopping") else "") + ("  RELOADING" if reply.get("reloading") else ""))
    cols = ("id", "pid", "state", "uptime", "handled", "restarts")
    rows = [[str(w["id"]), str(w["pid"]), w["state"], _fmt_uptime(w["uptime"]), str(w["handled"]),
             str(w["restarts"])] for w in reply["workers"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    gave_up = [s["slot"] for s in reply.get("slots", []) if s["state"] == "gave_up"]
    if gave_up:
        print(f"slots that gave up: {', '.join(map(str, gave_up))}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        return _fail(str(e))
    if args.version:
        print(_version())
        return 0
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "status":
        return cmd_status(args)
    return _fail("expected a command: serve or status (see pyfork --help)")


def entry() -> None:
    sys.exit(main())
