"""The README tells the truth at HEAD: its commands are the ones CI runs, its command table and defaults are the
parser's, its file tree exists, its Python example runs, and nothing in the repository points outside it."""

import argparse
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from edlm.cli import COMMANDS, build_parser
from edlm.config import DecodeConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def section(title: str) -> str:
    """The README's text under ``## title``, up to the next ``## ``."""
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.M | re.S).group(1)


def table(text: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``text``, cells stripped."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [r for r in rows if not set("".join(r)) <= set("-: ") and r[0] not in ("command", "batch")]


def code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return parser


def test_the_two_commands_come_first_and_ci_runs_them_verbatim():
    head = "\n".join(README.splitlines()[:30])
    run, test = code_blocks(section("Run it"), "bash")[0].strip(), code_blocks(section("Test it"), "bash")[0].strip()
    assert run in head and test in head and "edlm demo" in run and "pytest" in test
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    for command in (run, test):
        assert command in ci or f"{command} || exit" in ci, f".ci/run must run the README's command: {command}"
    assert len(README.splitlines()) <= 150


def test_every_command_in_the_table_exists():
    rows = [r for r in table(section("Commands")) if not r[1].startswith("`--")]  # not the defaults' table
    named = {row[0].strip("`").removeprefix("edlm ") for row in rows}
    assert named and named <= set(COMMANDS), named - set(COMMANDS)
    parser = build_parser()
    for command in named:
        subparser(parser, command.split())  # raises when the parser lacks it


def documented_default(command: str, flag: str):
    """What the command does when ``flag`` is not given: the parser's default, else the library's (flags left None
    fall back to ServeSettings for edlm serve, to DecodeConfig for the decoding flags)."""
    from edlm.serve.settings import ServeSettings

    p = subparser(build_parser(), command.split())
    action = next(a for a in p._actions if flag in a.option_strings)
    if action.default is not None:
        return action.default, action.help
    settings = ServeSettings() if command == "serve" else None
    for holder in (settings, settings.decode if settings else None, DecodeConfig()):
        if holder is not None and action.dest in {f.name for f in dataclasses.fields(holder)}:
            return getattr(holder, action.dest), action.help
    raise AssertionError(f"no default found for edlm {command} {flag}")


def test_documented_defaults_are_the_parsers():
    rows = [r for r in table(section("Commands")) if r[1].startswith("`--")]
    assert len(rows) >= 8
    for command, flag, written in rows:
        command, flag = command.strip("`").removeprefix("edlm "), flag.strip("`")
        value, help_text = documented_default(command, flag)
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        assert shown == written, f"README: edlm {command} {flag} defaults to {written}; the parser: {shown}"
        said = re.search(r"\(default:? ([^)]+)\)", help_text or "")
        if said:  # the flag's own help must say the same
            assert said.group(1) == shown, f"edlm {command} {flag} -h says {said.group(1)}, the default is {shown}"


def test_the_file_tree_names_files_that_exist():
    tree = code_blocks(section("Files"), "")[0]
    folder = REPO
    for line in tree.splitlines():
        name = line.split()[0]
        if line.startswith(" "):  # an entry of the folder above
            assert (folder / name).exists(), folder / name
        else:
            folder = REPO / name
            assert folder.exists(), name


def test_the_python_example_runs(tmp_path):
    code = code_blocks(section("Python API"), "python")[0]
    code = code.replace('"configs/tiny.yaml"', repr(str(REPO / "configs" / "tiny.yaml")))
    code = code.replace('"runs/tiny"', repr(str(tmp_path / "tiny")))
    printed: list[str] = []
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.append(" ".join(map(str, a)))})  # noqa: S102
    assert (tmp_path / "tiny" / "edlm_config.json").is_file()
    assert [line.split()[0] for line in printed] == ["diffusion", "speculative", "ar"]
    assert printed[1].split()[1:-1] == printed[2].split()[1:-1]  # speculative == ar, token for token


def test_links_in_the_docs_resolve_and_nothing_points_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    # the project's shared folder and its design notes live beside the repository, not in it; written in pieces so
    # that this file does not match itself
    outside = ("../" + "shared", "DESIGN" + ".md")
    offenders = [f for f in files if (REPO / f).is_file() and not f.endswith((".png", ".safetensors"))
                 and any(s in (REPO / f).read_text(errors="ignore") for s in outside)]
    assert offenders == []
    for doc in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in target:
                path = (doc.parent / target).resolve()
                assert path.exists() and REPO in path.parents, f"{doc.relative_to(REPO)}: broken link {target}"
