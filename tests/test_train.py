import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edlm.config import load_train_config
from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.train import DataStream, convert, lr_lambda, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def edlm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edlm.cli", *args]


def test_short_conversion_lowers_masked_loss_and_saves_a_reloadable_model(tmp_path):
    cfg = load_train_config(TINY, ["log_every=1", "save_every=0"], output_dir=str(tmp_path), max_steps=30)
    convert(cfg)
    record = losses(tmp_path)
    assert [s for s, _ in record] == list(range(1, 31))
    first, last = sum(v for _, v in record[:5]) / 5, sum(v for _, v in record[-5:]) / 5
    assert last < first - 1.0, (first, last)  # ~5.5 -> ~3.3 on the tiny sonnets corpus
    dlm = DiffusionLM.from_pretrained(tmp_path)
    assert dlm.config.block_size == 8 and dlm.config.schedule == "position_dependent"
    assert (tmp_path / "train_config.yaml").is_file()


# The interrupted run: the library call `edlm convert` makes (cmd_convert adds nothing that changes training), in a
# child process that SIGKILLs itself right after step 10, so checkpoint-8 is on disk and steps 9-10 are lost
# whatever the machine's speed.
_KILLED_AFTER_STEP_10 = """
import os, signal, sys
from edlm.config import load_train_config
from edlm.train import convert

def kill_after_10(step, total, info):
    if step == 10:
        os.kill(os.getpid(), signal.SIGKILL)

config, out = sys.argv[1:3]
convert(load_train_config(config, ["log_every=1", "save_every=8"], output_dir=out, max_steps=24),
        progress=kill_after_10)
"""


def test_sigkill_then_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = ["--config", str(TINY), "--max-steps", "24", "--set", "log_every=1", "--set", "save_every=8"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(edlm_cmd("convert", *common, "--output-dir", str(full)), check=True, capture_output=True)
    killed = subprocess.run([sys.executable, "-c", _KILLED_AFTER_STEP_10, str(TINY), str(cut)],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (cut / "checkpoint-8").is_dir() and not (cut / "checkpoint-16").exists()
    assert not (cut / "model.safetensors").exists()
    assert [s for s, _ in losses(cut)] == list(range(1, 11))  # steps 9-10 ran, then were lost with the process
    subprocess.run(edlm_cmd("convert", *common, "--output-dir", str(cut), "--resume"), check=True,
                   capture_output=True)
    a, b = losses(full), losses(cut)
    assert [s for s, _ in b] == list(range(1, 25))  # no duplicated or missing steps after the resume
    for (sa, la), (sb, lb) in zip(a, b):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5, abs=1e-6), (sa, la, lb)
    ref, got = DiffusionLM.from_pretrained(full), DiffusionLM.from_pretrained(cut)
    for (name, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resume_refuses_a_checkpoint_from_another_config(tmp_path):
    cfg = load_train_config(TINY, ["save_every=2"], output_dir=str(tmp_path), max_steps=3)
    convert(cfg)
    assert (tmp_path / "checkpoint-2").is_dir()
    other = load_train_config(TINY, ["save_every=2", "diffusion.sharpness=1.0"], output_dir=str(tmp_path),
                              max_steps=4)
    with pytest.raises(EdlmError, match="different settings"):
        convert(other, resume=True)
    with pytest.raises(EdlmError, match="already holds checkpoints"):
        convert(cfg, resume=False)


class _Interrupt(Exception):
    pass


def test_ar_objective_resumes_exactly_and_saves_an_ar_folder_that_loads_like_the_shipped_source(tmp_path):
    from edlm.assets import miniature_dir
    from edlm.checkpoints import load_hf
    from edlm.studies.source import is_trained, pretrain_ar

    settings = ["log_every=1", "save_every=3", "num_threads=1"]
    full = pretrain_ar(load_train_config(TINY, settings, max_steps=6), tmp_path / "full")

    def stop_after_4(step, total, info):
        if step == 4:  # checkpoint-3 is on disk, step 4 is lost
            raise _Interrupt

    cut = tmp_path / "cut"
    with pytest.raises(_Interrupt):
        pretrain_ar(load_train_config(TINY, settings, max_steps=6), cut, progress=stop_after_4)
    assert (cut / "checkpoint-3").is_dir() and not is_trained(cut)
    with pytest.raises(EdlmError, match="written by a 'ar' run"):  # the other objective cannot resume it
        train(load_train_config(TINY, settings, max_steps=6, output_dir=str(cut)), "diffusion", resume=True)
    pretrain_ar(load_train_config(TINY, settings, max_steps=6), cut)  # resumes from checkpoint-3
    assert losses(cut) == losses(full) and [s for s, _ in losses(full)] == list(range(1, 7))  # same seed, same losses
    assert is_trained(full) and is_trained(cut)
    assert json.loads((full / "edlm_source.json").read_text())["objective"] == "ar"

    # the AR folder loads as the shipped miniature's source does, as a plain causal LM
    model, tok = load_hf(full)
    shipped, shipped_tok = load_hf(miniature_dir() / "source")
    assert type(tok) is type(shipped_tok)
    assert type(model) is type(shipped) and not (full / "edlm_config.json").exists()
    again, _ = load_hf(cut)
    for (name, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert pretrain_ar(load_train_config(TINY, settings, max_steps=6), full) == full  # finished: left alone


def test_a_source_finished_by_the_old_loop_is_still_recognised(tmp_path):
    from edlm.studies.source import is_trained

    (tmp_path / "edlm_source.json").write_text(json.dumps({"steps": 10, "config": {}}))  # the old done-file
    assert is_trained(tmp_path) and not is_trained(tmp_path / "missing")


def test_lora_conversion_trains_adapters_and_saves_merged_weights(tmp_path):
    cfg = load_train_config(TINY, ["lora.r=4", "lora.alpha=8", "log_every=1", "save_every=0", "lr=1e-2"],
                            output_dir=str(tmp_path), max_steps=12)
    convert(cfg)
    record = losses(tmp_path)
    assert record[-1][1] < record[0][1]
    names = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert names == ["LlamaForCausalLM"]
    dlm = DiffusionLM.from_pretrained(tmp_path)
    assert not any("lora" in n for n, _ in dlm.named_parameters())


def test_empty_corpus_and_too_short_corpus_are_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(EdlmError, match="contains no text"):
        convert(load_train_config(TINY, [f"data.corpus=[{empty}]"], output_dir=str(tmp_path / "o1"), max_steps=1))
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "hi"}\n')
    with pytest.raises(EdlmError, match="shorter than one sequence"):
        convert(load_train_config(TINY, [f"data.corpus=[{short}]"], output_dir=str(tmp_path / "o2"), max_steps=1))
    with pytest.raises(EdlmError, match="does not exist"):
        convert(load_train_config(TINY, ["data.corpus=[/no/such/file.txt]"], output_dir=str(tmp_path / "o3"),
                                  max_steps=1))


def test_lr_schedule_and_data_stream():
    cfg = load_train_config(TINY, ["warmup_steps=4", "lr=1.0", "min_lr=0.1"], max_steps=14)
    f = lr_lambda(cfg)
    assert [round(f(s), 6) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(13) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + __import__("math").cos(__import__("math").pi * 0.9)))
    assert f(100) == pytest.approx(0.1)
    s = DataStream(5, seed=0)
    epoch0, epoch1 = s.rows(list(range(5))), s.rows(list(range(5, 10)))
    assert sorted(epoch0) == sorted(epoch1) == list(range(5)) and epoch0 != epoch1
    assert DataStream(5, seed=0).rows([7]) == [epoch1[2]]
