"""The wrong answers of a converted headline model's diffusion decoding, one family at a time.

Usage: python docs/headline/diffusion_errors.py DLM_DIR TASK_DIR [FAMILY [THRESHOLD [N]]]
(e.g. runs/fresh/runs/ar_weight=1.0,clean_causal=True,diffusion_weight=1.0__s0 runs/fresh/task seq 0.9 14)

Decodes every held-out problem of FAMILY (default seq) at THRESHOLD (default 0.9), block-by-block with the KV
cache, batch 8, one thread; prints the accuracy, the first N wrong answers next to the gold ones, and how many
are wrong.
"""

import sys
from pathlib import Path

import torch

from edlm.config import DecodeConfig
from edlm.decode import generate
from edlm.model import DiffusionLM
from edlm.studies.headline import decode_problems
from edlm.studies.task import read_test


def main() -> None:
    run, task = sys.argv[1], Path(sys.argv[2])
    family = sys.argv[3] if len(sys.argv) > 3 else "seq"
    threshold = float(sys.argv[4]) if len(sys.argv) > 4 else 0.9
    show = int(sys.argv[5]) if len(sys.argv) > 5 else 14
    torch.set_num_threads(1)
    problems = [p for p in read_test(task / "test.jsonl") if p.family == family]
    dlm = DiffusionLM.from_pretrained(run).eval()
    cfg = DecodeConfig(max_new_tokens=32, threshold=threshold)
    with torch.no_grad():
        r = decode_problems(lambda rows: generate(dlm, rows, cfg), dlm.tokenizer, problems, 8)
    wrong = [(p, a) for p, a in zip(problems, r["answers"]) if a != p.answer]  # the scorer's test (headline._scored)
    print(f"{family}: accuracy {r['accuracy']:.3f} at threshold {threshold:g}, {len(wrong)} of {len(problems)} wrong")
    for p, a in wrong[:show]:
        print(f"  {p.question!r}: gold {p.answer!r}, got {a!r}")


if __name__ == "__main__":
    main()
