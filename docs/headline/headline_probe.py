"""Quick accuracy probe of a converted headline run: exact match on the first N held-out problems per family.

Usage: python docs/headline/headline_probe.py RUN_DIR N POLICY[,POLICY...]
(e.g. runs/headline/exp/E 40 threshold,left_to_right; runs/headline/exp/L 40 threshold:0.7,entropy:0.2)

``threshold`` is the default commit rule at 0.9 (``threshold:0.7`` another value); ``entropy:B`` the
entropy-bounded rule (EB-sampler) at B nats, ``entropy_sum:B`` the same with the largest entropy counted;
``left_to_right`` commits one token per forward, leftmost first (``left_to_right_full``: the same without the KV
cache, recomputing everything each step); ``ar`` decodes the converted weights causally with a KV cache (AR mode, the
mask token banned); ``speculative`` drafts with the diffusion head and verifies causally (the AR mode's output).
``@B`` after a diffusion policy decodes in blocks of B (a divisor or multiple of the training block: sub-blocks).
Reads the held-out problems of ``runs/headline`` (written by ``edlm headline``). One thread, batch 8.
"""

import sys
from pathlib import Path

import torch

from edlm.config import DecodeConfig
from edlm.decode import generate
from edlm.model import DiffusionLM
from edlm.studies.headline import decode_problems
from edlm.studies.task import first_per_family, read_test


def main() -> None:
    run, n, policies = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    torch.set_num_threads(1)
    problems = first_per_family(read_test(Path("runs/headline/task/test.jsonl")), n)
    dlm = DiffusionLM.from_pretrained(run).eval()
    with torch.no_grad():
        for policy in policies:
            if policy in ("ar", "speculative"):
                cfg = DecodeConfig(max_new_tokens=32, mode=policy)

                def run_rows(rows, cfg=cfg):
                    return generate(dlm, rows, cfg)
            else:  # POLICY[:VALUE][@BLOCK]: threshold:0.7, entropy:0.2@4 (the policy's own knob; decode block)
                policy_value, _, block = policy.partition("@")
                name, _, value = policy_value.partition(":")
                knob = {"threshold": "threshold", "entropy": "entropy_bound", "entropy_sum": "entropy_bound",
                        "fixed": "tokens_per_step"}.get(name)
                kw = {"threshold": 0.9, "tokens_per_step": 1}
                if value and knob:
                    kw[knob] = type(kw.get(knob, 0.0))(value)
                cfg = DecodeConfig(max_new_tokens=32, policy=name.removesuffix("_full"),
                                   block_size=int(block) if block else None, use_cache=not name.endswith("_full"), **kw)

                def run_rows(rows, cfg=cfg):
                    return generate(dlm, rows, cfg)
            r = decode_problems(run_rows, dlm.tokenizer, problems, 8)
            print(run, policy, round(r["accuracy"], 3), {k: round(v, 3) for k, v in r["per_family"].items()},
                  "tokens/forward", round(r["tokens_per_forward"], 2), r["answers"][:2], flush=True)


if __name__ == "__main__":
    main()
