from pathlib import Path

import pytest

from edlm.bench.train import train_throughput
from edlm.config import load_train_config
from edlm.results import machine_info


def test_train_throughput_reports_both_phases(tmp_path):
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


def test_mask_memory_dense_bytes_grow_quadratically():
    from edlm.bench.train import mask_memory

    r = mask_memory((64, 128), block=16, device="cpu")
    assert [row["dense_bytes"] for row in r["rows"]] == [128 * 128, 256 * 256]
    assert [row["attention_len"] for row in r["rows"]] == [128, 256]
    assert r["pattern"] == "block_causal_clean" and r["device"] == "cpu"
