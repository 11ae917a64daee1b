"""AR decoding with a KV cache: the reference every dLM speed claim is measured against, and the ``ar`` mode of a
converted model (its weights decoded causally, one token per forward).

A plain prefill -> one token per forward loop (no ``generate()`` machinery, so its overhead is comparable to the
dLM decoder's). Prompts of different lengths are left-padded with a 2D attention mask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch

from edlm.compat import cache_kwargs, new_cache
from edlm.config import DecodeConfig
from edlm.errors import EdlmError
from edlm.sampling import DecodeOutput, DecodeStats, choose_rows, row_generators


def iter_ar(model, prompts: list[list[int]], cfg: DecodeConfig, eos_id: int | None, pad_id: int | None = None,
            banned: list[int] | None = None, should_stop: Callable[[int], bool] | None = None,
            seeds: list[int] | None = None) -> Iterator[tuple[list[list[int]], DecodeStats]]:
    """Greedy (or sampled) AR decoding, all rows in one batch, yielding after every forward: (the new token of
    each live row, ``[]`` for finished rows; running stats). Same contract as :func:`edlm.decode.iter_steps`.

    Args:
        model: a causal LM (``DiffusionLM.model`` or the AR source).
        prompts: token ids per row.
        cfg: ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed`` are used.
        eos_id: stop a row after it produces this id.
        pad_id: id used for left padding (never attended); defaults to ``eos_id`` or 0.
        banned: ids never produced (e.g. a dLM's mask token).
        should_stop: asked before every forward; a row for which it returns True is finished.
        seeds: one sampling seed per row (default ``cfg.seed``): each row draws from its own generator.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EdlmError("every prompt needs at least one token")
    rows, width = len(prompts), max(len(p) for p in prompts)
    t0 = time.perf_counter()
    device = model.get_input_embeddings().weight.device
    pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, device=device)
        attn[r, width - len(p):] = 1
    positions = (attn.cumsum(-1) - 1).clamp_min(0)  # (R, T)
    generators = row_generators(seeds, cfg, rows, device)
    cache = new_cache(model, rows)
    produced = [0] * rows
    done = [False] * rows
    stats = DecodeStats(rows=rows)
    everything = torch.ones((rows, 1), dtype=torch.bool, device=device)

    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                   **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]  # prefill: (R, V)
    stats.forwards += 1
    next_pos = positions[:, -1:] + 1  # (R, 1)
    while True:
        if banned:
            logits[:, banned] = float("-inf")
        tokens, _ = choose_rows(logits[:, None], everything, cfg, generators)  # (R, 1)
        tokens = tokens[:, 0]
        new: list[list[int]] = []
        for r, t in enumerate(tokens.tolist()):
            if done[r]:
                new.append([])
                continue
            new.append([t])
            produced[r] += 1
            done[r] = t == eos_id or produced[r] >= cfg.max_new_tokens
        stats.tokens, stats.seconds = sum(produced), time.perf_counter() - t0
        yield new, stats
        if should_stop is not None:
            done = [d or should_stop(r) for r, d in enumerate(done)]
        if all(done):
            return
        attn = torch.cat([attn, torch.ones((rows, 1), dtype=attn.dtype, device=device)], dim=1)
        logits = model(input_ids=tokens[:, None], attention_mask=attn, position_ids=next_pos,
                       use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
        stats.forwards += 1
        next_pos = next_pos + 1


@torch.no_grad()
def ar_generate(model, prompts: list[list[int]], cfg: DecodeConfig, eos_id: int | None,
                pad_id: int | None = None, banned: list[int] | None = None) -> DecodeOutput:
    """Collect :func:`iter_ar`: generated ids per row (prompt excluded; ending with EOS when one was produced)."""
    sequences: list[list[int]] = [[] for _ in prompts]
    stats = DecodeStats(rows=len(prompts))
    for new, stats in iter_ar(model, prompts, cfg, eos_id, pad_id=pad_id, banned=banned):  # noqa: B007
        for seq, part in zip(sequences, new):
            seq.extend(part)
    return DecodeOutput(sequences=sequences, stats=stats)
