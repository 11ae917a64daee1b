"""Timing helpers of the benchmarks (and of the scripts under docs/roofline/): the median of a few calls, a bare
forward's time, and the agreement of two outputs token by token."""

from __future__ import annotations

import time
from functools import partial

import torch

from edlm.compat import cache_kwargs, new_cache


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean over rows of the fraction of positions where two outputs hold the same token."""
    scores = [sum(x == y for x, y in zip(p, q)) / max(len(p), len(q), 1) for p, q in zip(a, b)]
    return sum(scores) / max(len(scores), 1)


def median_seconds(fn, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn``, after one untimed call (first calls pay one-time costs)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


def forward_step(model, cache_len: int, batch: int = 1):
    """A KV cache holding ``cache_len`` seeded random tokens per row, and ``step(width, token=0)``: one bare forward
    of ``width`` new tokens per row on it, every logit computed (as a dLM step needs them all), the cache cropped
    back after."""
    emb = model.get_input_embeddings().weight  # (V, D)
    device = emb.device
    prefix = torch.randint(0, min(1000, emb.shape[0]), (batch, cache_len), generator=torch.Generator().manual_seed(0))
    cache = new_cache(model, batch)
    model(input_ids=prefix.to(device), use_cache=True, **cache_kwargs(model, cache))
    inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def step(width: int, token: int = 0) -> None:
        if (width, token) not in inputs:
            pos = torch.arange(cache_len, cache_len + width, device=device)[None].expand(batch, -1)
            inputs[width, token] = torch.full((batch, width), token, device=device), pos
        ids, pos = inputs[width, token]
        model(input_ids=ids, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
        cache.crop(-width)

    return step


@torch.no_grad()
def forward_times(model, cache_len: int, widths: tuple[int, ...], batch: int = 1, repeats: int = 7,
                  token: int = 0) -> dict[int, float]:
    """Median seconds of a bare model forward of ``w`` new tokens per row on a ``cache_len``-token KV cache, for each
    ``w`` in ``widths``, ``batch`` rows (:func:`forward_step`): the cost a decoder step cannot go below (no masks, no
    commit rule)."""
    step = forward_step(model, cache_len, batch)
    return {w: median_seconds(partial(step, w, token), repeats) for w in widths}
