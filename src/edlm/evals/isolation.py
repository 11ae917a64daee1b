"""Isolation of generated code from the machine: Linux namespaces or bubblewrap, chosen by probing once per process.

Threat model. The programs are written by a model and may do anything their user can: by accident (a test that
deletes a folder) or, if the model was trained or prompted adversarially, on purpose. Confined, a program

- writes only its own folder (``program.py``, ``status``, ``work/``) and a private, empty ``/tmp`` (64 MiB);
  every other mount is read-only, the host's ``/tmp`` and ``/run`` are hidden and ``/dev`` holds only ``null``,
  ``zero``, ``full``, ``random``, ``urandom`` and ``tty``;
- reaches no network: its network namespace has only a loopback that is down, so even ``127.0.0.1`` and name
  servers are unreachable (abstract Unix sockets are per network namespace too);
- sees only its own processes (a pid namespace with a fresh ``/proc``), so it can signal, trace or read the
  ``/proc`` entries of no other process, and everything it started dies with it;
- holds no capability and cannot gain one (bounding set emptied, ``no_new_privs``): as root it cannot remount,
  unmount or change the network, and set-uid programs do not raise it.

Not covered: a program can still *read* every file its user can read outside the hidden folders (as root, root's
files), it keeps its user id (root stays uid 0 without capabilities, so Unix sockets that check only the peer's uid
and live outside ``/run`` and ``/tmp`` stay reachable), it shares the kernel (a kernel exploit escapes), and it
can waste what the resource limits of :mod:`edlm.evals.sandbox` allow. What it reads has no way out except its
own output: the last line of stderr lands in the results as ``detail``.

Backends:

- ``namespaces``: ``unshare(2)`` through ctypes (Python 3.11 has no ``os.unshare``), no outside tool. As root the
  namespaces belong to the host's user namespace and the capabilities are dropped before the program starts; as
  another user they belong to a new user namespace whose root is that user (which is what lets an unprivileged user
  mount; the program sees uid 0, without capabilities, and is the user outside). Popen's child makes the namespaces
  and mounts, then execs :mod:`edlm.evals.isolation_init`, a small script that starts the program as the second
  process of the new pid namespace (the first reaps orphans and reports the exit status)::

      eval process
      └── P  Popen's child: unshare(mount, net, ipc, pid [, user]); mounts (below); chdir; limits;
          │  exec isolation_init, which forks G and exits the way the program did (code or signal)
          └── G  pid 1: mounts /proc, drops every capability, forks H, reaps; its exit kills what is left
              └── H  exec the program

  The mount namespace, built by P in this order so that the run's folder stays reachable when it lives under /tmp::

      /                   every mount bind-remounted read-only (each line of /proc/self/mountinfo)
      /tmp                a fresh tmpfs, mode 1777, 64 MiB
      <interpreter>       the folders of ``sys.executable`` and its prefixes that lie under /tmp (a venv made
                          there), bound back in read-only, so the program's Python still starts
      <run folder>        the host's folder bound back in (through a file descriptor opened before), writable
      /dev                a read-only tmpfs with six device nodes bound in
      /run                an empty read-only tmpfs (docker, dbus and systemd sockets)
      /proc               a fresh read-only proc of the pid namespace (G)

- ``bwrap``: the same layout from bubblewrap (``--unshare-all --cap-drop ALL``), used when it is installed and the
  namespaces backend is refused (for example where unprivileged user namespaces are allowed only to bwrap). Its
  loopback is up but private to the sandbox, and its /dev has a private /dev/shm.
- ``none``: no isolation; :mod:`edlm.evals.sandbox` runs code this way only after an explicit opt-in.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edlm.evals.isolation_init import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY, check, libc, mount

logger = logging.getLogger(__name__)

Isolation = Literal["namespaces", "bwrap", "none"]
ISOLATIONS: tuple[Isolation, ...] = ("namespaces", "bwrap", "none")

# <linux/sched.h>, <linux/mount.h>: the flags stage one alone uses (isolation_init has those both use)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER = 0x20000, 0x08000000, 0x10000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 32, 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
_TMP_SIZE = b"64m"
_DEVICES = (b"null", b"zero", b"full", b"random", b"urandom", b"tty")
_DEV_LINKS = ((b"fd", b"/proc/self/fd"), (b"stdin", b"/proc/self/fd/0"), (b"stdout", b"/proc/self/fd/1"),
              (b"stderr", b"/proc/self/fd/2"))
_INIT = Path(__file__).with_name("isolation_init.py")  # its source is passed with -c: a file under /tmp is hidden
_ESCAPE = re.compile(rb"\\([0-7]{3})")  # mountinfo writes space, tab, newline and backslash as \040 ...
# statvfs reports mount flags with its own numbers (ST_RELATIME is 4096, which is MS_BIND)
_ST_TO_MS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
             (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))


# ---------------------------------------------------------------------------------------------------------------
# The namespaces backend: what P does between fork and exec (no fork here: see isolation_init)


@dataclass(frozen=True)
class _Plan:
    """Everything the child needs, computed in the parent."""

    root: bytes
    """The run's folder: bound back in writable."""
    workdir: bytes
    """The program's working directory, inside ``root``."""
    uid: int
    """Effective user id; not 0: P makes a user namespace whose root it is."""
    gid: int
    interpreter: tuple[bytes, ...] = ()
    """The interpreter's folders under /tmp (:func:`interpreter_under_tmp`): bound back in read-only."""


def interpreter_under_tmp() -> tuple[bytes, ...]:
    """The folders this Python needs that lie under /tmp, outermost only: the folder of ``sys.executable`` (and of
    its target) and the prefixes (a venv and the Python it was made from). Covering /tmp would hide them."""
    found = set()
    for path in (sys.executable, os.path.realpath(sys.executable)):
        found.add(os.path.dirname(os.path.dirname(os.path.abspath(path))))  # <prefix>/bin/python -> <prefix>
    found.update(os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix))
    under = sorted(p for p in found if p.startswith("/tmp/") and os.path.isdir(p))
    outermost = [p for p in under if not any(p != q and p.startswith(q + "/") for q in under)]
    return tuple(os.fsencode(p) for p in outermost)


def _write(path: bytes, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mount_points() -> list[bytes]:
    """Every mount point of this mount namespace, parents first (the order of /proc/self/mountinfo)."""
    with open(b"/proc/self/mountinfo", "rb") as f:
        lines = f.read().splitlines()
    return [_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), line.split(b" ")[4]) for line in lines]


def _kept_flags(path: bytes) -> int:
    """The flags a bind remount of the mount at ``path`` must repeat: in a user namespace they are locked, and
    leaving one out is refused. No atime flag means strictatime (a remount would otherwise default to relatime)."""
    st = os.statvfs(path).f_flag
    flags = sum(ms_flag for st_flag, ms_flag in _ST_TO_MS if st & st_flag)  # distinct bits: the sum is their OR
    return flags | (0 if flags & (MS_NOATIME | MS_RELATIME) else MS_STRICTATIME)


def _remount_read_only(path: bytes) -> None:
    try:
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR, errno.ELOOP):
            return  # out of reach: the program, with the same ids and no capability, cannot reach it either
        raise
    if not read_only:
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | _kept_flags(path))


def _build_mounts(plan: _Plan) -> None:
    """P, in the new mount namespace: the layout of the module docstring except /proc."""
    mount(None, b"/", None, MS_REC | MS_PRIVATE)  # nothing done here propagates to the host
    root_fd = os.open(plan.root, os.O_PATH | os.O_DIRECTORY)  # reaches the folder after /tmp is covered
    root_flags = _kept_flags(plan.root)
    devices = {name: os.open(b"/dev/" + name, os.O_PATH) for name in _DEVICES if os.path.exists(b"/dev/" + name)}
    kept = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY), _kept_flags(path)) for path in plan.interpreter]
    for path in _mount_points():
        _remount_read_only(path)
    mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777,size=" + _TMP_SIZE)
    for path, fd, flags in kept:  # before the run's folder, which stays writable even inside one of them
        os.makedirs(path, exist_ok=True)
        mount(b"/proc/self/fd/%d" % fd, path, None, MS_BIND)
        mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        os.close(fd)
    os.makedirs(plan.root, exist_ok=True)  # the mount point, in the new tmpfs when the folder is under /tmp
    mount(b"/proc/self/fd/%d" % root_fd, plan.root, None, MS_BIND)
    mount(None, plan.root, None, MS_REMOUNT | MS_BIND | root_flags)
    mount(b"tmpfs", b"/dev", b"tmpfs", MS_NOSUID | MS_NOEXEC, b"mode=755,size=64k")
    for name, fd in devices.items():
        os.close(os.open(b"/dev/" + name, os.O_CREAT | os.O_WRONLY, 0o644))
        mount(b"/proc/self/fd/%d" % fd, b"/dev/" + name, None, MS_BIND)
    for name, target in _DEV_LINKS:
        os.symlink(target, b"/dev/" + name)
    mount(None, b"/dev", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    if os.path.isdir(b"/run"):
        mount(b"tmpfs", b"/run", b"tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, b"size=4k")
    for fd in (root_fd, *devices.values()):
        os.close(fd)


def _namespaces_preexec(plan: _Plan, before_exec: Callable[[], None] | None) -> Callable[[], None]:
    def child() -> None:  # P
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWPID
        check(libc().unshare(flags | (CLONE_NEWUSER if plan.uid else 0)), "unshare")
        if plan.uid:  # root of the namespace is the user: exec keeps its capabilities there until G drops them
            _write(b"/proc/self/setgroups", b"deny")  # first, as an unprivileged writer of gid_map must
            _write(b"/proc/self/uid_map", b"0 %d 1" % plan.uid)
            _write(b"/proc/self/gid_map", b"0 %d 1" % plan.gid)
        _build_mounts(plan)
        os.chdir(plan.workdir)  # the cwd Popen set is the host's view of the folder, now read-only and covered
        if before_exec is not None:
            before_exec()

    return child


@functools.cache
def _init_args() -> tuple[str, str]:
    """isolation_init's source and CAP_LAST, read once."""
    try:
        cap_last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    except (OSError, ValueError):
        cap_last = 63
    return _INIT.read_text(), str(cap_last)


# ---------------------------------------------------------------------------------------------------------------
# Public interface


def _bwrap_command(bwrap: str, argv: list[str], root: Path, workdir: Path) -> list[str]:
    r = str(root)
    # --remount-ro /proc: otherwise root in bwrap's user namespace may write /proc/sys (core_pattern runs a
    # command as the host's root)
    interpreter = [arg for p in map(os.fsdecode, interpreter_under_tmp()) for arg in ("--ro-bind", p, p)]
    return [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--remount-ro", "/proc",
            "--size", str(64 * 2**20),
            "--tmpfs", "/tmp", *interpreter, "--bind", r, r, "--tmpfs", "/run", "--remount-ro", "/run",
            "--chdir", str(workdir), "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--", *argv]


def confine(isolation: Isolation, argv: list[str], root: Path, workdir: Path,
            before_exec: Callable[[], None] | None = None) -> tuple[list[str], Callable[[], None] | None]:
    """The command line and ``preexec_fn`` that run ``argv`` confined, for :class:`subprocess.Popen`.

    Args:
        isolation: The backend (see :func:`probe`).
        argv: The command, e.g. ``[sys.executable, "-I", "program.py"]``.
        root: The run's folder, the only host folder the program may write; it must not be ``/tmp`` itself.
        workdir: The program's working directory, inside ``root``.
        before_exec: Called in the child just before ``exec`` (resource limits): signal-safe work only.

    Returns:
        ``(command, preexec_fn)``. Popen must also get ``start_new_session=True``, so that killing the process
        group ends every process of the run.
    """
    if isolation == "namespaces":
        libc()  # loaded here, in the parent
        plan = _Plan(os.fsencode(root), os.fsencode(workdir), os.geteuid(), os.getegid(), interpreter_under_tmp())
        init = [sys.executable, "-I", "-S", "-c", *_init_args(), "1" if plan.uid else "0", "--", *argv]
        return init, _namespaces_preexec(plan, before_exec)
    if isolation == "bwrap":
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise FileNotFoundError("bwrap is not installed")
        return _bwrap_command(bwrap, argv, root, workdir), before_exec
    if isolation == "none":
        return argv, before_exec
    raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")


def exit_code(isolation: Isolation, returncode: int) -> int:
    """The program's exit code as Popen would report it unconfined (negative: killed by that signal). bwrap exits
    with 128 + N when the program is killed by signal N."""
    if isolation == "bwrap" and 128 < returncode < 128 + 65:
        return 128 - returncode
    return returncode


# Run confined by probe(): it must be in a pid namespace, find / and /proc/sys read-only, its working folder
# writable, its /tmp private, and a server listening on the host's loopback out of reach.
_PROBE = """\
import os, socket
assert os.getpid() < 10, "not in a pid namespace"
assert os.statvfs("/").f_flag & os.ST_RDONLY, "/ is writable"
assert not os.access("/proc/sys/kernel/core_pattern", os.W_OK), "/proc/sys is writable"
open("probe", "w").write("x")
assert set(os.listdir("/tmp")) <= {{{name!r}, *{kept!r}}}, "/tmp is shared"
assert all(os.statvfs(k).f_flag & os.ST_RDONLY for k in {kept_paths!r}), "the interpreter is writable"
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=2).close()
except OSError:
    print("isolated")
else:
    print("the host's loopback is reachable")
"""


@dataclass(frozen=True)
class Probe:
    """Which isolation this process can use."""

    isolation: Isolation
    """The first backend that passed, in the order namespaces, bwrap; "none" when neither did."""
    reasons: dict[str, str]
    """Why each backend tried before it failed, e.g. ``{"namespaces": "unshare: Operation not permitted"}``."""


def try_isolation(isolation: Isolation, timeout_s: float = 10.0) -> str:
    """Run a check program confined by ``isolation``; returns "" when it is isolated, otherwise why not."""
    if sys.platform != "linux":
        return f"Linux namespaces are not available on {sys.platform}"
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        return "bwrap is not installed"
    root = Path(tempfile.mkdtemp(prefix="edlm-probe-"))
    try:
        (root / "work").mkdir()
        server = socket.create_server(("127.0.0.1", 0))
        kept = [os.fsdecode(p) for p in interpreter_under_tmp()]  # the names in /tmp that lead to them: kept
        probe_source = _PROBE.format(name=root.name, port=server.getsockname()[1], kept_paths=kept,
                                     kept=sorted({p.split("/")[2] for p in kept}))
        argv = [sys.executable, "-I", "-c", probe_source]
        try:
            argv, preexec = confine(isolation, argv, root, root / "work")
            done = subprocess.run(argv, cwd=root / "work", preexec_fn=preexec, start_new_session=True,
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s,
                                  env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"})
        except (OSError, subprocess.SubprocessError) as e:
            return f"{type(e).__name__}: {e}"
        finally:
            server.close()
        if done.returncode == 0 and done.stdout.strip() == b"isolated":
            return ""
        lines = (done.stderr or done.stdout).decode(errors="replace").strip().splitlines()
        return f"exit status {done.returncode}" + (f": {lines[-1]}" if lines else "")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@functools.cache
def probe() -> Probe:
    """Which isolation works here, found once per process by running a check program under each backend."""
    reasons: dict[str, str] = {}
    for isolation in ("namespaces", "bwrap"):
        reason = try_isolation(isolation)
        if not reason:
            logger.info("generated code runs isolated (%s)", isolation)
            return Probe(isolation, reasons)
        reasons[isolation] = reason
    logger.warning("generated code cannot be isolated here: %s", reasons)
    return Probe("none", reasons)
