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
CLI_ONLY = ("config", "check_config", "print_config")   # options of the command, not of the Cluster
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
        elif opt.flag:
            s.add_argument(*opt.flags, dest=opt.name, action="store_const", const=True, default=None,
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


def gather(args, environ=None):
    """Command line > environment > config file (-c) > default: (values, ConfigFile or None).
    ConfigError on a bad value anywhere."""
    from pyfork import configfile
    env_values = config.from_env(environ)
    cli_values = {}
    for opt in config.OPTIONS:
        raw = getattr(args, opt.name, None)
        if raw is None:
            continue
        try:
            cli_values[opt.name] = [opt.kind(r) for r in raw] if opt.repeat else opt.kind(raw)
        except config.ConfigError as e:
            flag = opt.flags[-1] if opt.flags else "APP"
            raise config.ConfigError(f"bad {flag}: {e}") from None
    values, cf = {}, None
    path = cli_values.get("config") or env_values.get("config")
    if path:
        cf = configfile.load(path)
        for name, value in cf.values.items():
            try:
                values[name] = configfile.parse_value(name, value)
            except config.ConfigError as e:
                raise config.ConfigError(f"config file {path}: {e}") from None
    values.update(env_values)
    values.update(cli_values)
    return values, cf


def _settings(values: dict) -> config.Settings:
    values = {k: v for k, v in values.items() if k not in CLI_ONLY}
    try:
        return config.validate(**values)
    except config.ConfigError:
        raise
    except (TypeError, ValueError) as e:     # a config file value of the wrong type
        raise config.ConfigError(str(e).splitlines()[0]) from None


def settings_from(args, environ=None) -> config.Settings:
    """Command line > environment > config file > default -> validated Settings (ConfigError)."""
    values, _ = gather(args, environ)
    return _settings(values)


def print_config(s: config.Settings, cf) -> None:
    """The effective settings as a config file would write them (it can be pasted into one)."""
    for opt in config.OPTIONS:
        if opt.name in CLI_ONLY:
            continue
        value = getattr(s, opt.name, None)
        if opt.name == "bind":
            value = [b.text for b in value]
        text = f"0o{value:03o}" if opt.name == "umask" and value is not None else repr(value)
        print(f"{opt.name} = {text}")
    if cf is not None:
        print(f"# config file: {cf.path}")
        from pyfork.configfile import HOOKS
        print(f"# hooks: {', '.join(n for n in HOOKS if n in cf.hooks) or 'none'}")


def check_config(s: config.Settings, cf) -> int:
    """--check-config: the backend loads and the app imports; nothing bound or forked."""
    from pyfork import applib
    try:
        import pyfork.backend
        pyfork.backend.load(s.backend)
        applib.check_app(s.app, s.interface)
    except (ImportError, ValueError, applib.AppImportError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    where = f" from {cf.path}" if cf is not None else ""
    print(f"{PROG}: config OK{where}: app {s.app}, {s.workers} workers, bind "
          f"{', '.join(b.text for b in s.bind)}")
    return 0


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    from pyfork.logfmt import setup_logging as setup
    setup(level, fmt)


def cmd_serve(args) -> int:
    from pyfork.primary import systemd
    try:
        values, cf = gather(args)
        activated = [] if values.get("check_config") else systemd.listen_fds()
        if activated:
            # socket activation: serve on systemd's sockets instead of the default address
            values["bind"] = [f"fd://{fd}" for fd, _ in activated] + list(values.get("bind") or [])
        s = _settings(values)
    except (config.ConfigError, ValueError) as e:
        return _fail(str(e))
    if values.get("print_config"):
        print_config(s, cf)
        return 0
    if values.get("check_config"):
        return check_config(s, cf)
    setup_logging(s.log_level, s.log_format)
    if activated:
        logging.getLogger("pyfork.systemd").info(
            "socket activation: %s", ", ".join(f"fd {fd} ({name})" for fd, name in activated))
    from pyfork.cluster import Cluster, StartupError
    cluster = Cluster(s.app, bind=s.bind, workers=s.workers, policy=s.policy, backend=s.backend,
                      interface=s.interface, graceful_timeout=s.graceful_timeout, timeout=s.timeout,
                      min_uptime=s.min_uptime, max_restarts=s.max_restarts, give_up_cooldown=s.give_up_cooldown,
                      max_requests=s.max_requests, max_requests_jitter=s.max_requests_jitter, control=s.control,
                      max_worker_memory=s.max_worker_memory, max_worker_lifetime=s.max_worker_lifetime,
                      max_worker_lifetime_jitter=s.max_worker_lifetime_jitter, pid_file=s.pid_file,
                      user=s.user, group=s.group, umask=s.umask, chdir=s.chdir,
                      hooks=cf.hooks if cf is not None else None,
                      metrics=s.metrics, access_log=s.access_log, access_log_format=s.access_log_format,
                      limit_concurrency=s.limit_concurrency, backlog=s.backlog, keep_alive=s.keep_alive,
                      proxy_protocol=s.proxy_protocol, proxy_allow_from=s.proxy_allow_from,
                      proxy_timeout=s.proxy_timeout, forwarded_allow_ips=s.forwarded_allow_ips,
                      health_path=s.health_path, drain_delay=s.drain_delay,
                      certfile=s.certfile, keyfile=s.keyfile, ca_certs=s.ca_certs, ssl_ciphers=s.ssl_ciphers,
                      cert_reqs=s.cert_reqs)
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
    limits = reply.get("limits")
    if limits:
        print(_limits_line(limits, reply.get("totals", {}).get("limit_concurrency_rejections", 0)))
    gave_up = [s["slot"] for s in reply.get("slots", []) if s["state"] == "gave_up"]
    if gave_up:
        print(f"slots that gave up: {', '.join(map(str, gave_up))}")
    return 0


def _limits_line(limits: dict, rejections: int) -> str:
    lc = limits.get("limit_concurrency") or 0
    ka = limits.get("keep_alive", 0)
    nofile = limits.get("nofile") or {}
    return (f"limits: concurrency {lc if lc else 'off'} per worker ({rejections} rejected)  "
            f"backlog {limits.get('backlog')}  keep-alive {f'{ka:g}s' if ka else 'off'}  "
            f"open files {nofile.get('soft', '?')}")


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
