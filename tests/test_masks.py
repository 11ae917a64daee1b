import itertools

import pytest
import torch

from edlm.masks import PATTERNS, dense_mask, inference_mask_mod, to_attention_mask


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
