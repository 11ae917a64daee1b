"""AR decoding of the same weights with a KV cache: the reference every dLM speed claim is measured against.

A plain prefill -> one token per forward loop (no ``generate()`` machinery, so its overhead is comparable to the
dLM decoder's). Prompts of different lengths are left-padded with a 2D attention mask.
"""

from __future__ import annotations

import time

import torch

from edlm.config import DecodeConfig
from edlm.decode import DecodeOutput, DecodeStats, choose
from edlm.errors import EdlmError


@torch.no_grad()
def ar_generate(model, prompts: list[list[int]], cfg: DecodeConfig, eos_id: int | None,
                pad_id: int | None = None, banned: list[int] | None = None) -> DecodeOutput:
    """Greedy (or sampled) AR decoding of token-id prompts, all rows in one batch.

    Args:
        model: a causal LM (``DiffusionLM.model`` or the AR source).
        prompts: token ids per row.
        cfg: ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed`` are used.
        eos_id: stop a row after it produces this id.
        pad_id: id used for left padding (never attended); defaults to ``eos_id`` or 0.
        banned: ids never produced (e.g. a dLM's mask token).
    """
    from transformers import DynamicCache

    from edlm.model import cache_kwargs

    if not prompts or any(len(p) == 0 for p in prompts):
        raise EdlmError("every prompt needs at least one token")
    t0 = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    rows, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        attn[r, width - len(p):] = 1
    positions = (attn.cumsum(-1) - 1).clamp_min(0)  # (R, T)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    cache = DynamicCache(config=model.config)
    out_ids: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    forwards = 0

    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                   **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]  # prefill: (R, V)
    forwards += 1
    next_pos = positions[:, -1:] + 1  # (R, 1)
    for _ in range(cfg.max_new_tokens):
        if banned:
            logits[:, banned] = float("-inf")
        tokens, _ = choose(logits, cfg, generator)  # (R,)
        for r in range(rows):
            if not done[r]:
                out_ids[r].append(int(tokens[r]))
                if int(tokens[r]) == eos_id or len(out_ids[r]) >= cfg.max_new_tokens:
                    done[r] = True
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((rows, 1), dtype=attn.dtype, device=device)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos,
                       use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
        forwards += 1
        next_pos = next_pos + 1
    stats = DecodeStats(forwards=forwards, tokens=sum(len(o) for o in out_ids), seconds=time.perf_counter() - t0,
                        rows=rows)
    return DecodeOutput(sequences=out_ids, stats=stats)
