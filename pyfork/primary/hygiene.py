"""Process hygiene: pid file, user/group, umask, chdir, process titles.

Theory of operation. Everything that can fail is checked before the first fork:
``resolve_ids`` turns --user/--group into numbers when the options are validated
(an unknown name, or a non-root primary asked to switch, is a one-line error, exit 2);
``PidFile.create`` runs after binding and refuses to start when the file names a live
pyfork. The umask and the working directory are set by the primary before it binds
and imports the app (a unix: socket is created under the umask, the app is imported
from the new directory).

Privileges are dropped in each worker, right after fork and before any user code (the
post_fork hook, the app import), with ``drop_privileges``: the worker runs the app, the
part that faces the network. The primary keeps its uid, so that it can remove its pid
file under /run, keep its control socket and reap and signal workers; it only binds,
forks and supervises (gunicorn does the same: its --user/--group switch the workers).
Changing credentials clears PR_SET_PDEATHSIG (the kernel's commit_creds), so the worker
drops them before it sets that (pyfork.worker.boot).

Process titles: with the optional ``setproctitle`` package installed (``pip install
pyfork[proctitle]``), ``ps`` shows ``pyfork: primary APP`` and ``pyfork: worker N APP``;
without it nothing changes.
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import Optional, Tuple

from pyfork.config import ConfigError


def _lookup_user(user) -> pwd.struct_passwd:
    text = str(user).strip()
    try:
        return pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        raise ConfigError(f"bad --user {user!r}: no such user") from None


def _lookup_gid(group) -> int:
    text = str(group).strip()
    if text.isdigit():
        return int(text)          # a numeric gid need not have a name
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"bad --group {group!r}: no such group") from None


def resolve_ids(user, group) -> Tuple[Optional[int], Optional[int]]:
    """--user/--group -> (uid, gid) for the workers; the gid defaults to the user's primary
    group. ConfigError when unknown, or when a non-root process asks for another identity."""
    uid = gid = None
    if user is not None:
        if str(user).strip().isdigit() and not _has_user(int(str(user).strip())):
            uid, gid = int(str(user).strip()), None
        else:
            pw = _lookup_user(user)
            uid, gid = pw.pw_uid, pw.pw_gid
    if group is not None:
        gid = _lookup_gid(group)
    me = os.geteuid()
    if me != 0 and ((uid is not None and uid != me) or (gid is not None and gid != os.getegid())):
        what = "--user" if uid is not None and uid != me else "--group"
        raise ConfigError(f"{what} needs root: this process runs as uid {me}")
    if uid is not None and gid is None:
        gid = os.getegid() if uid == me else uid    # a bare numeric uid: its own number as gid
    return uid, gid


def _has_user(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def drop_privileges(uid: Optional[int], gid: Optional[int]) -> None:
    """In a worker: become gid/uid (supplementary groups: the user's, or just gid).
    Raises OSError; the worker then exits before READY and the primary reports it."""
    if gid is not None and os.getegid() != gid or uid is not None and os.geteuid() != uid:
        groups = [gid] if gid is not None else []
        if uid is not None and _has_user(uid):
            name = pwd.getpwuid(uid).pw_name
            groups = os.getgrouplist(name, gid if gid is not None else pwd.getpwuid(uid).pw_gid)
        if os.geteuid() == 0:
            os.setgroups(groups)
        if gid is not None:
            os.setresgid(gid, gid, gid)
        if uid is not None:
            os.setresuid(uid, uid, uid)


def set_umask(mask: Optional[int]) -> None:
    if mask is not None:
        os.umask(mask)


def set_title(title: str) -> bool:
    """Sets the process title when setproctitle is installed; False otherwise."""
    try:
        import setproctitle
    except ImportError:
        return False
    setproctitle.setproctitle(title)
    return True


def _is_pyfork(pid: int) -> bool:
    """A live process whose command line mentions pyfork (not a recycled pid of something else)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != b"Z" and b"pyfork" in cmd


class PidFileError(Exception):
    """The pid file cannot be written, or a live pyfork holds it (one-line message)."""


class PidFile:
    """``--pid-file``: our pid, written after binding, removed at exit (only if still ours)."""

    def __init__(self, path: str):
        self.path = path
        self.pid: Optional[int] = None

    def create(self) -> None:
        try:
            with open(self.path) as f:
                old = int(f.read().strip() or "0")
        except FileNotFoundError:
            old = 0
        except (OSError, ValueError):
            old = 0                  # unreadable or garbage: a stale file, overwritten below
        if old and old != os.getpid() and _is_pyfork(old):
            raise PidFileError(f"pid file {self.path} is held by a running pyfork (pid {old})")
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)      # readers never see a half-written file
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise PidFileError(f"cannot write pid file {self.path}: {e.strerror}") from None
        self.pid = os.getpid()

    def remove(self) -> None:
        """Removes the file if it still holds our pid (a successor may have taken it)."""
        if self.pid is None or self.pid != os.getpid():
            return                           # not ours, or called in a forked child
        try:
            with open(self.path) as f:
                if f.read().strip() != str(self.pid):
                    return
            os.unlink(self.path)
        except OSError:
            pass                             # gone already, or not ours to remove any more
        self.pid = None
