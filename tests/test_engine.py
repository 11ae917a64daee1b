"""The compiled engine (edlm.engine): the same tokens as the eager Hugging Face path in every mode, its cache and
padding rules, its quantized weights, and its errors."""

import pytest
import torch
from conftest import make_dlm

from edlm.checkpoints import tiny_model
from edlm.config import DecodeConfig
from edlm.decode import generate
from edlm.engine import Engine, _bucket, compile_dlm, compile_model
from edlm.errors import EdlmError
from edlm.model import new_cache

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22]]


def _modes(max_new_tokens=20):
    return [DecodeConfig(max_new_tokens=max_new_tokens, mode="ar", ignore_eos=True),
            DecodeConfig(max_new_tokens=max_new_tokens, mode="diffusion", ignore_eos=True),
            DecodeConfig(max_new_tokens=max_new_tokens, mode="diffusion", ignore_eos=True, use_cache=False),
            DecodeConfig(max_new_tokens=max_new_tokens, mode="speculative", ignore_eos=True),
            DecodeConfig(max_new_tokens=max_new_tokens, mode="speculative", ignore_eos=True, aligned_draft=False)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_eager_engine_decodes_as_the_hf_model_in_every_mode(family):
    dlm = make_dlm(family, peaked=4.0)
    eng = compile_dlm(dlm, "fp32", compile=False)
    for cfg in _modes():
        ref = generate(dlm, PROMPTS, cfg).sequences
        assert generate(eng, PROMPTS, cfg).sequences == ref, (family, cfg.mode)
        assert all(len(s) == 20 for s in ref)


def test_engine_logits_match_hf_with_padding_widths():
    model, _ = tiny_model("llama")
    eng = compile_model(model, "fp32", compile=False)
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])
    ref = model(input_ids=ids).logits
    for width in (1, 2, 3, 5):  # 3 and 5 run padded to 4 and 8
        cache = eng.new_cache(2, capacity=4)  # too small: grows
        out = [eng(input_ids=ids[:, i:i + width], cache=cache).logits for i in range(0, 5, width)]
        assert cache.get_seq_length() == 5 and cache.capacity >= 5
        torch.testing.assert_close(torch.cat(out, dim=1), ref, atol=1e-4, rtol=1e-4)


def test_static_cache_crop_follows_dynamic_cache_semantics():
    model, _ = tiny_model("llama")
    cache = new_cache(compile_model(model, compile=False), rows=1)
    cache.length = 10
    cache.crop(-3)
    assert cache.get_seq_length() == 7
    cache.crop(4)
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError):
        cache.crop(-5)


def test_bucket_widths():
    assert [_bucket(w) for w in (1, 2, 3, 5, 8, 9, 17, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 24, 64, 128, 192]
    assert [_bucket(w, exact=8) for w in (1, 3, 5, 7, 8, 9, 17)] == [1, 3, 5, 7, 8, 16, 24]


def test_exact_widths_run_unpadded_and_give_the_same_logits():
    model, _ = tiny_model("llama", hidden=64)
    ids = torch.arange(3, 8)[None]  # 5 columns: padded to 8, or run at 5
    padded, exact = compile_model(model, compile=False), compile_model(model, compile=False, exact_widths=8)
    assert torch.allclose(padded(input_ids=ids).logits, exact(input_ids=ids).logits, atol=1e-5)
    assert padded.widths == {(1, 8)} and exact.widths == {(1, 5)}


@pytest.mark.parametrize("dtype, tol", [("bf16", 0.15), ("int8", 0.15), ("int4", 0.6)])
def test_quantized_engine_logits_stay_close_to_fp32(dtype, tol):
    model, _ = tiny_model("llama", hidden=64)
    ids = torch.arange(3, 19)[None]
    ref = torch.log_softmax(model(input_ids=ids).logits, -1)
    out = torch.log_softmax(compile_model(model, dtype, compile=False)(input_ids=ids).logits, -1)
    assert (out - ref).abs().max() < tol
    fp32 = compile_model(model, compile=False).weight_bytes()
    ratio = {"bf16": 0.5, "int8": 0.3, "int4": 0.2}[dtype]
    assert compile_model(model, dtype, compile=False).weight_bytes() <= ratio * fp32


def _one_by_one_and_wide(engine, ids, width):
    """Logits of the last ``width`` columns of ``ids``: one forward each after the rest, and one wide forward."""
    with torch.no_grad():
        cache = engine.new_cache(1)
        engine(input_ids=ids[:, :-width], cache=cache)
        one = torch.cat([engine(input_ids=ids[:, i:i + 1], cache=cache).logits
                         for i in range(ids.shape[1] - width, ids.shape[1])], 1)
        cache = engine.new_cache(1)
        engine(input_ids=ids[:, :-width], cache=cache)
        return one, engine(input_ids=ids[:, -width:], cache=cache).logits


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_quantized_column_is_bit_for_bit_the_same_in_an_ar_step_and_a_wide_verify(dtype, compile):
    # The guarantee drafted decoding at int8 / int4 rests on: activation rounding turns any last-bit difference
    # between an AR step and a verify into a different quantum, and the layers after amplify it.
    model, _ = tiny_model("llama", hidden=64, layers=4)
    engine = compile_model(model, dtype, compile=compile, exact_widths=8)
    for length in (20, 78):  # 78: a 70-column prefill, past WIDTH_FREE_UP_TO (matmuls there, on both sides)
        ids = torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(length))
        one, wide = _one_by_one_and_wide(engine, ids, 8)
        assert torch.equal(one, wide), length


def test_unsupported_models_and_dtypes_fail_clearly():
    model, _ = tiny_model("gemma")
    with pytest.raises(EdlmError, match="without --compile"):
        Engine(model)
    llama, _ = tiny_model("llama")
    with pytest.raises(EdlmError, match="engine dtype"):
        Engine(llama, dtype="fp8")


@pytest.mark.slow
def test_compiled_engine_decodes_as_eager_in_every_mode():
    dlm = make_dlm("llama", peaked=4.0)
    eng = compile_dlm(dlm, "fp32", compile=True)
    for cfg in _modes(12):
        assert generate(eng, PROMPTS, cfg).sequences == generate(dlm, PROMPTS, cfg).sequences, cfg.mode
    assert eng.model.compile_s  # every width's first call was timed


def test_engine_benchmark_reports_every_backend_and_the_targets(model_dir):
    from edlm.bench.engine import HEADLINE, engine_benchmark

    result = engine_benchmark(model_dir, [[5, 6, 7, 8], [9, 10, 11]], max_new_tokens=8, dtypes=("fp32", "int8"),
                              eager_dtypes=("fp32",), block=4, tpfs=(1, 4), llama_cpp=False, compile=False)
    assert [(r["backend"], r["dtype"]) for r in result["ar"]] == [("eager", "fp32"), ("engine", "fp32"),
                                                                  ("engine", "int8")]
    assert all(r["tokens"] == 16 for r in result["ar"])  # EOS ignored: every row makes max_new_tokens
    assert all(k in result for k in HEADLINE) and result["llamacpp_tokens_per_s"] is None
    assert result["ar_best_tokens_per_s"] == max(r["tokens_per_s"] for r in result["ar"])
    assert [r["tpf_forced"] for r in result["dlm"]] == [1, 4]
    assert result["dlm"][1]["tokens_per_forward"] > 2 * result["dlm"][0]["tokens_per_forward"]
    assert set(result["forward_ms"]["fp32"]) == {"1", "4", "8"}
    assert result["targets"]["width8_over_ar_step"] == pytest.approx(
        result["forward_ms"][result["dlm"][0]["dtype"]]["4"] / result["forward_ms"][result["dlm"][0]["dtype"]]["1"])
    assert result["bandwidth_bound_tokens_per_s"] > 0
    curve = result["curve"]  # every width 1..16 for eager fp32 and each engine dtype, with floors
    assert sorted({(r["path"], r["dtype"]) for r in curve["rows"]}) == [("eager", "fp32"), ("engine", "fp32"),
                                                                         ("engine", "int8")]
    assert sorted({r["width"] for r in curve["rows"]}) == list(range(1, 17)) and len(curve["rows"]) == 48
    for w, ms in result["verify_ms"].items():
        assert ms == min(r["ms"] for r in curve["rows"] if r["width"] == w)
    assert result["verify_ratio_8"] == pytest.approx(result["verify_ms"][8] / result["verify_ms"][1])
    assert all(r["min_ms"] <= r["ms"] <= r["max_ms"] and r["floor_ms"] > 0 for r in curve["rows"])
    assert min(r["ar_steps"] for r in curve["rows"] if r["width"] == 1) == pytest.approx(1.0)
    assert set(curve["floors"]["gemm_gflops"]) == {"fp32", "int8"} and "cpu_flags" in curve["machine"]
    assert curve["exact_widths"] == 4  # the block: verifies of up to a block run unpadded
    t = result["targets"]
    assert t["verify_ratio_8_target"] == (1.5 if t["cpu_class"] != "avx2" else 1.8)
    assert t["verify_ratio_8_met"] == (result["verify_ratio_8"] <= t["verify_ratio_8_target"])
    own = engine_benchmark(model_dir, [[5, 6, 7, 8]], max_new_tokens=4, dtypes=("fp32",), eager_dtypes=(), block=4,
                           tpfs=(4,), llama_cpp=False, compile=False, ar_source=None)  # the converted weights
    assert [r["backend"] for r in own["ar"]] == ["engine"] and own["ar"][0]["tokens"] == 4


def test_the_v8_target_follows_the_cpu_class():
    from edlm.bench.engine import cpu_class_targets

    def curve(flags, ratio):
        return {"machine": {"cpu_flags": flags}, "verify_ratio_8": ratio}

    assert cpu_class_targets(curve(["avx2", "fma"], 1.65)) == {"cpu_class": "avx2", "verify_ratio_8_target": 1.8,
                                                             "verify_ratio_8_met": True}
    amx = cpu_class_targets(curve(["avx2", "amx_int8", "avx512f"], 1.65))
    assert amx["verify_ratio_8_target"] == 1.5 and amx["verify_ratio_8_met"] is False
    assert cpu_class_targets(curve(["avx512_vnni"], None))["verify_ratio_8_met"] is None


def test_int4_needs_the_compiled_engine(model_dir):
    from edlm.loading import load

    with pytest.raises(EdlmError, match="--compile"):
        load(model_dir, "int4")
    assert load(model_dir, "int4", compile=True).model.dtype_name == "int4"


@pytest.mark.slow
def test_cli_generate_and_eval_compile(model_dir, capsys):
    from edlm.cli import main

    args = ["--model", str(model_dir), "--max-new-tokens", "8", "--no-chat"]
    assert main(["generate", *args, "--prompt", "abc"]) == 0
    eager = capsys.readouterr().out
    assert main(["generate", *args, "--prompt", "abc", "--compile"]) == 0
    assert capsys.readouterr().out == eager
    evaluation = ["eval", "--model", str(model_dir), "--task", "arithmetic", "--limit", "2"]
    answers = []
    for extra in ([], ["--compile"]):
        assert main(evaluation + extra) == 0
        fields = dict(f.split("=") for f in capsys.readouterr().out.split())
        answers.append((fields["acc"], fields["n"], fields["tokens_per_forward"]))
    assert answers[0] == answers[1] and answers[0][1] == "2"


def test_dtype_auto_measures_once_and_picks_the_fastest(model_dir, capsys, tmp_path, monkeypatch):
    from edlm.bench.engine import choose_dtype
    from edlm.cli import main

    monkeypatch.setenv("EDLM_CACHE", str(tmp_path))  # where the choice is remembered

    dtype, record = choose_dtype(model_dir, width=4, candidates=("fp32", "int8"))
    assert not record["cached"] and set(record["forward_ms"]) == {"fp32", "int8"}
    assert dtype == min(record["forward_ms"], key=record["forward_ms"].get)
    again, record = choose_dtype(model_dir, width=4, candidates=("fp32", "int8"))
    assert record["cached"] and again == dtype
    assert main(["generate", "--model", str(model_dir), "--prompt", "ab", "--max-new-tokens", "4", "--dtype",
                 "auto"]) == 0
    assert "dtype auto:" in capsys.readouterr().err
    assert (tmp_path / "dtype-choices.json").is_file()
