"""The two systems an evaluation compares, loaded and run the same way by ``edlm eval`` and the lm-eval adapter: a
converted model (the dLM) and the AR model it was converted from.

The AR source is whatever the folder's ``train_config.yaml`` names (:func:`edlm.model.source_spec`); AR decoding never
produces the dLM's mask token (it has an embedding row in the converted vocabulary, but no meaning to the source).
Generated text is cut at the earliest stop string (:func:`edlm.text.cut_at_stop`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from edlm.api import stopped_text
from edlm.config import DecodeConfig
from edlm.harness import ar_system, dlm_system
from edlm.sampling import DecodeStats

logger = logging.getLogger(__name__)


def generation_system(cfg: DecodeConfig, tokenizer, dlm: Any = None, ar_model: Any = None,
                      mask_id: int | None = None):
    """The harness system (:mod:`edlm.harness`) an evaluation decodes with: ``ar_model`` causally (``mask_id``
    banned), else ``dlm``'s block decoder in ``cfg.mode``, a row stopping at the first block boundary after a stop
    string appeared in its text."""
    if ar_model is None:
        return dlm_system(dlm, cfg)
    vocab = ar_model.get_input_embeddings().num_embeddings  # the mask token is banned where the AR vocabulary has it
    banned = [mask_id] if mask_id is not None and mask_id < vocab else None
    return ar_system(ar_model, cfg, tokenizer.eos_token_id, tokenizer.pad_token_id, banned)


@torch.no_grad()
def generate_texts(prompts: list[list[int]], cfg: DecodeConfig, tokenizer, dlm: Any = None, ar_model: Any = None,
                   mask_id: int | None = None) -> tuple[list[str], DecodeStats]:
    """(continuation texts cut at ``cfg.stop``, decoding statistics) of a batch of token-id prompts, decoded by
    :func:`generation_system`."""
    out = generation_system(cfg, tokenizer, dlm, ar_model, mask_id)(prompts)
    return [stopped_text(tokenizer, s, cfg.stop) for s in out.sequences], out.stats
