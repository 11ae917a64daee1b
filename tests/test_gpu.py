"""The GPU path: flex-attention training gives the SDPA loss, trains, and its memory does not grow like (2L)^2.

Marked ``gpu`` (deselected by default) and skipped without CUDA: run with ``python -m pytest -m gpu`` on a GPU
machine (``scripts/gpu_run.sh`` does, first).
"""

import pytest
import torch

from edlm.checkpoints import resolve_model
from edlm.config import DiffusionConfig
from edlm.model import DiffusionLM
from edlm.noising import noise_samples

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _dlm(impl: str, dtype: torch.dtype, block: int = 16, **diffusion) -> DiffusionLM:
    model, tok = resolve_model("tiny:llama@128x2", dtype=dtype, attn_implementation=impl, seed=0)
    return DiffusionLM.from_ar(model.cuda(), tok, DiffusionConfig(block_size=block, **diffusion))


@pytest.mark.parametrize("pattern", ["block_causal_clean", "block_causal_noisy", "bidirectional"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
def test_flex_and_sdpa_give_the_same_loss_on_the_same_batch(pattern, dtype, tol):
    sdpa, flex = _dlm("sdpa", dtype, pattern=pattern), _dlm("flex_attention", dtype, pattern=pattern)
    x0 = torch.randint(1, 250, (2, 128), device="cuda")
    noised = noise_samples(x0, sdpa.config, sdpa.mask_id, seed=0, sample_ids=[0, 1])
    a, b = sdpa(noised).loss, flex(noised).loss
    assert torch.isfinite(a) and abs(float(a) - float(b)) <= tol * abs(float(a))


def test_flex_training_step_has_the_sdpa_gradients():
    sdpa, flex = _dlm("sdpa", torch.float32), _dlm("flex_attention", torch.float32)
    x0 = torch.randint(1, 250, (2, 64), device="cuda")
    noised = noise_samples(x0, sdpa.config, sdpa.mask_id, seed=1, sample_ids=[0, 1])
    sdpa(noised).loss.backward()
    flex(noised).loss.backward()
    for (name, p), q in zip(sdpa.named_parameters(), flex.parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-5), name


def test_flex_training_memory_grows_slower_than_the_dense_mask():
    from edlm.bench.train import training_memory

    result = training_memory("tiny:llama@128x2", lengths=(1024, 4096), block=64)
    peak = {(r["attn_implementation"], r["seq_len"]): r.get("peak_mb") for r in result["rows"]}
    assert None not in peak.values(), result["rows"]
    # 4x the length: activations grow ~4x, a (2L)^2 mask 16x. flex must stay near linear and below SDPA.
    assert peak[("flex_attention", 4096)] / peak[("flex_attention", 1024)] < 6
    assert peak[("flex_attention", 4096)] < peak[("sdpa", 4096)]
