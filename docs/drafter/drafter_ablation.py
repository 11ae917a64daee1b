"""Equal-budget ablation of the gated drafter on the embedded SmolLM2-135M-Instruct (issue 25).

Usage: python docs/drafter/drafter_ablation.py [STEPS [OUT]]   (default 60 steps, runs/drafter-ablation)

Four conversions of the same source at the same budget (STEPS x 4 x 128 tokens, the drafter recipe's settings
otherwise), each resumable and skipped when finished:

    gated         gated LoRA r16 all-linear, LR 1e-3, on the source's own answers (runs/drafter/distill.jsonl)
    gated-plain   the same on plain text (the built-in Shakespeare) instead: self-distilled vs plain data
    lora          ungated LoRA, same rank/LR, joint objective (ar_weight 1): the AR mode trains too and drifts
    full          full fine-tuning, LR 1e-4 (10x below the adapters'), joint objective

Then, on the first 4 held-out chat prompts of the drafter recipe (greedy, batch 1, 48 tokens): speculative tokens per forward, diffusion
tokens per forward, and how far each model's own AR mode is from the unmodified source (the share of prompts whose
AR text is identical, and the share of the source's tokens reproduced before the first difference). Writes
OUT/results.json. Needs runs/drafter/distill.jsonl (``edlm drafter`` makes it).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from edlm.config import DecodeConfig
from edlm.studies.drafter import heldout_prompts, load_drafter_config
from edlm.train import convert, latest_checkpoint

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
OUT = Path(sys.argv[2] if len(sys.argv) > 2 else "runs/drafter-ablation")
RECIPE = "configs/smollm2-135m-drafter.yaml"


def variants(base):
    lora = base.lora
    joint = dataclasses.replace(base.diffusion, ar_weight=1.0)
    common = dict(max_steps=STEPS, save_every=20, keep_checkpoints=2)
    return {
        "gated": dataclasses.replace(base, **common),
        "gated-plain": dataclasses.replace(base, data=dataclasses.replace(base.data, corpus=["builtin:shakespeare"]),
                                           **common),
        "lora": dataclasses.replace(base, diffusion=joint, lora=dataclasses.replace(lora, gated=False), **common),
        "full": dataclasses.replace(base, diffusion=joint, lora=None, lr=1e-4, min_lr=1e-5, **common),
    }


def measure(path: Path, prompts, source, tok, max_new_tokens: int = 48) -> dict:
    from edlm.ar import iter_ar
    from edlm.decode import iter_steps
    from edlm.loading import load
    from edlm.model import encode_prompt

    dlm = load(path, "fp32")
    ids = [encode_prompt(tok, p) for _, p in prompts]
    out: dict = {}
    texts: dict[str, list[list[int]]] = {}
    gated = dlm.gate is not None  # its AR mode is the source itself (tested), so it is not decoded again
    for system in ("source", "speculative", "diffusion") if gated else ("source", "ar", "speculative", "diffusion"):
        tokens = forwards = 0
        texts[system] = []
        for one in ids:
            cfg = DecodeConfig(mode="ar" if system == "source" else system, max_new_tokens=max_new_tokens)
            row: list[int] = []
            with torch.no_grad():
                steps = iter_ar(source, [one], cfg, tok.eos_token_id, pad_id=tok.pad_token_id) \
                    if system == "source" else iter_steps(dlm, [one], cfg)
                for new, stats in steps:
                    row += new[0]
            texts[system].append(row)
            tokens, forwards = tokens + len(row), forwards + stats.forwards
        out[system] = {"tokens_per_forward": tokens / max(forwards, 1)}
    for system in ("speculative",) if gated else ("ar", "speculative"):
        same = [a == b for a, b in zip(texts[system], texts["source"])]
        kept = []
        for a, b in zip(texts[system], texts["source"]):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            kept.append(n / max(len(b), 1))
        out[system].update(identical=sum(same) / len(same), source_prefix_kept=sum(kept) / len(kept))
    return out


def main() -> None:
    from edlm.loading import load_ar

    torch.set_num_threads(2)
    recipe = load_drafter_config(RECIPE)
    OUT.mkdir(parents=True, exist_ok=True)
    results_path = OUT / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    prompts = [p for p in heldout_prompts(recipe.measure.prompts_per_domain, recipe.distill, recipe.measure.seed)
               if p[0] == "chat"][:4]
    source, tok = load_ar(None, "fp32")
    source.eval()
    for name, cfg in variants(recipe.convert).items():
        out_dir = OUT / name
        cfg = dataclasses.replace(cfg, output_dir=str(out_dir))
        if name in results:
            continue
        done = (out_dir / "edlm_config.json").is_file()
        t0 = time.perf_counter()
        if not done:
            print(f"[{name}] training {STEPS} steps -> {out_dir}", flush=True)
            convert(cfg, resume=latest_checkpoint(out_dir) is not None)
        train_s = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
        losses = [m for m in metrics if "masked_ce" in m]
        print(f"[{name}] measuring", flush=True)
        results[name] = {"steps": STEPS, "train_seconds": None if done else round(train_s, 1),
                         "final_masked_ce": sum(m["masked_ce"] for m in losses[-4:]) / max(len(losses[-4:]), 1),
                         **measure(out_dir, prompts, source, tok)}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"[{name}] {json.dumps(results[name])}", flush=True)


if __name__ == "__main__":
    main()
