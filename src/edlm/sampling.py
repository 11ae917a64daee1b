"""What every decoding mode (diffusion, AR, speculative) shares: checking prompts and settings, choosing tokens,
the result types.

``choose`` turns logits into tokens and their probabilities (greedy, or temperature / top-p sampling);
``choose_rows`` does it for a batch where each row samples from its own generator, so a row's draws never depend
on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from edlm.config import DecodeConfig
from edlm.errors import EdlmError


@dataclass
class DecodeStats:
    forwards: int = 0
    """Model forward passes (a batched forward counts once)."""
    tokens: int = 0
    """Generated tokens summed over rows (up to and including EOS)."""
    seconds: float = 0.0
    """Wall time of the call."""
    rows: int = 1
    """Prompts in the call."""
    accepted: int = 0
    """Draft tokens accepted (speculative decoding)."""
    verifies: int = 0
    """Forwards that verified a non-empty draft."""

    @property
    def tokens_per_forward(self) -> float:
        """Tokens committed per forward, per row (1.0 for AR decoding)."""
        return self.tokens / max(self.forwards * self.rows, 1)

    @property
    def accepted_per_verify(self) -> float:
        """Mean accepted draft tokens per verify of a non-empty draft."""
        return self.accepted / max(self.verifies, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class DecodeOutput:
    sequences: list[list[int]]
    """Generated ids per prompt (prompt excluded; ends with EOS when one was produced)."""
    stats: DecodeStats = field(default_factory=DecodeStats)


def probabilities(logits: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """The sampling distribution (n, V) of logits (n, V): softmax(logits / temperature), cut to the top-p nucleus."""
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, cfg: DecodeConfig, generator: torch.Generator | None):
    """Tokens and their confidence from logits (n, V): greedy, or temperature / top-p sampling."""
    if cfg.temperature == 0.0:
        conf, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return tokens, conf
    probs = probabilities(logits, cfg)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def choose_rows(logits: torch.Tensor, open_: torch.Tensor, cfg: DecodeConfig, generators: list[torch.Generator]):
    """Tokens and confidences (R, B) at the open positions of a block's logits (R, B, V). Greedy is batched;
    sampling goes row by row through each row's own generator, drawing for its open positions only, so a row's
    draws never depend on its batch neighbours."""
    if cfg.temperature == 0.0:
        conf, tokens = torch.softmax(logits.float(), dim=-1).max(dim=-1)
        return tokens, conf
    tokens = torch.zeros(open_.shape, dtype=torch.long, device=logits.device)
    conf = torch.zeros(open_.shape, dtype=torch.float, device=logits.device)
    for r, g in enumerate(generators):
        if bool(open_[r].any()):
            tokens[r, open_[r]], conf[r, open_[r]] = choose(logits[r, open_[r]], cfg, g)
    return tokens, conf


def row_generators(seeds: list[int] | None, cfg: DecodeConfig, rows: int, device) -> list[torch.Generator]:
    """One sampling generator per row, seeded with ``seeds[row]`` (default ``cfg.seed``): a row's draws never depend
    on its batch neighbours."""
    if seeds is not None and len(seeds) != rows:
        raise EdlmError(f"got {len(seeds)} seeds for {rows} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in (seeds or [cfg.seed] * rows)]


def pad_token_id(tokenizer) -> int:
    """The id that fills unused columns (never attended): the tokenizer's pad token, else EOS, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id or 0


def decode_block_size(dlm, cfg: DecodeConfig) -> int:
    """The decoding block size: ``cfg.block_size``, or the model's training block size."""
    block = cfg.block_size or dlm.config.block_size
    train_block = dlm.config.block_size
    if block % train_block and train_block % block:
        raise EdlmError(f"decoding block size {block} is inconsistent with the model's training block size "
                        f"{train_block}: use a multiple or a divisor of it")
    return block


def validate_prompts(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> int:
    """Check prompts against the model and settings; returns the decoding block size."""
    if not prompts:
        raise EdlmError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise EdlmError("a prompt is empty; give at least one token of text")
    block = decode_block_size(dlm, cfg)
    limit = getattr(dlm.model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + cfg.max_new_tokens + block > limit:
        raise EdlmError(f"prompt ({longest} tokens) + max_new_tokens ({cfg.max_new_tokens}) does not fit the "
                        f"model's context of {limit} tokens; shorten the prompt or lower max_new_tokens")
    return block
