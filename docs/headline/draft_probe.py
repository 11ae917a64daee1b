"""How good the diffusion head's one-shot block drafts are, teacher-forced: the quantity that sets the speculative
mode's tokens per forward (and the diffusion decoder's at a high threshold).

Usage: python docs/headline/draft_probe.py DLM_DIR [N [TASK_DIR]]   (N: first N held-out problems per family, default 100;
TASK_DIR: the folder holding test.jsonl, default runs/headline/task)

For every problem the gold answer (and EOS) follows the prompt; every block holding answer positions gets those
positions masked at once, with the gold tokens before the block as clean context (one training-style forward per
problem: each block sees exactly what the speculative drafter sees after a fully accepted draft). Prints per family
the mean accepted prefix of a block's draft (greedy, the leading positions that equal the gold ones), the share of
blocks drafted entirely right, and the accuracy at each in-block offset. No decoding, so it takes seconds.
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch

from edlm.model import DiffusionLM
from edlm.studies.analysis import prompt_ids
from edlm.studies.task import first_per_family, read_test


def draft_stats(dlm, problems) -> dict[str, dict]:
    tok, block = dlm.tokenizer, dlm.config.block_size
    right = defaultdict(lambda: [0] * block)
    seen = defaultdict(lambda: [0] * block)
    prefixes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for p in problems:
        ids = prompt_ids(tok, p)
        answer = tok(" " + p.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seq = ids + answer
        seq += [tok.eos_token_id] * (-len(seq) % block)  # whole blocks
        x0 = torch.tensor([seq])
        xt = x0.clone()
        start, stop = len(ids), len(ids) + len(answer)
        xt[0, start:stop] = dlm.mask_id
        logits = dlm.training_logits(xt, x0)[0]  # (L, V)
        logits[:, dlm.mask_id] = float("-inf")
        pred = logits.argmax(dim=-1)
        for b0 in range(start // block * block, stop, block):
            cols = [c for c in range(b0, b0 + block) if start <= c < stop]
            ok = [bool(pred[c] == x0[0, c]) for c in cols]
            accepted = next((k for k, good in enumerate(ok) if not good), len(ok))
            prefixes[p.family].append((accepted, len(cols)))
            for c, good in zip(cols, ok):
                right[p.family][c % block] += good
                seen[p.family][c % block] += 1
    return {fam: {"mean_accepted_prefix": sum(a for a, _ in v) / len(v),
                  "mean_drafted": sum(n for _, n in v) / len(v),
                  "blocks_fully_right": sum(a == n for a, n in v) / len(v),
                  "per_offset": [r / max(s, 1) for r, s in zip(right[fam], seen[fam])]}
            for fam, v in sorted(prefixes.items())}


def main() -> None:
    folder = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    task = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("runs/headline/task")
    torch.set_num_threads(1)
    dlm = DiffusionLM.from_pretrained(folder).eval()
    with torch.no_grad():
        stats = draft_stats(dlm, first_per_family(read_test(task / "test.jsonl"), n))
    for fam, s in stats.items():
        print(f"{folder} {fam}: accepted prefix {s['mean_accepted_prefix']:.2f} of {s['mean_drafted']:.2f}, "
              f"blocks fully right {s['blocks_fully_right']:.3f}, per offset "
              + " ".join(f"{a:.2f}" for a in s["per_offset"]))


if __name__ == "__main__":
    main()
