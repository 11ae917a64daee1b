"""Break-out attempts against the isolation of generated code (edlm.evals.isolation).

Each attempt runs as a program through ``run_program``: confined it must fail and leave nothing behind. Where it is
harmless, the same program also runs unconfined (``sandbox="none"``) and must succeed there, so a passing test shows
the isolation at work rather than an attempt that could never have worked. Every backend installed here is tried;
on Linux as root (CI) the namespaces backend must work, elsewhere a missing backend is skipped with its reason.
"""

import functools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edlm.evals import isolation
from edlm.evals.sandbox import run_program


@functools.cache
def _why_not(kind: str) -> str:
    return isolation.try_isolation(kind)


def _must_work(kind: str) -> bool:
    return kind == "namespaces" and sys.platform == "linux" and os.geteuid() == 0


@pytest.fixture(params=["namespaces", "bwrap"])
def kind(request) -> str:
    reason = _why_not(request.param)
    if reason and _must_work(request.param):
        pytest.fail(f"namespaces must isolate on Linux as root: {reason}")
    if reason:
        pytest.skip(f"{request.param} cannot isolate here: {reason}")
    return request.param


@pytest.fixture
def elsewhere() -> Iterator[Path]:
    """A folder outside /tmp (on the root file system, not hidden by the private /tmp), removed afterwards."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    path = Path(tempfile.mkdtemp(prefix="edlm-test-", dir=base))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# Each attempt prints "<name> done" or "<name> <exception type>"
_ATTEMPT = """\
import os, socket
def attempt(name, f):
    try:
        f()
        print(name, "done", flush=True)
    except Exception as e:
        print(name, type(e).__name__, flush=True)
"""


def _outcomes(source: str, kind: str) -> dict[str, str]:
    result = run_program(_ATTEMPT + source, timeout_s=10.0, sandbox=kind)
    assert result.passed, (result.detail, result.stderr)
    assert result.sandbox == kind
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def test_writing_outside_the_working_folder_fails(kind, tmp_path, elsewhere):
    targets = {"tmp": tmp_path / "PWNED", "elsewhere": elsewhere / "PWNED", "dir": elsewhere / "made"}
    source = (f"attempt('tmp', lambda: open({str(targets['tmp'])!r}, 'w').write('x'))\n"
              f"attempt('elsewhere', lambda: open({str(targets['elsewhere'])!r}, 'w').write('x'))\n"
              f"attempt('dir', lambda: os.mkdir({str(targets['dir'])!r}))\n"
              "attempt('work', lambda: open('mine.txt', 'w').write('x'))\n")
    confined = _outcomes(source, kind)
    assert confined["work"] == "done"  # its own folder stays writable
    assert {confined[k] for k in targets} & {"done"} == set(), confined
    assert [p for p in targets.values() if p.exists()] == []
    assert set(_outcomes(source, "none").values()) == {"done"}  # the same program, unconfined, writes them all


def test_deleting_or_overwriting_a_file_outside_fails(kind, tmp_path, elsewhere):
    victims = [tmp_path / "victim", elsewhere / "victim"]
    for victim in victims:
        victim.write_text("precious")
    source = "".join(f"attempt('overwrite{i}', lambda: open({str(v)!r}, 'w').write('gone'))\n"
                     f"attempt('delete{i}', lambda: os.remove({str(v)!r}))\n" for i, v in enumerate(victims))
    confined = _outcomes(source, kind)
    assert "done" not in confined.values(), confined
    assert [v.read_text() for v in victims] == ["precious", "precious"]
    assert set(_outcomes(source, "none").values()) == {"done"}
    assert not any(v.exists() for v in victims)


def test_files_under_the_hosts_tmp_are_hidden(kind, tmp_path):
    secret = tmp_path / "secret"
    token = uuid.uuid4().hex
    secret.write_text(token)
    source = (f"attempt('read', lambda: print(open({str(secret)!r}).read()))\n"
              f"attempt('list', lambda: print(os.listdir({str(tmp_path)!r})))\n")
    confined = run_program(_ATTEMPT + source, sandbox=kind)
    assert confined.passed and token not in confined.stdout and "secret" not in confined.stdout
    assert "read FileNotFoundError" in confined.stdout
    assert token in run_program(_ATTEMPT + source, sandbox="none").stdout


@pytest.mark.parametrize("depth", ["venv", "work/venv"])
def test_a_python_living_under_tmp_still_starts_and_stays_read_only(kind, monkeypatch, depth):
    # a venv made under /tmp (fresh-check's /tmp/tmp.XXX/venv-tests, a CI runner's): covering the host's /tmp must
    # not hide it, at any depth
    top = Path(tempfile.mkdtemp(prefix="edlm-venv-", dir="/tmp"))
    venv = top / depth
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        monkeypatch.setattr(sys, "executable", str(venv / "bin" / "python"))
        assert os.fsencode(venv) in isolation.interpreter_under_tmp()
        assert isolation.try_isolation(kind) == ""
        source = (f"import sys; print('prefix', sys.prefix)\n"
                  f"attempt('write', lambda: open({str(venv / 'PWNED')!r}, 'w').write('x'))\n")
        result = run_program(_ATTEMPT + source, sandbox=kind)
        assert result.passed, (result.detail, result.stderr)
        assert f"prefix {venv}" in result.stdout and "write done" not in result.stdout
        assert not (venv / "PWNED").exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_tcp_server_on_the_hosts_loopback_is_unreachable(kind):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        port = server.getsockname()[1]
        source = f"attempt('connect', lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2).close())\n"
        confined = _outcomes(source, kind)
        assert confined["connect"] != "done"
        with pytest.raises(BlockingIOError):  # nothing reached the server
            server.accept()
        assert _outcomes(source, "none")["connect"] == "done"
        server.accept()[0].close()  # the unconfined connection arrived


def _dns_query(name: str) -> bytes:
    """A standard query for the A record of ``name``: header (id, recursion desired, 1 question), name, type, class."""
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack(">HHHHHH", 0x1D5, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack(">HH", 1, 1)


def test_hostnames_do_not_resolve(kind):
    # a name server the test runs on the host's loopback: the query must not reach it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        port = server.getsockname()[1]
        query = _dns_query("example.com")
        source = ("attempt('resolve', lambda: socket.getaddrinfo('example.com', 80))\n"
                  "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                  f"attempt('ask', lambda: s.sendto({query!r}, ('127.0.0.1', {port})))\n")
        confined = _outcomes(source, kind)
        assert confined["resolve"] == "gaierror"
        with pytest.raises(BlockingIOError):
            server.recvfrom(512)
        _outcomes(source, "none")
        assert server.recvfrom(512)[0] == query  # unconfined, the same query arrives


def test_other_processes_are_out_of_reach(kind):
    token = f"edlm-test-victim-{uuid.uuid4().hex}"  # world-readable in the host's /proc/PID/cmdline
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token], start_new_session=True)
    try:
        source = (f"attempt('cmdline', lambda: print(open('/proc/{victim.pid}/cmdline', 'rb').read()))\n"
                  f"attempt('environ', lambda: open('/proc/{victim.pid}/environ', 'rb').read())\n"
                  f"attempt('kill', lambda: os.kill({victim.pid}, 9))\n"
                  # kill -1 outside a pid namespace would hit every process of the user: refuse, failing the test
                  "assert os.getpid() < 10, 'not in a pid namespace'\n"
                  "attempt('kill all', lambda: os.kill(-1, 9))\n")
        confined = run_program(_ATTEMPT + source, sandbox=kind)
        assert confined.passed, confined.detail
        assert token not in confined.stdout and "environ done" not in confined.stdout
        assert victim.poll() is None, "the confined program killed a process outside"
        # unconfined (not the kill -1, which would hit every process of the user)
        unconfined = run_program(_ATTEMPT + source.rsplit("assert os.getpid()", 1)[0], sandbox="none")
        assert token in unconfined.stdout
        assert "environ done" in unconfined.stdout and "kill done" in unconfined.stdout
        assert victim.wait(timeout=5) == -signal.SIGKILL
    finally:
        victim.kill()
        victim.wait()


def test_no_privilege_to_undo_the_mounts(kind, tmp_path):
    # as root in the sandbox: remount / writable, unmount the private /tmp, or make a user namespace and try there.
    # Not run unconfined: as root that would change the host's mounts.
    target, secret = tmp_path / "PWNED", tmp_path / "secret"
    secret.write_text("hidden")
    source = f"""\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
def write():
    open({str(target)!r}, "w").write("x")
print("remount", libc.mount(None, b"/", None, 32 | 4096, None))
print("umount", libc.umount2(b"/tmp", 2))
print("user namespace", libc.unshare(0x10000000 | 0x20000))
print("umount there", libc.umount2(b"/tmp", 2))
print("remount there", libc.mount(None, b"/", None, 32 | 4096, None))
attempt("write", write)
attempt("read", lambda: print("secret", open({str(secret)!r}).read()))
"""
    result = run_program(_ATTEMPT + source, sandbox=kind)
    assert result.passed, result.stderr
    lines = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert (lines["remount"], lines["umount"], lines["umount there"], lines["remount there"]) == ("-1",) * 4
    assert lines["write"] != "done" and "hidden" not in result.stdout
    assert not target.exists()


# Run as an unprivileged user: load isolation.py and isolation_init.py by path (stdlib only), run a program confined
# and unconfined that writes outside its folder and forks until the process limit stops it.
_AS_USER = """\
import importlib.util, json, os, resource, signal, subprocess, sys, tempfile
from pathlib import Path
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
load("edlm.evals.isolation_init", Path(sys.argv[1]).with_name("isolation_init.py"))
iso = load("edlm_isolation", sys.argv[1])
target, nproc = sys.argv[2], int(sys.argv[3])
program = f'''
import os, time
try:
    open({target!r}, "w").write("x")
    print("wrote")
except OSError as e:
    print(type(e).__name__)
n = 0
try:
    while n < {nproc} + 20:
        if os.fork() == 0:
            os.closerange(0, 3)  # the parent's output pipe must not wait for this child
            time.sleep(30)
            os._exit(0)
        n += 1
except OSError:
    pass
print(n)
'''
def limit():
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
out = {"probe": iso.probe().isolation, "reasons": iso.probe().reasons, "uid": os.geteuid()}
for kind in ("namespaces", "none"):
    root = Path(tempfile.mkdtemp(prefix="edlm-exec-", dir=os.path.dirname(target)))
    (root / "work").mkdir()
    argv, preexec = iso.confine(kind, [sys.executable, "-I", "-c", program], root, root / "work", limit)
    proc = subprocess.Popen(argv, cwd=root / "work", preexec_fn=preexec, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=60)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the unconfined program's children
    except ProcessLookupError:
        pass
    out[kind] = stdout.split() + stderr.splitlines()[-1:]
print(json.dumps(out))
"""
_NOBODY = 65534


def _python_for(uid: int) -> str | None:
    for candidate in (sys.executable, "/usr/bin/python3"):
        try:
            done = subprocess.run([candidate, "-c", "import ctypes"], user=uid, group=uid, extra_groups=[],
                                  capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(sys.platform != "linux" or os.geteuid() != 0, reason="needs root to become another user")
def test_an_unprivileged_user_gets_the_same_isolation(elsewhere):
    python = _python_for(_NOBODY)
    if python is None:
        pytest.skip("no Python interpreter that an unprivileged user may run")
    elsewhere.chmod(0o777)
    module = elsewhere / "isolation.py"  # the repository may be unreadable to that user
    for source in (Path(isolation.__file__), Path(isolation.__file__).with_name("isolation_init.py")):
        shutil.copy(source, elsewhere / source.name)
        (elsewhere / source.name).chmod(0o644)
    target = elsewhere / "PWNED"
    done = subprocess.run([python, "-I", "-c", _AS_USER, str(module), str(target), "16"], user=_NOBODY,
                          group=_NOBODY, extra_groups=[], capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["uid"] == _NOBODY
    if out["probe"] != "namespaces" and "unshare:" in out["reasons"]["namespaces"]:
        pytest.skip(f"this kernel refuses user namespaces to unprivileged users: {out['reasons']}")
    assert out["probe"] == "namespaces", out["reasons"]
    assert out["namespaces"][0] != "wrote" and out["none"][0] == "wrote"  # the control writes where it may
    assert 0 < int(out["namespaces"][1]) < 16 and 0 < int(out["none"][1]) < 16  # RLIMIT_NPROC holds in both
