"""Masking schedules: which positions of each block are masked at noise level t.

A schedule is a small object with ``sample(t, n_blocks, block_len, generator) -> (masked, ratio)``. Every schedule
draws exactly one ``torch.rand`` of shape (B, n_blocks, block_len) from the generator, so schedules that should
agree (``position_dependent`` with sharpness 0 and ``uniform``) agree bit for bit under the same generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Schedule(Protocol):
    def sample(self, t: torch.Tensor, n_blocks: int, block_len: int,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw masks for noise levels ``t`` (B,).

        Returns:
            masked: bool (B, n_blocks, block_len), True where the token is replaced by the mask token.
            ratio: float (B, n_blocks), the mask probability each masked token's loss is divided by (1/t weighting).
        """
        ...


def _mask_count(t: torch.Tensor, block_len: int) -> torch.Tensor:
    """k = round(t * L'), at least 1 and at most L': (B,) long."""
    return torch.clamp(torch.round(t * block_len), 1, block_len).long()


def _top_k(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the k[b] largest scores along the last dim of (B, nb, L')."""
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)  # rank 0 = largest
    return rank < k[:, None, None]


@dataclass(frozen=True)
class Uniform:
    """Exactly ``round(t * L')`` positions per block (at least 1), uniformly at random."""

    def sample(self, t, n_blocks, block_len, generator):
        u = torch.rand(t.shape[0], n_blocks, block_len, generator=generator, device=t.device)
        k = _mask_count(t, block_len)
        ratio = (k.float() / block_len)[:, None].expand(-1, n_blocks)
        return _top_k(u, k), ratio


@dataclass(frozen=True)
class Bernoulli:
    """Each position masked independently with probability t (MDLM / LLaDA)."""

    def sample(self, t, n_blocks, block_len, generator):
        u = torch.rand(t.shape[0], n_blocks, block_len, generator=generator, device=t.device)
        return u < t[:, None, None], t[:, None].expand(-1, n_blocks)


@dataclass(frozen=True)
class PositionDependent:
    """Efficient-DLM's schedule: later in-block positions are masked more often, the ratio stays t.

    Draws ``k = round(t * L')`` positions per block without replacement with weights
    ``w_i = exp(beta * (1 - t) * i)``, ``beta = sharpness * ln 2 / L'`` (so the weight doubles every
    ``L' / sharpness`` positions; the paper's lambda = 1 / sharpness = 0.1). Sampling is Gumbel-top-k on
    ``log w_i``; with sharpness 0 it is exactly :class:`Uniform`.
    """

    sharpness: float = 10.0

    def sample(self, t, n_blocks, block_len, generator):
        u = torch.rand(t.shape[0], n_blocks, block_len, generator=generator, device=t.device)
        gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))  # monotone in u: same order as Uniform's scores
        beta = self.sharpness * math.log(2.0) / block_len
        pos = torch.arange(block_len, device=t.device, dtype=u.dtype)
        log_w = beta * (1.0 - t)[:, None, None] * pos  # (B, 1, L')
        k = _mask_count(t, block_len)
        ratio = (k.float() / block_len)[:, None].expand(-1, n_blocks)
        return _top_k(log_w + gumbel, k), ratio


SCHEDULES = {
    "uniform": lambda cfg: Uniform(),
    "bernoulli": lambda cfg: Bernoulli(),
    "position_dependent": lambda cfg: PositionDependent(sharpness=cfg.sharpness),
}


def make_schedule(cfg) -> Schedule:
    """The schedule a :class:`edlm.config.DiffusionConfig` names."""
    return SCHEDULES[cfg.schedule](cfg)
