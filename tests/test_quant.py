import warnings

import pytest
import torch
from conftest import make_dlm

from edlm.config import DecodeConfig
from edlm.decode import generate
from edlm.engine import Linear
from edlm.errors import EdlmError
from edlm.evals.likelihood import Scorer
from edlm.loading import load
from edlm.quant import cast, cast_model, parse_dtypes, weight_dtype

PROMPTS = [[5, 17, 99, 3], [120, 44, 8, 61, 200, 7, 19, 33, 2, 90, 14], [250]]


@pytest.fixture(scope="module")
def dlm():
    return make_dlm("llama", peaked=4.0, block_size=4)  # peaked: confident, trained-like logits


def _log_probs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().log_softmax(-1)  # (B, T, V)


def test_int8_and_bf16_logits_stay_within_tolerance_of_fp32(dlm):
    ids = torch.randint(0, 250, (3, 24), generator=torch.Generator().manual_seed(0))
    ref = _log_probs(dlm.model, ids)
    for dtype, max_abs, max_kl in (("bf16", 0.05, 1e-4), ("int8", 0.2, 1e-3)):
        lp = _log_probs(cast(dlm, dtype).model, ids)
        kl = (ref.exp() * (ref - lp)).sum(-1)  # KL(fp32 || dtype) per position
        assert (lp - ref).abs().max() < max_abs, dtype
        assert kl.mean() < max_kl, dtype
        assert (lp.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95, dtype


def test_int8_likelihood_and_elbo_stay_within_one_percent_of_fp32(dlm):
    int8 = cast(dlm, "int8")
    context, continuation = list(range(10, 40)), list(range(40, 72))
    ll32 = Scorer(dlm, dlm.model)(context, continuation)  # exact AR log-likelihood (nats)
    ll8 = Scorer(int8, int8.model)(context, continuation)
    assert abs(ll8 - ll32) / abs(ll32) < 0.01  # within 1% of the fp32 log-likelihood
    elbo32 = Scorer(dlm, n_samples=4)(context, continuation)  # the dLM's ELBO, same noise draws in both
    elbo8 = Scorer(int8, n_samples=4)(context, continuation)
    assert abs(elbo8 - elbo32) / abs(elbo32) < 0.01


def test_cast_copies_and_names_dtypes(dlm):
    before = dlm.model.model.layers[0].mlp.up_proj.weight.clone()
    int8 = cast(dlm, "int8")
    assert weight_dtype(int8.model) == "int8" and weight_dtype(dlm.model) == "fp32"
    assert torch.equal(dlm.model.model.layers[0].mlp.up_proj.weight, before)  # the original is untouched
    assert cast(dlm, "fp32") is dlm
    bf16 = cast(dlm, "bf16")
    assert weight_dtype(bf16.model) == "bf16" and bf16.tokenizer is dlm.tokenizer
    assert weight_dtype(cast_model(bf16.model, "int8", copy=True)) == "int8"  # int8 from bf16 goes through fp32
    # The int8 model is smaller: Linear weights take 1 byte instead of 4.
    assert int8.model.model.layers[0].mlp.up_proj.weight().element_size() == 1


def test_load_a_converted_folder_in_each_dtype(dlm, tmp_path):
    dlm.save_pretrained(tmp_path)
    for dtype in ("fp32", "bf16", "int8"):
        loaded = load(tmp_path, dtype)
        assert weight_dtype(loaded.model) == dtype and not loaded.training
        out = generate(loaded, PROMPTS[:1], DecodeConfig(max_new_tokens=5))
        assert len(out.sequences[0]) == 5


def test_dtype_names_are_checked():
    assert parse_dtypes("fp32, int8") == ("fp32", "int8")
    with pytest.raises(EdlmError, match="fp32, bf16, int8"):
        parse_dtypes("fp16")
    with pytest.raises(EdlmError, match="at least one"):
        parse_dtypes(",")


def test_int8_activation_scales_are_per_token():
    # One token with huge activations (small Llama-family models have them) must not set the quantization scale
    # of the others: every row, alone or next to the outlier, stays close to fp32. With one scale per call (plain
    # dynamic int8) the small rows next to the outlier lose every bit and come out as the bias.
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    q = cast_model(torch.nn.Sequential(lin), "int8", copy=True)[0]
    assert type(q).__name__ == "RowScaledInt8Linear"
    x = torch.randn(4, 64)
    x[0] *= 1000.0  # the outlier token
    with torch.no_grad():
        together, ref = q(x), lin(x)
        alone = torch.cat([q(x[i:i + 1]) for i in range(4)])
        with warnings.catch_warnings():  # torch.ao deprecates quantize_dynamic; the per-tensor reference stays
            warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
            plain = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear})[0](x)

    def rel(y):
        return ((y - ref).norm(dim=-1) / ref.norm(dim=-1)).max()

    assert rel(together) < 0.05 and rel(alone) < 0.05, (rel(together), rel(alone))  # bias included
    assert rel(plain) > 0.5  # what one scale per call does to the small rows


def test_an_int8_rows_result_does_not_depend_on_the_other_rows_of_its_call():
    # fbgemm takes one scale and zero point for a whole call; the guard features pin that range to [-1, 1], so a
    # row's product is bit for bit the same alone as beside others (what lossless speculative decoding at int8
    # needs: the verify's columns must see what the AR step's one column sees). Without the guard this row moved
    # by ~0.3 against outputs of ~0.8.
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = cast_model(torch.nn.Sequential(lin), "int8", copy=True)[0]
    engine_lin = Linear(lin.weight, lin.bias, "int8")
    x = torch.randn(6, 64)
    x[2] *= 50.0
    x[4] = x[4].abs()  # a row with no negative entry: alone, its range would be [0, 1]
    with torch.no_grad():
        for f in (q, engine_lin):
            together = f(x)
            alone = torch.cat([f(x[i:i + 1]) for i in range(6)])
            assert torch.equal(together, alone)
            assert ((together - lin(x)).norm(dim=-1) / lin(x).norm(dim=-1)).max() < 0.05
