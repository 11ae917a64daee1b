import json

import pytest
from conftest import make_dlm

from edlm.bench.decode import decode_benchmark, plot_ceiling, plot_sweep, roofline
from edlm.config import DecodeConfig


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    make_dlm("llama", block_size=4).save_pretrained(out)
    (out / "train_config.yaml").write_text("model: tiny\n")  # the AR source, as edlm convert records it
    return out


def test_decode_benchmark_json_contract_and_consistency(converted, tmp_path):
    r = decode_benchmark(converted, prompts=["Shall I", "When forty winters shall"],
                         decode=DecodeConfig(max_new_tokens=8), batch_sizes=(1, 2), sweep=(1.0, 0.005),
                         dtypes=("fp32",), chat=False, ceiling_tpf=())
    for side in ("ar", "dlm"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["latency_s"] > 0
    assert r["dlm"]["tokens_per_forward"] >= 0.5
    assert r["speedup"] == pytest.approx(r["dlm"]["tokens_per_s"] / r["ar"]["tokens_per_s"])
    assert set(r["by_batch"]) == {"1", "2"}
    assert r["settings"]["ar_source"] == "tiny" and r["machine"]["cores"] >= 1
    assert r["settings"]["decode"] == {**r["settings"]["decode"], "max_new_tokens": 8, "threshold": 0.9}
    assert r["settings"]["threshold"] == r["dlm"]["threshold"] == DecodeConfig().threshold  # the one default
    # The random tiny model is its own AR source here: with threshold 1.0 the dLM commits one token per forward;
    # with threshold 0.005 (above ~1/V) it commits whole blocks.
    strict, loose = r["sweep"]
    assert strict["tokens_per_forward"] <= 1.0 < loose["tokens_per_forward"]
    assert 0.0 <= loose["agreement_with_ar"] <= 1.0
    modes = r["modes"]
    assert set(modes) == {"diffusion", "ar", "speculative", "speculative_separate_draft"}
    assert modes["speculative"]["agreement_with_ar_mode"] == modes["speculative_separate_draft"][
        "agreement_with_ar_mode"] == 1.0  # greedy speculative is the AR mode's output
    assert modes["ar"]["tokens_per_forward"] <= 1.0 <= modes["speculative"]["tokens_per_forward"]
    assert modes["ar"]["speedup"] == pytest.approx(modes["ar"]["tokens_per_s"] / r["ar"]["tokens_per_s"])
    assert r["overhead"]["bare_forward_s"] > 0 and r["overhead"]["decoder_s_per_forward"] > 0
    json.dumps(r)  # serializable
    plot_sweep(r, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "ceiling" not in r
    assert set(r["llama_cpp"]) == {"skipped"}  # a tiny source has no GGUF (or llama-cpp-python is not installed)


def test_roofline_is_tpf_times_t1_over_t_block():
    # 20 ms for one token, 25 ms for a block of 8: AR makes 50 tokens/s; a dLM at 4 tokens per forward 160.
    r = roofline({1: 0.020, 8: 0.025, 16: 0.040}, tokens_per_forward=4.0, block=8)
    assert r == pytest.approx({"ar_tokens_per_s": 50.0, "dlm_tokens_per_s": 160.0, "speedup": 3.2})
    r4 = roofline({1: 0.040, 8: 0.080}, tokens_per_forward=2.0, block=8, batch=4)
    assert r4 == pytest.approx({"ar_tokens_per_s": 100.0, "dlm_tokens_per_s": 100.0, "speedup": 1.0})


def test_ceiling_rows_per_dtype_and_forced_tpf(converted, tmp_path):
    prompts = ["Shall I compare", "When forty winters shall besiege thy brow"]
    r = decode_benchmark(converted, prompts=prompts, decode=DecodeConfig(max_new_tokens=16), batch_sizes=(1, 2),
                         sweep=(0.9,), dtypes=("fp32", "int8"), chat=False, ceiling_tpf=(1, 4), ceiling_block=4)
    c = r["ceiling"]
    assert c["block"] == 4 and set(c["by_batch"]) == {"1", "2"}
    assert r["settings"]["ceiling_tpf"] == [1, 4] and r["settings"]["dtypes"] == ["fp32", "int8"]
    for n, b in c["by_batch"].items():
        n = int(n)
        assert set(b["forward_ms"]) == {"fp32", "int8"} and set(b["forward_ms"]["fp32"]) == {"1", "4", "8"}
        assert b["ar"]["best"] in ("fp32", "int8")
        best_ar = b["ar"]["by_dtype"][b["ar"]["best"]]["tokens_per_s"]
        assert best_ar == max(a["tokens_per_s"] for a in b["ar"]["by_dtype"].values())
        for d, a in b["ar"]["by_dtype"].items():
            assert a["tokens"] == 16 * 2  # EOS ignored: every prompt makes max_new_tokens
            assert a["roofline_tokens_per_s"] == pytest.approx(n / (b["forward_ms"][d]["1"] / 1e3))
        assert [(row["dtype"], row["tpf_forced"]) for row in b["dlm"]] == [
            ("fp32", 1), ("fp32", 4), ("int8", 1), ("int8", 4)]
        for row in b["dlm"]:
            assert row["tokens"] == 16 * 2
            t1, tb = b["forward_ms"][row["dtype"]]["1"], b["forward_ms"][row["dtype"]]["4"]
            tpf = row["tokens_per_forward"]
            # Forced k per forward: exactly k, except where a prompt's partial first block leaves fewer positions open
            # or (batch 2) the rows' prompts end at different columns and the batch waits for the longer block.
            assert tpf <= row["tpf_forced"]
            if n == 1:
                assert (tpf == 1.0) == (row["tpf_forced"] == 1) and tpf > row["tpf_forced"] / 2
            assert row["roofline_tokens_per_s"] == pytest.approx(n * tpf / (tb / 1e3))
            assert row["fraction_of_roofline"] == pytest.approx(row["tokens_per_s"] / row["roofline_tokens_per_s"])
            assert row["roofline_speedup_vs_same_dtype_ar"] == pytest.approx(tpf * t1 / tb)
            assert row["speedup_vs_best_ar"] == pytest.approx(row["tokens_per_s"] / best_ar)
    plot_ceiling(r, tmp_path / "ceiling.png")
    assert (tmp_path / "ceiling.png").read_bytes()[:4] == b"\x89PNG"
