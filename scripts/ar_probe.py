"""Exact match of an AR checkpoint (a Hugging Face folder) on the headline's held-out problems, greedy with its KV
cache: the control for the AR mode of a converted model.

Usage: python scripts/ar_probe.py MODEL_DIR [N]   (N: first N problems per family; all when omitted)
Reads the held-out problems of ``runs/headline`` (written by ``edlm headline``). One thread, batch 8.
"""

import sys
from pathlib import Path

import torch

from edlm.assets import load_hf
from edlm.baseline import ar_generate
from edlm.config import DecodeConfig
from edlm.studies.headline import decode_problems
from edlm.studies.task import first_per_family, read_test


def main() -> None:
    run = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else None
    torch.set_num_threads(1)
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
