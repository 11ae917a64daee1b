"""Block-by-block parallel decoding of a DiffusionLM.

The decoder knows only token ids. A block starts all-mask (blocks are aligned to absolute positions as in
training, so the prompt's last partial block is completed first); each step predicts every masked position of the
block in parallel and a commit policy chooses which predictions become final. When the block has no mask left the
next block starts. Decoding stops at EOS or ``max_new_tokens``.

This module's reference decoder recomputes the whole sequence at every step (``use_cache=False`` semantics); it is
exact with respect to the training attention pattern and is the yardstick for faster decoders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from edlm.config import DecodeConfig
from edlm.errors import EdlmError
from edlm.masks import inference_mask_mod

# A policy maps the confidences of the still-masked positions (n,) to a bool selection (n,) with >= 1 True.
Policy = Callable[[torch.Tensor, DecodeConfig], torch.Tensor]


def _at_least_one(select: torch.Tensor, conf: torch.Tensor) -> torch.Tensor:
    select = select.clone()
    select[conf.argmax()] = True
    return select


def threshold_policy(conf: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """Commit every position whose confidence is at least ``cfg.threshold``, and always the most confident."""
    return _at_least_one(conf >= cfg.threshold, conf)


def fixed_policy(conf: torch.Tensor, cfg: DecodeConfig) -> torch.Tensor:
    """Commit the ``cfg.tokens_per_step`` most confident positions."""
    k = min(cfg.tokens_per_step, conf.numel())
    select = torch.zeros_like(conf, dtype=torch.bool)
    select[conf.topk(k).indices] = True
    return select


POLICIES: dict[str, Policy] = {"threshold": threshold_policy, "fixed": fixed_policy}


@dataclass
class DecodeStats:
    forwards: int = 0
    """Model forward passes (all rows of a batch count once)."""
    tokens: int = 0
    """Generated tokens, summed over rows (up to and including EOS)."""
    seconds: float = 0.0
    """Wall time of the call."""

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / max(self.forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class DecodeOutput:
    sequences: list[list[int]]
    """Generated ids per prompt (prompt excluded; ends at and includes EOS when one was produced)."""
    stats: DecodeStats = field(default_factory=DecodeStats)


def choose(logits: torch.Tensor, cfg: DecodeConfig, generator: torch.Generator | None):
    """Predicted tokens and their confidence from logits (n, V): greedy, or temperature / top-p sampling."""
    probs = torch.softmax(logits.float(), dim=-1)
    if cfg.temperature == 0.0:
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def validate(dlm, prompt: list[int], cfg: DecodeConfig) -> int:
    """Check a prompt and settings; returns the decoding block size."""
    if len(prompt) == 0:
        raise EdlmError("the prompt is empty; give at least one token of text")
    block = cfg.block_size or dlm.config.block_size
    train_block = dlm.config.block_size
    if block % train_block and train_block % block:
        raise EdlmError(f"decoding block size {block} is inconsistent with the model's training block size "
                        f"{train_block}: use a multiple or a divisor of it")
    if cfg.policy not in POLICIES:
        raise EdlmError(f"unknown decoding policy {cfg.policy!r}; choose one of {sorted(POLICIES)}")
    limit = getattr(dlm.model.config, "max_position_embeddings", None)
    if limit is not None and len(prompt) + cfg.max_new_tokens > limit:
        raise EdlmError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the model's "
                        f"context of {limit} tokens; shorten the prompt or lower max_new_tokens")
    return block


@torch.no_grad()
def generate_uncached(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> DecodeOutput:
    """Reference decoder: recompute the full sequence each step. Prompts are decoded one at a time."""
    stats = DecodeStats()
    start = time.perf_counter()
    generator = torch.Generator(device=dlm.device).manual_seed(cfg.seed)
    eos = dlm.tokenizer.eos_token_id
    policy = POLICIES[cfg.policy]
    results = []
    for prompt in prompts:
        block = validate(dlm, prompt, cfg)
        x = torch.tensor([prompt], device=dlm.device)  # (1, T)
        produced = 0
        finished = False
        while produced < cfg.max_new_tokens and not finished:
            block_start = (x.shape[1] // block) * block
            n_new = min(block_start + block - x.shape[1], cfg.max_new_tokens - produced)
            first_new = x.shape[1]
            x = torch.cat([x, torch.full((1, n_new), dlm.mask_id, device=x.device)], dim=1)
            while True:
                masked = (x[0, first_new:] == dlm.mask_id).nonzero().squeeze(-1) + first_new  # (n,)
                if masked.numel() == 0:
                    break
                length = x.shape[1]
                mask_mod = inference_mask_mod(block, dlm.pattern.causal_in_block, dlm.config.clean_causal,
                                              noisy_start=block_start)
                attn = dlm.attention_mask(mask_mod, length, length, key=("infer", block, block_start, length))
                keep = masked - 1 if dlm.config.token_shift else masked
                logits = dlm.run(x, torch.arange(length, device=x.device)[None], attn, keep=keep).logits[0]
                stats.forwards += 1
                logits[:, dlm.mask_id] = float("-inf")  # never predict the mask itself
                tokens, conf = choose(logits, cfg, generator)
                select = policy(conf, cfg)
                x[0, masked[select]] = tokens[select]
            produced += n_new
            new = x[0, len(prompt):].tolist()
            if eos is not None and eos in new:
                finished = True
        new = x[0, len(prompt):].tolist()
        if eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        new = new[: cfg.max_new_tokens]
        stats.tokens += len(new)
        results.append(new)
    stats.seconds = time.perf_counter() - start
    return DecodeOutput(sequences=results, stats=stats)


def generate(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> DecodeOutput:
    """Decode token-id prompts with a DiffusionLM (see module docstring)."""
    return generate_uncached(dlm, prompts, cfg)
