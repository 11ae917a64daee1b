"""Block-by-block parallel decoding of a DiffusionLM.

The decoder knows only token ids. Blocks are aligned to absolute positions 0, B, 2B, ... as in training, so the
prompt's last partial block is completed first. A block starts all-mask after the prompt; every step predicts all
its masked positions in parallel and a commit policy picks which predictions become final (at least one per
step). When a block has no mask left it becomes context for the next one. Decoding stops at EOS or
``max_new_tokens``.

Batching: each row is left-padded by a whole number of blocks so that every row's *current* block sits in the same
columns. All rows then move through blocks in lockstep; pads are never attended (a pad only sees itself, so no
NaN appears) and position ids are each row's own absolute positions, so padding never changes a row's result.

Two steppers compute a block's logits over the same layout:
    ``FullStepper``   recomputes the whole sequence every step (the reference);
    ``CachedStepper`` keeps keys/values of finished blocks in a ``DynamicCache``. A finished block is re-encoded
                      as clean context in the same forward as the first step of the next block, so caching costs
                      no extra forward.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from edlm.ar import iter_ar
from edlm.compat import new_cache
from edlm.config import DecodeConfig
from edlm.errors import EdlmError
from edlm.masks import dense_mask, inference_mask_mod, padded_decoding_mask, to_attention_mask
from edlm.sampling import DecodeOutput, DecodeStats, choose_rows, pad_token_id, row_generators, validate_prompts
from edlm.speculative import iter_speculative

# A policy maps the confidences of a batch's block (R, B), the positions still open (R, B) and the predictive
# entropies (R, B; None unless the policy is in NEEDS_ENTROPY) to the positions to commit (R, B), at least one per
# row that has an open position. Confidence and entropy at closed positions are meaningless.
Policy = Callable[[torch.Tensor, torch.Tensor, DecodeConfig, torch.Tensor | None], torch.Tensor]


def _ranks(conf: torch.Tensor, open_: torch.Tensor) -> torch.Tensor:
    """(R, B) rank of each open position by confidence within its row (0 = most confident); closed rank last."""
    order = conf.masked_fill(~open_, -1.0).argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def threshold_policy(conf: torch.Tensor, open_: torch.Tensor, cfg: DecodeConfig, entropy=None) -> torch.Tensor:
    """Commit every open position whose confidence is at least ``cfg.threshold``, and always the most confident."""
    best = conf.masked_fill(~open_, -1.0).argmax(dim=-1, keepdim=True)  # (R, 1)
    select = open_ & (conf >= cfg.threshold)
    return select.scatter(1, best, open_.gather(1, best))


def fixed_policy(conf: torch.Tensor, open_: torch.Tensor, cfg: DecodeConfig, entropy=None) -> torch.Tensor:
    """Commit the ``cfg.tokens_per_step`` most confident open positions."""
    return open_ & (_ranks(conf, open_) < cfg.tokens_per_step)


def left_to_right_policy(conf: torch.Tensor, open_: torch.Tensor, cfg: DecodeConfig, entropy=None) -> torch.Tensor:
    """Commit the leftmost ``cfg.tokens_per_step`` open positions (AR order; a sanity baseline)."""
    return open_ & (open_.cumsum(dim=-1) <= cfg.tokens_per_step)


def _entropy_prefix(entropy: torch.Tensor, open_: torch.Tensor, bound: float, less_largest: bool) -> torch.Tensor:
    """Order the open positions from the lowest predictive entropy up and commit the longest prefix whose entropies
    (less the largest of them when ``less_largest``) sum to at most ``bound``; the first position always goes."""
    order = entropy.masked_fill(~open_, float("inf")).argsort(dim=-1, stable=True)  # open positions first
    h = entropy.masked_fill(~open_, 0.0).gather(1, order)
    total = h.cumsum(dim=-1) - h if less_largest else h.cumsum(dim=-1)  # sorted: the prefix's largest is its last
    first = torch.arange(h.shape[1], device=h.device)[None] == 0
    take = open_.gather(1, order) & ((total <= bound) | first)
    return torch.zeros_like(open_).scatter(1, order, take)


def entropy_policy(conf: torch.Tensor, open_: torch.Tensor, cfg: DecodeConfig, entropy: torch.Tensor) -> torch.Tensor:
    """Entropy-bounded unmasking, the EB-sampler of Ben-Hamu et al. (2025): the longest prefix (by entropy) whose
    entropies less the largest sum to at most ``cfg.entropy_bound`` nats. Unlike a fixed threshold, the number
    committed adapts to how sure the whole set is; the largest entropy is free (one position alone is an AR step)."""
    return _entropy_prefix(entropy, open_, cfg.entropy_bound, less_largest=True)


def entropy_sum_policy(conf: torch.Tensor, open_: torch.Tensor, cfg: DecodeConfig, entropy: torch.Tensor,
                       ) -> torch.Tensor:
    """As ``entropy`` but the largest entropy counts too: the committed positions' entropies sum to at most
    ``cfg.entropy_bound`` nats (always at least one position)."""
    return _entropy_prefix(entropy, open_, cfg.entropy_bound, less_largest=False)


POLICIES: dict[str, Policy] = {"threshold": threshold_policy, "fixed": fixed_policy,
                               "left_to_right": left_to_right_policy, "entropy": entropy_policy,
                               "entropy_sum": entropy_sum_policy}
NEEDS_ENTROPY = {"entropy", "entropy_sum"}


def validate(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> int:
    """Check prompts and settings; returns the decoding block size."""
    if getattr(dlm, "speculative_only", False) and cfg.mode != "speculative":
        raise EdlmError(f"mode {cfg.mode!r} is not available here: a source with a block drafter decodes only in "
                        "mode 'speculative' (the source's own text)")
    if cfg.mode == "diffusion" and cfg.policy not in POLICIES:
        raise EdlmError(f"unknown decoding policy {cfg.policy!r}; choose one of {sorted(POLICIES)}")
    return validate_prompts(dlm, prompts, cfg)


# ---------------------------------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Left-padded token matrix in which all rows' current blocks share columns."""

    tokens: torch.Tensor
    """(R, C) long: pads, prompts, generated tokens and masks."""
    pad: torch.Tensor
    """(R,) long: left pad of each row, a multiple of the block size."""
    prompt_len: list[int]
    block: int
    _masks: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, prompts: list[list[int]], block: int, pad_id: int, device) -> Layout:
        full_blocks = [len(p) // block for p in prompts]
        top = max(full_blocks)
        pads = [(top - k) * block for k in full_blocks]
        width = max(pad + len(p) for pad, p in zip(pads, prompts))
        tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        for r, (pad, p) in enumerate(zip(pads, prompts)):
            tokens[r, pad:pad + len(p)] = torch.tensor(p)
        return cls(tokens.to(device), torch.tensor(pads, device=device), [len(p) for p in prompts], block)

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """(R, stop - start) absolute position ids of columns [start, stop); pads get 0."""
        cols = torch.arange(start, stop, device=self.tokens.device)[None]
        return (cols - self.pad[:, None]).clamp_min(0)

    def attention(self, dlm, q_start: int, q_stop: int, noisy_start: int):
        """4D mask (R, 1, Q, K) for queries [q_start, q_stop) over keys [0, q_stop); memoised (every step of a
        block uses the same one)."""
        key = (q_start, q_stop, noisy_start)
        if key not in self._masks:
            self._masks = {key: self._attention(dlm, q_start, q_stop, noisy_start)}  # keep only the latest
        return self._masks[key]

    def _attention(self, dlm, q_start: int, q_stop: int, noisy_start: int):
        rule = inference_mask_mod(self.block, dlm.pattern.causal_in_block, dlm.config.clean_causal,
                                  noisy_start=noisy_start, q_offset=q_start)
        mod = padded_decoding_mask(rule, self.pad, q_offset=q_start)
        mask = dense_mask(mod, q_stop - q_start, q_stop, self.tokens.device, rows=self.tokens.shape[0])  # (R, Q, K)
        return to_attention_mask(mask, dlm.model.get_input_embeddings().weight.dtype, dlm.attn_implementation)


# ---------------------------------------------------------------------------------------------------- steppers


class FullStepper:
    """Recomputes every column up to the end of the current block at each step (no cache)."""

    def __init__(self, dlm, layout: Layout):
        self.dlm, self.layout = dlm, layout
        self.forwards = 0

    def block_logits(self, start: int, cols: torch.Tensor) -> torch.Tensor:
        """Logits (R, n, V) at the n absolute columns ``cols`` (sorted, in [start - 1, start + block); column
        start - 1 is the edge a shifted model predicts the block's first token from)."""
        lay, stop = self.layout, start + self.layout.block
        attn = lay.attention(self.dlm, 0, stop, noisy_start=start)
        logits = self.dlm.run(lay.tokens[:, :stop], lay.positions(0, stop), attn, keep=cols,
                              noisy=slice(start, stop)).logits
        self.forwards += 1
        return logits


class CachedStepper:
    """Keys/values of finished columns live in a DynamicCache; a finished block is encoded lazily, fused with the
    next block's first step."""

    def __init__(self, dlm, layout: Layout):
        self.dlm, self.layout = dlm, layout
        self.cache = new_cache(dlm.model, layout.tokens.shape[0])
        self.forwards = 0
        self.cached = 0  # columns whose keys/values are in the cache
        self.edge: tuple[int, torch.Tensor] | None = None  # (column, logits (R, V)) of the last block's edge

    def block_logits(self, start: int, cols: torch.Tensor) -> torch.Tensor:
        """As :meth:`FullStepper.block_logits`; the first step of a block also encodes everything before it that
        is not cached yet (the prompt on the first call, the finished block afterwards) as clean context."""
        lay, stop = self.layout, start + self.layout.block
        q_start = self.cached
        edge = int(cols[0]) == start - 1  # a shifted model's first open position is the block start
        if edge and q_start > start - 1:  # the edge column is cached: its logits came with the fused forward
            assert self.edge is not None and self.edge[0] == start - 1
            cols = cols[1:]
        attn = lay.attention(self.dlm, q_start, stop, noisy_start=start)
        out = self.dlm.run(lay.tokens[:, q_start:stop], lay.positions(q_start, stop), attn, keep=cols - q_start,
                           past_key_values=self.cache, use_cache=True, noisy=slice(start - q_start, stop - q_start))
        self.forwards += 1
        self.cache.crop(-(stop - start))  # drop the block's (noisy) keys/values; keep the clean prefix
        self.cached = start
        logits = out.logits  # (R, n, V)
        if edge and q_start <= start - 1:
            self.edge = (start - 1, logits[:, 0])
        elif edge:
            logits = torch.cat([self.edge[1][:, None], logits], dim=1)
        return logits


# ---------------------------------------------------------------------------------------------------- the loop


def _block_areas(layout: Layout, start: int, cfg: DecodeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, B) bool pair for the block at ``start``: columns after the row's prompt (``after``), and those of them
    inside max_new_tokens (``budget``, the positions the row may generate into)."""
    cols = torch.arange(start, start + layout.block, device=layout.tokens.device)[None]
    first_new = layout.pad[:, None] + torch.tensor(layout.prompt_len, device=layout.tokens.device)[:, None]
    after = cols >= first_new
    return after, after & (cols < first_new + cfg.max_new_tokens)


def _close_after_eos(blk: torch.Tensor, open_: torch.Tensor, budget: torch.Tensor, eos: int) -> None:
    """Once a row's EOS is final with nothing open before it, the rest of its block is irrelevant: close it."""
    is_eos = (blk == eos) & budget & ~open_  # (R, B)
    has = is_eos.any(dim=-1, keepdim=True)
    first = is_eos.int().argmax(dim=-1, keepdim=True)  # first committed EOS (0 when none)
    cols = torch.arange(blk.shape[1], device=blk.device)[None]
    undecided_before = (open_ & (cols < first)).any(dim=-1, keepdim=True)
    open_ &= ~(has & ~undecided_before & (cols >= first))


def iter_diffusion(dlm, prompts: list[list[int]], cfg: DecodeConfig,
                   should_stop: Callable[[int], bool] | None = None, seeds: list[int] | None = None,
                   ) -> Iterator[tuple[list[list[int]], DecodeStats]]:
    """The block decoder (``mode="diffusion"``), yielding after every finished block: (new tokens per row finalised
    in that block, running stats).

    The new tokens of a finished row end with EOS; rows that are done yield empty lists. ``should_stop(row)`` is
    asked at every block boundary; a row for which it returns True is finished (a cancelled request, a stop string
    seen by the caller) and costs nothing further but its share of the batched forward. Each row samples from its
    own generator seeded with ``seeds[row]`` (default ``cfg.seed``), so a row's output never depends on the others.

    Positions of a block past a row's ``max_new_tokens`` hold the mask token and are never committed: the
    bidirectional attention inside the block sees exactly what it saw in training (masks), never a pad.
    """
    block = validate(dlm, prompts, cfg)
    t0 = time.perf_counter()
    device = dlm.device
    tok = dlm.tokenizer
    eos = None if cfg.ignore_eos else tok.eos_token_id
    pad_id = pad_token_id(tok)
    layout = Layout.build(prompts, block, pad_id, device)
    rows = len(prompts)
    generators = row_generators(seeds, cfg, rows, device)
    policy = POLICIES[cfg.policy]
    start = int(layout.pad[0]) + (layout.prompt_len[0] // block) * block  # same column for every row
    stepper = CachedStepper(dlm, layout) if cfg.use_cache else FullStepper(dlm, layout)
    stats = DecodeStats(rows=rows)
    produced = [0] * rows
    done = torch.zeros(rows, 1, dtype=torch.bool, device=device)
    shift = dlm.config.token_shift

    while True:
        if should_stop is not None:
            done |= torch.tensor([[should_stop(r)] for r in range(rows)], device=device)
        if bool(done.all()):
            return
        # Open the next block: masks after each live row's prompt (its prompt tail stays in place), the pad token
        # in finished rows; extend the matrix when needed.
        need = start + block - layout.tokens.shape[1]
        if need > 0:
            layout.tokens = torch.cat([layout.tokens, torch.full((rows, need), pad_id, device=device)], dim=1)
        after, budget = _block_areas(layout, start, cfg)  # (R, B) each
        budget &= ~done
        blk = layout.tokens[:, start:start + block]
        blk[after & ~done] = dlm.mask_id
        open_ = budget.clone()  # positions still to decide
        tokens = torch.zeros_like(blk)
        conf = torch.full(blk.shape, -1.0, device=device)
        entropy = torch.zeros(blk.shape, device=device) if cfg.policy in NEEDS_ENTROPY else None
        while bool(open_.any()):
            # Logits only where some row still has a mask: the LM head is a large share of a step on small models.
            # A shifted model predicts token i from the state at i - 1 (column start - 1 for the block's first).
            cols = open_.any(dim=0).nonzero().squeeze(1)  # (n,) block-relative, sorted
            logits = stepper.block_logits(start, start + cols - int(shift))  # (R, n, V)
            logits[..., dlm.mask_id] = float("-inf")
            tokens[:, cols], conf[:, cols] = choose_rows(logits, open_[:, cols], cfg, generators)  # (R, n) each
            if entropy is not None:  # of the model's distribution, whatever the sampling temperature
                entropy[:, cols] = torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(dim=-1)
            pick = policy(conf, open_, cfg, entropy)
            blk[pick] = tokens[pick]
            open_ &= ~pick
            if eos is not None:
                _close_after_eos(blk, open_, budget, eos)
        stats.forwards = stepper.forwards
        finished_now = []
        for r, (new, live) in enumerate(zip(blk.tolist(), budget.tolist())):
            new = [t for t, keep in zip(new, live) if keep]
            if eos is not None and eos in new:
                new = new[: new.index(eos) + 1]
                done[r] = True
            produced[r] += len(new)
            if produced[r] >= cfg.max_new_tokens:
                done[r] = True
            finished_now.append(new)
        stats.tokens = sum(produced)
        stats.seconds = time.perf_counter() - t0
        start += block
        yield finished_now, stats


def _iter_ar(dlm, prompts: list[list[int]], cfg: DecodeConfig, should_stop: Callable[[int], bool] | None = None,
             seeds: list[int] | None = None) -> Iterator[tuple[list[list[int]], DecodeStats]]:
    """``mode="ar"``: the converted weights decoded causally with a KV cache, the mask token never produced."""
    validate_prompts(dlm, prompts, cfg)
    tok = dlm.tokenizer
    return iter_ar(dlm.model, prompts, cfg, None if cfg.ignore_eos else tok.eos_token_id, pad_id=tok.pad_token_id,
                   banned=[dlm.mask_id], should_stop=should_stop, seeds=seeds)


# Decoding modes (``DecodeConfig.mode``): each yields (new tokens per row, running stats) after every step.
MODES = {"diffusion": iter_diffusion, "ar": _iter_ar, "speculative": iter_speculative}


def iter_steps(dlm, prompts: list[list[int]], cfg: DecodeConfig,
                should_stop: Callable[[int], bool] | None = None, seeds: list[int] | None = None,
                ) -> Iterator[tuple[list[list[int]], DecodeStats]]:
    """Decode in ``cfg.mode``, yielding after every step (a finished block for ``diffusion``, a token for ``ar``,
    a verified forward for ``speculative``): (new tokens per row finalised in that step, running stats).

    Rows that are done yield empty lists; ``should_stop(row)`` is asked between steps, and a row for which it
    returns True is finished. Row ``r`` samples from its own generator seeded with ``seeds[r]`` (default
    ``cfg.seed``), so a row's output never depends on the others.
    """
    return MODES[cfg.mode](dlm, prompts, cfg, should_stop=should_stop, seeds=seeds)


@torch.no_grad()
def generate(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> DecodeOutput:
    """Decode token-id prompts with a DiffusionLM in ``cfg.mode``; all rows in one batch."""
    sequences: list[list[int]] = [[] for _ in prompts]
    stats = DecodeStats(rows=len(prompts))
    for new, stats in iter_steps(dlm, prompts, cfg):  # noqa: B007 (the last stats are the call's)
        for seq, part in zip(sequences, new):
            seq.extend(part)
    return DecodeOutput(sequences=sequences, stats=stats)


def stream(dlm, prompt: list[int], cfg: DecodeConfig) -> Iterator[list[int]]:
    """Yield the new token ids of one prompt block by block as they are finalised."""
    with torch.no_grad():
        for new, _ in iter_steps(dlm, [prompt], cfg):
            if new[0]:
                yield new[0]
