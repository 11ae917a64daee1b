"""Exact match of an AR checkpoint (a Hugging Face folder) on the headline's held-out problems, greedy with its KV
cache: the control for the AR mode of a converted model.

Usage: python docs/headline/ar_probe.py MODEL_DIR [N [train]]   (N: first N problems per family; all when omitted or 0)
Reads the held-out problems of ``runs/headline`` (written by ``edlm headline``); with ``train``, its training problems
instead (how often the model's own answers equal the gold ones that conversion trains on: the room self-distillation
on its outputs would have). One thread, batch 8.
"""

import json
import sys
from pathlib import Path

import torch

from edlm.checkpoints import load_hf
from edlm.ar import ar_generate
from edlm.config import DecodeConfig
from edlm.studies.headline import decode_problems
from edlm.studies.task import Problem, first_per_family, read_test


def read_train(path: Path) -> list[Problem]:
    """The task lines of a headline training file (``"QUESTION = ANSWER"``; text lines skipped), as problems."""
    problems = []
    for line in path.read_text().splitlines():
        text = json.loads(line)["text"] if line.strip() else ""
        if " = " in text:
            question, answer = text.split(" = ", 1)
            problems.append(Problem(f"{question} =", answer, question.split()[0]))
    return problems


def main() -> None:
    run = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 and int(sys.argv[2]) else None
    torch.set_num_threads(1)
    if sys.argv[3:4] == ["train"]:
        problems = first_per_family(read_train(Path("runs/headline/task/train.jsonl")), n)
    else:
        problems = first_per_family(read_test(Path("runs/headline/task/test.jsonl")), n)
    model, tok = load_hf(run)
    model.eval()
    cfg = DecodeConfig(max_new_tokens=32)
    with torch.no_grad():
        r = decode_problems(lambda rows: ar_generate(model, rows, cfg, eos_id=tok.eos_token_id,
                                                     pad_id=tok.pad_token_id), tok, problems, 8)
    print(run, len(problems), round(r["accuracy"], 4), {k: round(v, 4) for k, v in r["per_family"].items()},
          flush=True)


if __name__ == "__main__":
    main()
