"""The two systems an evaluation compares, loaded and run the same way by ``edlm eval`` and the lm-eval adapter: a
converted model (the dLM) and the AR model it was converted from.

The AR source is whatever the folder's ``train_config.yaml`` names (:func:`edlm.model.source_spec`); AR decoding never
produces the dLM's mask token (it has an embedding row in the converted vocabulary, but no meaning to the source).
Generated text is cut at the earliest stop string (:func:`edlm.text.cut_at_stop`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from edlm.config import DecodeConfig
from edlm.sampling import DecodeStats
from edlm.text import cut_at_stop

logger = logging.getLogger(__name__)


def load_ar_source(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", attn_implementation: str = "sdpa"):
    """The AR model a converted folder was trained from, in eval mode on ``device``.

    A folder that records no source (no ``train_config.yaml``) has its converted weights used as a causal LM.
    """
    from edlm.assets import load_hf, resolve_model
    from edlm.model import source_spec

    spec = source_spec(model_dir)
    if spec is None:
        logger.warning("%s records no AR source (no train_config.yaml); the converted weights are used as a causal "
                       "LM", model_dir)
        model = load_hf(model_dir, dtype=dtype, attn_implementation=attn_implementation)[0]
    else:
        logger.info("AR source of %s: %s", model_dir, spec)
        model = resolve_model(spec, dtype=dtype, attn_implementation=attn_implementation)[0]
    return model.to(device).eval()


def load_for_eval(model_dir: str, ar: bool = False, dtype: str = "fp32", compile: bool = False):
    """(DiffusionLM, AR source model or None) of a converted folder, weights in ``dtype`` (see :mod:`edlm.quant`);
    with ``compile`` both run on the compiled engine (:mod:`edlm.engine`)."""
    from edlm.assets import best_device
    from edlm.loading import load
    from edlm.quant import cast_model, load_dtype

    device = best_device()
    dlm = load(model_dir, dtype, device=device, compile=compile)
    if compile:
        from edlm.engine import compile_model

        return dlm, compile_model(load_ar_source(model_dir), dtype) if ar else None
    ar_model = cast_model(load_ar_source(model_dir, load_dtype(dtype), device=device), dtype).eval() if ar else None
    return dlm, ar_model


def banned_ids(ar_model, mask_id: int) -> list[int] | None:
    """The ids AR decoding must never produce: the dLM's mask token, when the AR vocabulary has it."""
    return [mask_id] if mask_id < ar_model.get_input_embeddings().num_embeddings else None


@torch.no_grad()
def generate_texts(prompts: list[list[int]], cfg: DecodeConfig, tokenizer, dlm: Any = None, ar_model: Any = None,
                   mask_id: int | None = None) -> tuple[list[str], DecodeStats]:
    """(continuation texts cut at ``cfg.stop``, decoding statistics) of a batch of token-id prompts.

    With ``ar_model`` it decodes causally (``mask_id`` banned); otherwise ``dlm``'s block decoder in ``cfg.mode``,
    where a row stops at the first block boundary after a stop string appeared in its text.
    """
    if ar_model is None:
        return dlm.complete(prompts, cfg)
    from edlm.ar import ar_generate

    out = ar_generate(ar_model, prompts, cfg, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                      banned=banned_ids(ar_model, mask_id) if mask_id is not None else None)
    return [cut_at_stop(tokenizer.decode(seq, skip_special_tokens=True), cfg.stop) for seq in out.sequences], out.stats
