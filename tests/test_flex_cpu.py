"""The flex-attention training path on CPU: its forward gives the SDPA loss for each attention pattern.

GPU training attends through a sparse flex ``BlockMask`` (``masks.flex_block_mask``) instead of the dense SDPA mask.
The flex forward also runs on CPU, so CI checks that path without a GPU. Inductor compiles it to C++ (g++ must be
on PATH), once per pattern since each predicate is its own code: 25 s for the three with a cold inductor cache on
2 idle cores, over a minute on busy ones. The backward, bf16 and memory checks are in tests/test_gpu.py.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from edlm.checkpoints import resolve_model
from edlm.config import DiffusionConfig
from edlm.model import DiffusionLM
from edlm.noising import noise_samples

# 2L = 512 spans 4 flex tiles of 128: the masks have full, partial and skipped (empty) tiles, not one partial tile.
LENGTH = 256
BLOCK = 8


@pytest.fixture(scope="module")
def ar_models():
    """The same tiny Llama weights (seed 0) loaded once per attention implementation."""
    return {impl: resolve_model("tiny:llama@128x2", attn_implementation=impl, seed=0)
            for impl in ("sdpa", "flex_attention")}


@pytest.mark.parametrize("pattern", ["block_causal_clean", "block_causal_noisy", "bidirectional"])
def test_flex_forward_gives_the_sdpa_loss_on_cpu(ar_models, pattern):
    cfg = DiffusionConfig(block_size=BLOCK, pattern=pattern)
    sdpa, flex = (DiffusionLM.from_ar(*ar_models[impl], cfg).eval() for impl in ("sdpa", "flex_attention"))
    assert flex.attn_implementation == "flex_attention"
    x0 = torch.randint(1, 250, (2, LENGTH), generator=torch.Generator().manual_seed(0))
    noised = noise_samples(x0, cfg, sdpa.mask_id, seed=0, sample_ids=[0, 1])
    with torch.no_grad():
        want, got = sdpa(noised), flex(noised)
        logits_want = sdpa.training_logits(noised.xt, x0)  # (B, L, V)
        logits_got = flex.training_logits(noised.xt, x0)
    assert got.n_masked == want.n_masked > 0
    assert torch.isfinite(want.loss)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(logits_got, logits_want, rtol=1e-4, atol=1e-5)
    masks = list(flex._mask_cache.values())
    assert masks and all(isinstance(m, BlockMask) for m in masks)  # the sparse path ran, not a dense fallback
    full = masks[0].full_kv_num_blocks
    assert full is not None and int(full.sum()) > 0  # some tiles skip the predicate entirely
