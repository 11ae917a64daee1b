"""Stage two of the namespaces isolation (:mod:`edlm.evals.isolation`), run as a script (its source passed with
``-c``, so that it runs wherever edlm is installed, /tmp included, which the isolation hides)::

    python -I -S -c "$(cat isolation_init.py)" CAP_LAST PROC_FALLBACK -- COMMAND [ARG ...]

The confined child execs it once it has made its namespaces and mounts; forking that child instead would copy the
page tables of the evaluation process, a loaded model among them, twice per program. Here, in a small interpreter
(standard library only, imported by :mod:`edlm.evals.isolation` for its system calls)::

    P  this script, in the host's pid namespace: forks G, waits for it, exits the way COMMAND did (code or signal)
    └── G  pid 1 of the new pid namespace: mounts a read-only /proc of it, drops every capability, forks H, reaps
        │  orphans and reports H's wait status to P; when G exits, the kernel kills what is left in the namespace
        └── H  execs COMMAND

``PROC_FALLBACK`` 1: where the kernel refuses a new proc (in a user namespace, a /proc with parts hidden by a
container runtime), an empty read-only tmpfs hides the host's instead.
"""

from __future__ import annotations

import ctypes
import os
import sys

# <linux/mount.h>, <linux/prctl.h>, <linux/securebits.h>, <linux/capability.h>, <signal.h>
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8  # shared with isolation, which has the other flags
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 28, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SECUREBITS = 0b11101111  # noroot, no_setuid_fixup, no_cap_ambient_raise, each locked; keep_caps off and locked
_CAPABILITY_VERSION_3 = 0x20080522
_SIGKILL, _SIG_DFL = 9, 0  # numbers, not the signal module: its import (enum) would cost every program

SETUP_FAILED = 125
"""Exit status of a confined run whose set-up failed after the exec (the reason is on stderr after SETUP_PREFIX)."""
SETUP_PREFIX = "edlm sandbox set-up failed: "

_LIBC: list[ctypes.CDLL] = []


def libc() -> ctypes.CDLL:
    """The C library with the prototypes used here; load it before forking (dlopen is not safe in a forked child)."""
    if not _LIBC:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.unshare.argtypes = (ctypes.c_int,)
        lib.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
        lib.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
        lib.capset.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
        lib.signal.argtypes = (ctypes.c_int, ctypes.c_void_p)
        _LIBC.append(lib)
    return _LIBC[0]


def check(ret: int, what: str) -> None:
    """Raise OSError with errno when a libc call returned non-zero."""
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None = None) -> None:
    check(libc().mount(source, target, fstype, flags, data), f"mount {target.decode(errors='replace')}")


def prctl(option: int, arg: int = 0) -> None:
    check(libc().prctl(option, arg, 0, 0, 0), f"prctl {option}")


def mount_proc(fallback: bool) -> None:
    """G: a read-only proc of the new pid namespace (or, with ``fallback``, an empty tmpfs over the host's)."""
    flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        mount(b"proc", b"/proc", b"proc", flags)
    except OSError:
        if not fallback:
            raise
        mount(b"tmpfs", b"/proc", b"tmpfs", flags, b"size=4k")


def drop_privileges(cap_last: int) -> None:
    """G: no capability now or after exec, none to gain from set-uid files, and no ptrace or /proc access to G."""
    prctl(PR_SET_SECUREBITS, _SECUREBITS)
    for cap in range(cap_last + 1):
        prctl(PR_CAPBSET_DROP, cap)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable of capabilities 0-31 and 32-63: all zero
    check(libc().capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_DUMPABLE, 0)


def exit_like(status: int) -> None:
    """Exit with the wait status ``status`` of another process: the same code, or killed by the same signal."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # Python ignores SIGPIPE and SIGXFSZ: back to the default action, then the same signal
        libc().signal(-code, _SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    os._exit(code)


def _fail(error: BaseException) -> None:
    os.write(2, f"{SETUP_PREFIX}{error}\n".encode(errors="replace"))
    os._exit(SETUP_FAILED)


def main(argv: list[str]) -> None:
    cap_last, fallback, command = int(argv[1]), argv[2] == "1", argv[4:]
    libc()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid:  # P
        os.close(report_w)
        _, status = os.waitpid(pid, 0)
        report = os.read(report_r, 32)
        exit_like(int(report) if report else status)
    try:  # G
        os.close(report_r)
        prctl(PR_SET_PDEATHSIG, _SIGKILL)
        mount_proc(fallback)
        drop_privileges(cap_last)
        pid = os.fork()
    except BaseException as e:
        _fail(e)
    if pid:  # G, the namespace's init: reap everything until the program ends
        while True:
            done, status = os.wait()
            if done == pid:
                os.write(report_w, b"%d" % status)
                os._exit(0)
    os.close(report_w)  # H
    try:
        os.execv(command[0], command)
    except OSError as e:
        _fail(e)


if __name__ == "__main__":
    main(sys.argv)
