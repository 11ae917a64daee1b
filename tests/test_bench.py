import json

import pytest
from conftest import make_dlm

from edlm.bench import decode_benchmark, machine_info, plot_sweep, train_throughput
from edlm.config import load_train_config


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    make_dlm("llama", block_size=4).save_pretrained(out)
    (out / "train_config.yaml").write_text("model: tiny\n")  # the AR source, as edlm convert records it
    return out


def test_decode_benchmark_json_contract_and_consistency(converted, tmp_path):
    r = decode_benchmark(converted, prompts=["Shall I", "When forty winters shall"], max_new_tokens=8,
                         batch_sizes=(1, 2), sweep=(1.0, 0.005), dtypes=("fp32",), chat=False)
    for side in ("ar", "dlm"):
        assert r[side]["tokens_per_s"] > 0 and r[side]["latency_s"] > 0
    assert r["dlm"]["tokens_per_forward"] >= 0.5
    assert r["speedup"] == pytest.approx(r["dlm"]["tokens_per_s"] / r["ar"]["tokens_per_s"])
    assert set(r["by_batch"]) == {"1", "2"}
    assert r["settings"]["ar_source"] == "tiny" and r["machine"]["cores"] >= 1
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


def test_train_throughput_reports_both_phases(tmp_path):
    from pathlib import Path

    cfg = load_train_config(Path(__file__).parents[1] / "configs/tiny.yaml", ["micro_batch_size=2"])
    r = train_throughput(cfg, steps=2, warmup=1)
    for phase in ("ar_finetune", "dlm_convert", "dlm_convert_joint"):
        p = r[phase]
        assert p["tokens_per_s"] == pytest.approx(2 * 64 / p["step_s_median"])
        assert p["peak_mem_mb"] > 0
    assert r["dlm_over_ar_step_time"] == pytest.approx(r["dlm_convert"]["step_s_median"] /
                                                       r["ar_finetune"]["step_s_median"])
    assert r["joint_over_dlm_step_time"] == pytest.approx(r["dlm_convert_joint"]["step_s_median"] /
                                                          r["dlm_convert"]["step_s_median"])
    assert r["dlm_convert_joint"]["ar_weight"] == 1.0
    assert r["machine"] == machine_info() or r["machine"]["cpu"] == machine_info()["cpu"]
