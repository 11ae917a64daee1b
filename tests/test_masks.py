import itertools

import pytest
import torch

from edlm.masks import (
    PATTERNS,
    and_masks,
    dense_mask,
    inference_mask_mod,
    or_masks,
    padded_decoding_mask,
    self_only,
    speculative_mask,
    to_attention_mask,
)


def reference(pattern: str, n: int, block: int, clean_causal: bool, q: int, kv: int) -> bool:
    """The rules of docs/method.md ("Training"), written as plain Python on one (q, kv) pair."""
    blk = lambda i: i // block  # noqa: E731
    if pattern == "block_causal_clean":
        q_noisy, kv_noisy = q < n, kv < n
        qp, kp = q % n, kv % n
        if q_noisy and kv_noisy:
            return blk(qp) == blk(kp)
        if q_noisy and not kv_noisy:
            return blk(kp) < blk(qp)
        if not q_noisy and not kv_noisy:
            return kp <= qp if clean_causal else blk(kp) <= blk(qp)
        return False
    if pattern == "block_causal_noisy":
        return blk(kv) <= blk(q)
    if pattern == "bidirectional":
        return True
    if pattern == "causal":
        return kv <= q
    raise AssertionError(pattern)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("n,block", [(4, 2), (8, 4), (12, 4), (16, 16), (6, 1), (10, 5)])
@pytest.mark.parametrize("clean_causal", [False, True])
def test_pattern_matches_brute_force(pattern, n, block, clean_causal):
    total = 2 * n if PATTERNS[pattern].clean_copy else n
    got = dense_mask(PATTERNS[pattern].build(n, block, clean_causal), total, total)
    want = torch.tensor([[reference(pattern, n, block, clean_causal, q, kv) for kv in range(total)]
                         for q in range(total)])
    assert got.dtype == torch.bool
    assert torch.equal(got, want)


def test_block_causal_clean_literal_example():
    # The picture in the docstring of edlm.masks.block_causal_clean (n=4, block=2).
    want = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(dense_mask(PATTERNS["block_causal_clean"].build(4, 2, False), 8, 8), want)


@pytest.mark.parametrize("block,noisy_start,length,q_offset", [(4, 8, 12, 0), (4, 8, 12, 8), (3, 6, 8, 0)])
def test_inference_mask_matches_brute_force(block, noisy_start, length, q_offset):
    q_len = length - q_offset
    got = dense_mask(inference_mask_mod(block, False, False, noisy_start, q_offset), q_len, length)
    for qi, kv in itertools.product(range(q_len), range(length)):
        q = qi + q_offset
        assert bool(got[qi, kv]) == (kv // block <= q // block), (q, kv)
    causal = dense_mask(inference_mask_mod(block, True, False, noisy_start, q_offset), q_len, length)
    want = torch.arange(length)[None, :] <= (torch.arange(q_len) + q_offset)[:, None]
    assert torch.equal(causal, want)


def test_inference_mask_clean_causal_prefix_is_causal_and_block_is_bidirectional():
    m = dense_mask(inference_mask_mod(4, False, True, noisy_start=8), 12, 12)
    assert not m[2, 3] and m[3, 2]  # clean prefix: causal
    assert m[8, 11] and m[11, 8]  # current block: both directions
    assert m[8, 5] and not m[5, 8]


def test_eager_mask_is_additive():
    m = torch.tensor([[True, False], [True, True]])
    eager = to_attention_mask(m, torch.float32, "eager")
    assert eager.shape == (1, 1, 2, 2)
    assert eager[0, 0, 0, 0] == 0 and eager[0, 0, 0, 1] == torch.finfo(torch.float32).min
    assert to_attention_mask(m, torch.float32, "sdpa").dtype == torch.bool


def test_combinators_and_self_only():
    lower = lambda b, h, q, kv: kv <= q  # noqa: E731
    even = lambda b, h, q, kv: kv % 2 == 0  # noqa: E731
    got_and, got_or = dense_mask(and_masks(lower, even), 4, 4), dense_mask(or_masks(lower, even), 4, 4)
    for q, kv in itertools.product(range(4), range(4)):
        assert bool(got_and[q, kv]) == (kv <= q and kv % 2 == 0)
        assert bool(got_or[q, kv]) == (kv <= q or kv % 2 == 0)
    assert torch.equal(dense_mask(self_only(3), 2, 5), torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]).bool())


@pytest.mark.parametrize("block,pads,noisy_start,q_offset,causal_in_block,clean_causal", [
    (4, [0, 4, 8], 12, 0, False, False), (4, [8, 0], 12, 12, False, False), (2, [2, 0, 4], 6, 4, True, False),
    (3, [0, 3], 6, 0, False, True)])
def test_padded_decoding_mask_matches_brute_force(block, pads, noisy_start, q_offset, causal_in_block, clean_causal):
    """The block decoder's rule on a left-padded batch, one (row, query, key) at a time: a pad key is never seen,
    a pad query sees only itself, real tokens follow the inference rule (block-causal, or causal where asked)."""
    length = noisy_start + block
    rule = inference_mask_mod(block, causal_in_block, clean_causal, noisy_start, q_offset)
    got = dense_mask(padded_decoding_mask(rule, torch.tensor(pads), q_offset), length - q_offset, length,
                     rows=len(pads))
    for r, qi, kv in itertools.product(range(len(pads)), range(length - q_offset), range(length)):
        q = qi + q_offset
        if q < pads[r]:
            want = kv == q
        elif kv < pads[r]:
            want = False
        elif q >= noisy_start:
            want = kv <= q if causal_in_block else kv // block <= q // block
        else:
            want = kv <= q if (clean_causal or causal_in_block) else kv // block <= q // block
        assert bool(got[r, qi, kv]) == want, (r, q, kv)


def _speculative_brute_force(rows, cached, width, block, causal_in_block):
    """``rows``: per row, the positions of its cached keys (-1: none), of its clean queries and of its hypotheses'
    noisy blocks as (start, context_end). Returns the bool mask (R, Q, cached + Q) one entry at a time."""
    n_blocks = max(len(r["blocks"]) for r in rows)
    q_len = width + n_blocks * block
    mask = torch.zeros((len(rows), q_len, cached + q_len), dtype=torch.bool)
    for i, row in enumerate(rows):
        key_pos = row["cached"] + row["clean"] + [-1] * (width - len(row["clean"]))
        for qi in range(q_len):
            j = (qi - width) // block if qi >= width else None
            real = qi < len(row["clean"]) or (j is not None and j < len(row["blocks"]))
            for kv in range(cached + q_len):
                if not real:
                    want = kv == cached + qi
                elif kv < cached + width:  # a clean key
                    k = key_pos[kv]
                    if k < 0:
                        want = False
                    elif j is None:
                        want = k <= row["clean"][qi]
                    else:
                        want = k < row["blocks"][j][1]
                else:  # a noisy key: only the query's own block, causally inside it where asked
                    kj = (kv - cached - width) // block
                    want = j is not None and kj == j and (not causal_in_block or kv - cached <= qi)
                mask[i, qi, kv] = want
    return mask


@pytest.mark.parametrize("causal_in_block", [False, True])
def test_speculative_mask_matches_brute_force(causal_in_block):
    block, cached, width = 4, 5, 3
    rows = [  # a row verifying 3 clean tokens with two hypotheses; one with one clean token, one hypothesis;
        # one with nothing to verify (a finished row: every column is padding)
        {"cached": [0, 1, 2, 3, 4], "clean": [5, 6, 7], "blocks": [(8, 8), (4, 6)]},
        {"cached": [-1, -1, 0, 1, 2], "clean": [3], "blocks": [(4, 4)]},
        {"cached": [0, 1, -1, -1, -1], "clean": [], "blocks": []},
    ]
    n_blocks, q_len = 2, width + 2 * block
    key_pos = torch.full((3, cached + q_len), -1)
    q_pos = torch.zeros((3, q_len), dtype=torch.long)
    context_end = torch.zeros((3, q_len), dtype=torch.long)
    real = torch.zeros((3, q_len), dtype=torch.bool)
    for i, row in enumerate(rows):
        key_pos[i, :cached] = torch.tensor(row["cached"])
        n = len(row["clean"])
        key_pos[i, cached:cached + n] = q_pos[i, :n] = torch.tensor(row["clean"], dtype=torch.long)
        real[i, :n] = True
        for j, (start, end) in enumerate(row["blocks"]):
            cols = slice(width + j * block, width + (j + 1) * block)
            q_pos[i, cols] = torch.arange(start, start + block)
            key_pos[i, cached + cols.start:cached + cols.stop] = q_pos[i, cols]
            context_end[i, cols], real[i, cols] = end, True
    mod = speculative_mask(key_pos, q_pos, context_end, real, cached, width, block, causal_in_block)
    got = dense_mask(mod, q_len, cached + q_len, rows=3)
    assert torch.equal(got, _speculative_brute_force(rows, cached, width, block, causal_in_block))
    assert n_blocks * block + width == q_len and got.any(dim=-1).all()  # no query is left without a key
