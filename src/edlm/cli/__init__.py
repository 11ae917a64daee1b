"""Command line: each command is a thin mapping from flags to a typed library function.

``parser`` builds the flags (the decoding ones generated from DecodeConfig), ``commands`` holds one function per
command, ``console`` the log routing and progress bar; this module maps command names to functions and runs one.
"""

from __future__ import annotations

import sys

from edlm.cli.console import Logs, TrainingBar
from edlm.cli.parser import build_parser
from edlm.errors import EdlmError

__all__ = ["COMMANDS", "Logs", "TrainingBar", "build_parser", "canonical_argv", "main"]

COMMANDS: dict[str, str] = {
    "convert": "cmd_convert", "distill": "cmd_distill", "drafter": "cmd_drafter", "generate": "cmd_generate",
    "eval": "cmd_eval", "sweep": "cmd_sweep", "table": "cmd_table", "demo": "cmd_demo", "study": "cmd_study",
    "headline": "cmd_headline", "serve": "cmd_serve", "bench decode": "cmd_bench", "bench engine": "cmd_bench_engine",
    "bench train": "cmd_bench_train", "bench masks": "cmd_bench_masks", "bench load": "cmd_serve_bench",
    "bench verify": "cmd_bench_verify"}
"""Command name -> its function in :mod:`edlm.cli.commands`, which is imported only when a command runs (it
imports the library; ``edlm --help`` stays fast)."""


BENCH_COMMANDS = ("decode", "engine", "verify", "train", "masks", "load")


def canonical_argv(argv: list[str]) -> list[str]:
    """``argv`` with ``edlm bench`` without a benchmark name read as ``edlm bench decode``, the default benchmark."""
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None:
        return argv
    if argv[at] == "bench" and (at + 1 == len(argv) or argv[at + 1] not in BENCH_COMMANDS + ("-h", "--help")):
        argv.insert(at + 1, "decode")
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(canonical_argv(sys.argv[1:] if argv is None else argv))
    command = f"bench {args.bench_command}" if args.command == "bench" else args.command
    args.logs = Logs(args.verbose)
    try:
        from edlm.cli import commands

        return getattr(commands, COMMANDS[command])(args)
    except EdlmError as e:
        print(f"edlm {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        args.logs.close()
