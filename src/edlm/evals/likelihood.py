"""Likelihoods: the exact AR log-likelihood of a causal LM, the block-diffusion ELBO of a dLM, and greedy checks.

The dLM's log-likelihood of a continuation given a context is estimated by the block-diffusion ELBO: each block
of the continuation gets its own noise level t ~ U(0, 1], every continuation token is masked with probability t,
the model sees the clean context of earlier blocks (the training construction ``[xt ; x0]``), and the masked
tokens' log-probabilities are summed with weight 1/t. Positions after the continuation inside its last block are
masked and not scored (unknown future). With ``n_samples`` Monte-Carlo draws from a fixed seed the estimate is
deterministic; its expectation is a lower bound of the model's log-likelihood, with equality for block size 1 (each
token then depends on nothing noisy but itself). The mask token is excluded from every distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from edlm.errors import EdlmError


@torch.no_grad()
def ar_rows(model, context: list[int], continuations: list[list[int]], banned: int | None
             ) -> list[tuple[float, bool]]:
    """(exact log p(continuation | context), whether greedy decoding produces it) of each continuation of a causal
    LM, all in one forward; rows are right-padded (and masked) only when their lengths differ. ``banned`` (the
    dLM's mask token) is excluded from every distribution."""
    if not continuations:
        return []
    device = model.get_input_embeddings().weight.device
    width = len(context) + max(len(c) for c in continuations)
    ids = torch.zeros(len(continuations), width, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for r, c in enumerate(continuations):
        row = context + c
        ids[r, :len(row)] = torch.tensor(row, device=device)
        attn[r, :len(row)] = 1
    padded = bool((attn == 0).any())
    logits = model(input_ids=ids, attention_mask=attn if padded else None).logits[:, :-1].float()  # (R, W-1, V)
    if banned is not None and banned < logits.shape[-1]:
        logits[..., banned] = float("-inf")
    target = ids[:, 1:]  # state i - 1 predicts token i
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)  # (R, W-1)
    hit = logits.argmax(-1) == target
    start = len(context) - 1
    return [(float(logp[r, start:start + len(c)].sum()), bool(hit[r, start:start + len(c)].all()))
            for r, c in enumerate(continuations)]


def ar_score(model, context: list[int], continuation: list[int], banned: int | None = None) -> tuple[float, bool]:
    """(exact log p(continuation | context), whether greedy decoding produces it) of a causal LM, one forward."""
    return ar_rows(model, context, [continuation], banned)[0]


def ar_loglikelihood(model, context: list[int], continuation: list[int], banned: int | None = None) -> float:
    """Exact log p(continuation | context) of a causal LM (one forward)."""
    return ar_score(model, context, continuation, banned)[0]


def ar_scores(model, context: list[int], continuations: list[list[int]], banned: int | None = None) -> list[float]:
    """Exact log p(continuation | context) of each continuation, all in one batched forward (right-padded)."""
    return [value for value, _ in ar_rows(model, context, continuations, banned)]


@torch.no_grad()
def dlm_elbo(dlm, context: list[int], continuation: list[int], n_samples: int = 8, seed: int = 0,
             batch: int = 8) -> float:
    """Monte-Carlo block-diffusion ELBO of log p(continuation | context) (see module docstring)."""
    return dlm_elbos(dlm, context, [continuation], n_samples=n_samples, seed=seed, batch=batch)[0]


@torch.no_grad()
def dlm_elbos(dlm, context: list[int], continuations: list[list[int]], n_samples: int = 8, seed: int = 0,
              batch: int = 8, max_rows: int = 32) -> list[float]:
    """:func:`dlm_elbo` of several continuations of one context, batched across continuations.

    Each continuation gets exactly the noise :func:`dlm_elbo` would draw for it alone (its own generator, drawn in
    chunks of ``batch``), so the values do not depend on the batching; continuations of equal padded length share
    forwards of up to ``max_rows`` rows.
    """
    if continuations and not context and any(continuations):
        raise EdlmError("likelihood needs a non-empty context (prepend BOS or a newline)")
    block = dlm.config.block_size
    start = len(context)
    rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # length -> (index, xt, x0, w)
    for index, continuation in enumerate(continuations):
        if not continuation:
            continue
        end = start + len(continuation)
        length = math.ceil(end / block) * block
        x0 = torch.tensor(context + continuation + [dlm.mask_id] * (length - end), device=dlm.device)  # (L,)
        cont = torch.zeros(length, dtype=torch.bool, device=dlm.device)
        cont[start:end] = True
        tail = torch.zeros_like(cont)
        tail[end:] = True  # always masked, never scored
        generator = torch.Generator(device=dlm.device).manual_seed(seed)
        for done in range(0, n_samples, batch):
            n = min(batch, n_samples - done)
            t = 1.0 - torch.rand(n, length // block, generator=generator, device=dlm.device)  # (n, nb) in (0, 1]
            t_pos = t.repeat_interleave(block, dim=1)  # (n, L)
            u = torch.rand(n, length, generator=generator, device=dlm.device)
            masked = (u < t_pos) & cont  # (n, L)
            xt = torch.where(masked | tail, torch.full_like(masked, dlm.mask_id, dtype=torch.long), x0)
            if dlm.config.token_shift:
                masked[:, 0] = False
            weight = torch.where(masked, 1.0 / t_pos, 0.0)  # (n, L): scored positions, 1/t-weighted
            rows.setdefault(length, []).extend((index, xt[r], x0, weight[r]) for r in range(n))
    totals = [0.0] * len(continuations)
    for group in rows.values():
        for i in range(0, len(group), max_rows):
            chunk = group[i:i + max_rows]
            xt = torch.stack([c[1] for c in chunk])
            x0 = torch.stack([c[2] for c in chunk])
            logits = dlm.training_logits(xt, x0).float()  # (R, L, V)
            logits[..., dlm.mask_id] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # (R, L)
            weight = torch.stack([c[3] for c in chunk])
            per_row = torch.where(weight > 0, logp * weight, 0.0).sum(-1)  # unscored positions may hold -inf
            for (index, *_), value in zip(chunk, per_row.tolist()):
                totals[index] += value
    return [total / n_samples for total in totals]


@torch.no_grad()
def dlm_is_greedy(dlm, context: list[int], continuation: list[int]) -> bool:
    """Whether every continuation token is the argmax at its position when all continuation tokens are masked.

    One forward of the training construction ``[xt ; x0]`` (as the ELBO at t = 1): each continuation block is
    all-mask and sees the true earlier blocks through the clean copy, e.g. block 4, context ``a b c``,
    continuation ``d e f g h``::

        x0:  a b c d | e f g h | M M M M
        xt:  a b c M | M M M M | M M M M     scored: the argmax at d..h must equal d..h

    The mask token is excluded.
    """
    if not continuation:
        return True
    block = dlm.config.block_size
    start, end = len(context), len(context) + len(continuation)
    length = -(-end // block) * block
    x0 = torch.tensor(context + continuation + [dlm.mask_id] * (length - end), device=dlm.device)  # (L,)
    xt = x0.clone()
    xt[start:] = dlm.mask_id
    logits = dlm.training_logits(xt[None], x0[None])[0, start:end].float()  # (C, V)
    logits[:, dlm.mask_id] = float("-inf")
    return bool((logits.argmax(-1) == x0[start:end]).all())


@dataclass
class Scorer:
    """Log-likelihood of a continuation: the dLM's ELBO, or the exact AR value with ``ar=True``."""

    dlm: Any
    ar_model: Any | None = None
    n_samples: int = 8
    seed: int = 0

    def __call__(self, context: list[int], continuation: list[int]) -> float:
        return self.score_choices(context, [continuation])[0]

    def score_choices(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        """Log-likelihoods of several continuations of one context, batched."""
        if self.ar_model is not None:
            return ar_scores(self.ar_model, context, continuations, banned=self.dlm.mask_id)
        return dlm_elbos(self.dlm, context, continuations, n_samples=self.n_samples, seed=self.seed)
