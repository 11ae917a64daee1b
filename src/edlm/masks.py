"""Attention patterns as mask predicates ``(b, h, q_idx, kv_idx) -> bool``.

A predicate takes broadcastable integer tensors and returns a bool tensor (True = may attend), so one function
serves three uses: a brute-force reference (Python ints through ``torch.tensor``), a dense boolean mask for SDPA
(CPU path) and a sparse flex-attention ``BlockMask`` (GPU path). Predicates are built by small factories that
capture the sequence length ``n`` and ``block`` size; nothing else is closed over.

Training sequences of patterns with a clean copy are ``[xt ; x0]`` of length 2n: query/key index ``i < n`` is the
noisy token at position ``i``, ``i >= n`` the clean token at position ``i - n``.

Decoding masks are composed from the same kind of predicates, in the manner of transformers' ``masking_utils``:
``and_masks`` / ``or_masks`` combine them, ``self_only`` is the column a query occupies, and per-row tables
(position, validity) are read by indexing with ``b``, so one predicate covers a whole left-padded batch:
:func:`padded_decoding_mask` for the block decoder and :func:`speculative_mask` for the speculative step.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def block_causal_clean(n: int, block: int, clean_causal: bool = False) -> MaskMod:
    """Block diffusion with clean context over ``[xt ; x0]`` (the paper's pattern; BD3-LM, Fast-dLLM v2).

    Example, n=4, block=2 (rows query, columns key; ``x`` attends)::

                  noisy     clean
                 0 1 2 3 | 0 1 2 3
        noisy 0  x x . . | . . . .     same noisy block, both directions
        noisy 1  x x . . | . . . .
        noisy 2  . . x x | x x . .     + the clean copy of strictly earlier blocks
        noisy 3  . . x x | x x . .
        clean 0  . . . . | x x . .     clean copy: block-causal
        clean 1  . . . . | x x . .     (with clean_causal: causal, clean 0 does not see clean 1)
        clean 2  . . . . | x x x x
        clean 3  . . . . | x x x x
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_noisy, kv_noisy = q < n, kv < n
        q_pos, kv_pos = q % n, kv % n
        q_blk, kv_blk = q_pos // block, kv_pos // block
        noisy_noisy = q_noisy & kv_noisy & (q_blk == kv_blk)
        noisy_clean = q_noisy & ~kv_noisy & (kv_blk < q_blk)
        clean_ok = (kv_pos <= q_pos) if clean_causal else (kv_blk <= q_blk)
        clean_clean = ~q_noisy & ~kv_noisy & clean_ok
        return noisy_noisy | noisy_clean | clean_clean

    return mask_mod


def noisy_over_clean(n: int, block: int) -> MaskMod:
    """The noisy rows of :func:`block_causal_clean` with the clean keys first: queries are the n noisy tokens, keys
    ``[x0 ; xt]`` (index ``kv < n`` the clean token at ``kv``, ``kv >= n`` the noisy one at ``kv - n``). A gated
    model's training computes the clean copy beforehand (frozen, no backward) and passes it as a KV cache.

    Example, n=4, block=2::

                  clean     noisy
                 0 1 2 3 | 0 1 2 3
        noisy 0  . . . . | x x . .
        noisy 1  . . . . | x x . .
        noisy 2  x x . . | . . x x
        noisy 3  x x . . | . . x x
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv_clean = kv < n
        q_blk, kv_blk = q // block, (kv % n) // block
        return (kv_clean & (kv_blk < q_blk)) | (~kv_clean & (kv_blk == q_blk))

    return mask_mod


def block_causal_noisy(n: int, block: int, clean_causal: bool = False) -> MaskMod:
    """Block-causal over the noisy sequence alone (no clean copy); n=4, block=2::

        x x . .
        x x . .
        x x x x
        x x x x
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (kv // block) <= (q // block)

    return mask_mod


def bidirectional(n: int, block: int, clean_causal: bool = False) -> MaskMod:
    """Every token sees every token (Dream / DiffuLLaMA-style conversion); no clean copy."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return (q >= 0) & (kv >= 0)

    return mask_mod


def causal(n: int, block: int, clean_causal: bool = False) -> MaskMod:
    """Plain AR attention, ``kv <= q`` (the sanity baseline); no clean copy."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        return kv <= q

    return mask_mod


@dataclass(frozen=True)
class Pattern:
    """A registered attention pattern."""

    name: str
    build: Callable[[int, int, bool], MaskMod]
    """Factory ``(n, block, clean_causal) -> predicate`` over the training sequence."""
    clean_copy: bool
    """True: the training input is ``[xt ; x0]`` (length 2n); False: ``xt`` alone."""
    causal_in_block: bool = False
    """True: decoding attends causally inside the block too (only for ``causal``)."""


PATTERNS: dict[str, Pattern] = {
    "block_causal_clean": Pattern("block_causal_clean", block_causal_clean, clean_copy=True),
    "block_causal_noisy": Pattern("block_causal_noisy", block_causal_noisy, clean_copy=False),
    "bidirectional": Pattern("bidirectional", bidirectional, clean_copy=False),
    "causal": Pattern("causal", causal, clean_copy=False, causal_in_block=True),
}


def inference_mask_mod(block: int, causal_in_block: bool, clean_causal: bool, noisy_start: int,
                       q_offset: int = 0) -> MaskMod:
    """Predicate for decoding one sequence whose tokens before ``noisy_start`` are final (clean).

    Query index ``q`` is at absolute position ``q + q_offset`` (queries may be only the current block, keys the
    whole cache). Clean queries attend as the clean copy did in training; queries at or after ``noisy_start``
    (the block being decoded) attend to every earlier block and, both ways, inside their own block.
    """

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q_abs = q + q_offset
        blockwise = (kv // block) <= (q_abs // block)
        tokenwise = kv <= q_abs
        noisy_rule = tokenwise if causal_in_block else blockwise
        clean_rule = tokenwise if (clean_causal or causal_in_block) else blockwise
        return torch.where(q_abs >= noisy_start, noisy_rule, clean_rule)

    return mask_mod


# ---------------------------------------------------------------------------------------------------- combinators


def and_masks(*mods: MaskMod) -> MaskMod:
    """A query may attend where every predicate allows it."""
    return lambda b, h, q, kv: functools.reduce(operator.and_, (m(b, h, q, kv) for m in mods))


def or_masks(*mods: MaskMod) -> MaskMod:
    """A query may attend where any predicate allows it."""
    return lambda b, h, q, kv: functools.reduce(operator.or_, (m(b, h, q, kv) for m in mods))


def self_only(kv_offset: int = 0) -> MaskMod:
    """Each query sees exactly its own column: key ``q + kv_offset`` (the keys start ``kv_offset`` cached columns
    before the queries). What a column that holds no token attends to, so that its softmax has no empty row."""
    return lambda b, h, q, kv: kv == q + kv_offset


def query_is(table: torch.Tensor) -> MaskMod:
    """The per-row query property ``table`` (R, Q) bool, broadcast over keys."""
    return lambda b, h, q, kv: table[b, q]


def negate(mod: MaskMod) -> MaskMod:
    """A query may attend where ``mod`` forbids it."""
    return lambda b, h, q, kv: ~mod(b, h, q, kv)


# ---------------------------------------------------------------------------------------------------- decoding


def padded_decoding_mask(rule: MaskMod, pad: torch.Tensor, q_offset: int = 0) -> MaskMod:
    """The block decoder's mask over a left-padded batch: ``rule`` (e.g. :func:`inference_mask_mod`) among real
    tokens, whose keys are never a row's pads (columns below ``pad[b]``); a pad query attends only to itself.
    Queries are columns ``q + q_offset`` of the layout, keys columns ``kv``."""
    real_key = lambda b, h, q, kv: kv >= pad[b]  # noqa: E731
    pad_query = lambda b, h, q, kv: q + q_offset < pad[b]  # noqa: E731
    return or_masks(and_masks(rule, real_key), and_masks(pad_query, self_only(q_offset)))


def speculative_mask(key_pos: torch.Tensor, q_pos: torch.Tensor, context_end: torch.Tensor, real_query: torch.Tensor,
                     cached: int, width: int, block: int, causal_in_block: bool) -> MaskMod:
    """The speculative step's mask. Its queries are ``width`` clean columns (the unverified tail of each row and
    its draft, to be verified causally) followed by noisy blocks of ``block`` columns (one per hypothesis, drafted
    bidirectionally); its keys are ``cached`` cached columns followed by the queries.

    Args:
        key_pos: (R, cached + Q) absolute position of every key column, -1 where it holds no token of the row.
        q_pos: (R, Q) absolute position of every query column.
        context_end: (R, Q) for a noisy query, the first position its block leaves to be drafted: it sees clean keys
            before it.
        real_query: (R, Q) False for columns that hold no token (padding, finished rows, missing hypotheses):
            they attend only to themselves.
        causal_in_block: a noisy block attends causally inside itself (the ``causal`` pattern).

    A clean query sees every clean key at or before its position (the cache holds only verified ones); a noisy
    query sees the clean keys before its block's context end, and its own block.
    """
    clean_keys = cached + width

    def clean_rule(b, h, q, kv):
        k = key_pos[b, kv]
        noisy_q = q >= width
        seen = torch.where(noisy_q, k < context_end[b, q], k <= q_pos[b, q])
        return (k >= 0) & (kv < clean_keys) & seen

    def own_block(b, h, q, kv):
        same = (q >= width) & (kv >= clean_keys) & ((kv - clean_keys) // block == (q - width) // block)
        return same & (kv - cached <= q) if causal_in_block else same

    real = query_is(real_query)
    return or_masks(and_masks(real, or_masks(clean_rule, own_block)), and_masks(negate(real), self_only(cached)))


def dense_mask(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device | str = "cpu",
               rows: int | None = None) -> torch.Tensor:
    """Evaluate a predicate on the full grid: bool tensor (q_len, kv_len), or (rows, q_len, kv_len) with ``rows``
    (``b`` runs over the rows, for predicates that read per-row tables)."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    if rows is None:
        q = torch.arange(q_len, device=device)[:, None]  # (Q, 1)
        kv = torch.arange(kv_len, device=device)[None, :]  # (1, K)
        return mask_mod(zero, zero, q, kv).expand(q_len, kv_len)
    b = torch.arange(rows, device=device)[:, None, None]  # (R, 1, 1)
    q = torch.arange(q_len, device=device)[None, :, None]  # (1, Q, 1)
    kv = torch.arange(kv_len, device=device)[None, None, :]  # (1, 1, K)
    return mask_mod(b, zero, q, kv).expand(rows, q_len, kv_len)


def to_attention_mask(mask: torch.Tensor, dtype: torch.dtype, implementation: str) -> torch.Tensor:
    """Turn a bool (Q, K) or (B, Q, K) mask into the 4D (B, 1, Q, K) form transformers passes through as is.

    SDPA takes the bool mask; eager attention adds the mask to the scores, so it gets 0 / dtype-min floats.
    """
    if mask.dim() == 2:
        mask = mask[None]
    mask = mask[:, None]  # (B, 1, Q, K)
    if implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def flex_block_mask(mask_mod: MaskMod, q_len: int, kv_len: int, device: torch.device | str):
    """Sparse flex-attention ``BlockMask`` of a predicate (GPU training path; no dense (Q, K) tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device)
