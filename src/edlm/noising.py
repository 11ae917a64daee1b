"""Forward (noising) process: clean tokens x0 -> noisy tokens xt, from a schedule and an explicit generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edlm.config import DiffusionConfig
from edlm.schedules import make_schedule


@dataclass
class Noised:
    """One noised batch."""

    x0: torch.Tensor
    """(B, L) long: the clean tokens (rows repeated with complementary masking)."""
    xt: torch.Tensor
    """(B, L) long: x0 with masked positions replaced by the mask token id."""
    masked: torch.Tensor
    """(B, L) bool: True where xt holds the mask token."""
    ratio: torch.Tensor
    """(B, L) float: the mask probability of each position (the 1/t loss weight's t)."""
    t: torch.Tensor
    """(B,) float: the sampled noise level."""


def sample_t(batch: int, eps: float, generator: torch.Generator | None, device: torch.device | str = "cpu"):
    """t ~ U(eps, 1]: (B,)."""
    return 1.0 - (1.0 - eps) * torch.rand(batch, generator=generator, device=device)


def noise(x0: torch.Tensor, cfg: DiffusionConfig, mask_id: int, generator: torch.Generator | None,
          t: torch.Tensor | None = None) -> Noised:
    """Mask x0 (B, L) block by block with the configured schedule; L must be a multiple of the block size.

    With ``cfg.complementary`` the result has 2B rows: the masks and their complements.
    """
    batch, length = x0.shape
    block = cfg.block_size
    if length % block:
        raise ValueError(f"sequence length {length} is not a multiple of block size {block}")
    n_blocks = length // block
    if t is None:
        t = sample_t(batch, cfg.eps, generator, x0.device)
    masked, ratio = make_schedule(cfg).sample(t, n_blocks, block, generator)  # (B, nb, L'), (B, nb)
    masked = masked.reshape(batch, length)
    ratio = ratio[:, :, None].expand(-1, -1, block).reshape(batch, length)
    if cfg.complementary:
        x0 = torch.cat([x0, x0])
        masked = torch.cat([masked, ~masked])
        ratio = torch.cat([ratio, (1.0 - ratio).clamp_min(cfg.eps)])
        t = torch.cat([t, 1.0 - t])
    xt = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return Noised(x0=x0, xt=xt, masked=masked, ratio=ratio, t=t)


def sample_generator(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one training sample: noise depends only on (seed, sample index), not on how the batch is
    split across processes or where a run was resumed."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + index) % (2**63 - 1))
    return g


def noise_samples(x0: torch.Tensor, cfg: DiffusionConfig, mask_id: int, seed: int,
                  sample_ids: list[int]) -> Noised:
    """Noise each row of x0 (B, L) with its own generator from (seed, sample id); see :func:`sample_generator`."""
    parts = [noise(x0[i : i + 1], cfg, mask_id, sample_generator(seed, sid, x0.device))
             for i, sid in enumerate(sample_ids)]
    return Noised(*(torch.cat([getattr(p, f) for p in parts]) for f in ("x0", "xt", "masked", "ratio", "t")))
