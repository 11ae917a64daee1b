"""The study machinery on a tiny configuration: grid expansion, the whole pipeline, skip and resume, the report."""

import json
import math

import pytest
import torch
from conftest import make_dlm

from edlm.checkpoints import embedded_model_dir, tiny_model
from edlm.errors import EdlmError
from edlm.studies import Comparison, StudyConfig, expand, run_study, verdict, write_report
from edlm.studies.analysis import per_position_loss, weight_drift
from edlm.studies.grid import load_study_config, run_config, study_source, unique_runs
from edlm.studies.task import TaskConfig, read_test, write_task


def tiny_study(tmp_path, conversion_steps: int = 2, save_every: int = 0) -> StudyConfig:
    return StudyConfig(
        output_dir=str(tmp_path / "runs"), report_dir=str(tmp_path / "report"),
        task=TaskConfig(generator="builtin", train_size=400, test_size=6, options={"max_digits": 1}, text_corpus=[]),
        source={"model": "tiny", "max_steps": 3, "micro_batch_size": 4, "data": {"seq_len": 32}, "lr": 1e-3,
                "log_every": 1},
        conversion={"diffusion": {"block_size": 8}, "data": {"seq_len": 32}, "micro_batch_size": 2,
                    "max_steps": conversion_steps, "lr": 1e-3, "save_every": save_every, "log_every": 1},
        comparisons={
            "attention": Comparison(variants={"block_causal_clean": {},
                                              "bidirectional": {"diffusion.pattern": "bidirectional"}}, seeds=2),
            "masking": Comparison(variants={"position_dependent": {}, "uniform": {"diffusion.schedule": "uniform"}},
                                  thresholds=[0.9, 0.5]),
            "lora": Comparison(variants={"full": {}, "lora_r4": {"lora.r": 4}}),
        },
        thresholds=[0.9], max_new_tokens=4, per_position_samples=2, per_position_rows=2)


def test_grid_expansion_shares_equal_runs(tmp_path):
    cfg = tiny_study(tmp_path)
    grid = expand(cfg)
    assert [len(grid["attention"][v]) for v in grid["attention"]] == [2, 2]
    # the default run (seed 0) is the clean variant, the position-dependent one and the full fine-tuning one
    assert grid["attention"]["block_causal_clean"][0] == grid["masking"]["position_dependent"][0] \
        == grid["lora"]["full"][0]
    runs = unique_runs(grid)
    assert len(runs) == 2 * 2 + 1 + 1
    assert len({r.name for r in runs}) == len(runs)
    lora = run_config(cfg, grid["lora"]["lora_r4"][0], tmp_path / "src", ["x.jsonl"])
    assert lora.lora is not None and lora.lora.r == 4 and lora.seed == 0 and lora.data.corpus == ["x.jsonl"]
    bidir = run_config(cfg, grid["attention"]["bidirectional"][1], tmp_path / "src", ["x.jsonl"])
    assert bidir.diffusion.pattern == "bidirectional" and bidir.seed == 1 and bidir.lora is None


def test_study_config_from_yaml(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("task: {generator: builtin, train_size: 10}\ncomparisons:\n  attention:\n    seeds: 3\n"
                    "    variants: {a: {}, b: {diffusion.pattern: bidirectional}}\n")
    cfg = load_study_config(path, ["thresholds=[0.8, 0.5]"])
    assert cfg.task.train_size == 10 and cfg.comparisons["attention"].seeds == 3 and cfg.thresholds == [0.8, 0.5]
    path.write_text("comparisons:\n  attention:\n    variant: {}\n")
    with pytest.raises(EdlmError, match="unknown key"):
        load_study_config(path)


def test_task_test_questions_never_in_training(tmp_path):
    cfg = TaskConfig(generator="builtin", train_size=2000, test_size=30, options={"max_digits": 1})
    train_path, test_path = write_task(cfg, tmp_path)
    test = read_test(test_path)
    train_questions = {json.loads(line)["text"].rsplit(" ", 1)[0] for line in train_path.read_text().splitlines()}
    assert len(test) == 30 and not ({p.question for p in test} & train_questions)
    a, b = test[0].question.split(" = ")[0].split(" ")[::2], test[0].question.split()[1]
    assert str(int(a[0]) + int(a[1]) if b == "+" else int(a[0]) - int(a[1])) == test[0].answer


def test_reasoning_gym_task(tmp_path):
    pytest.importorskip("reasoning_gym")
    _, test_path = write_task(TaskConfig(train_size=50, test_size=5), tmp_path)
    test = read_test(test_path)
    assert len(test) == 5
    for p in test:  # chain_sum with two terms: "a + b =" / "a - b ="
        a, op, b, eq = p.question.split()
        assert eq == "=" and str(int(a) + int(b) if op == "+" else int(a) - int(b)) == p.answer
    with pytest.raises(EdlmError, match="reasoning-gym could not build"):
        write_task(TaskConfig(dataset="no_such_dataset", train_size=5, test_size=2), tmp_path / "bad")


def test_weight_drift_is_relative_frobenius_change():
    source, _ = tiny_model("llama", seed=0)
    converted, _ = tiny_model("llama", seed=0)
    drift = weight_drift(source, converted)
    assert drift["overall"] == 0 and drift["layers"] == [0.0, 0.0]
    with torch.no_grad():
        w = converted.model.layers[1].mlp.down_proj.weight
        w.add_(0.5 * w)  # +50% on one matrix of layer 1
    with torch.no_grad():
        layer1 = [p for n, p in source.named_parameters() if ".layers.1." in n]
        expected = 0.5 * source.model.layers[1].mlp.down_proj.weight.norm() / torch.sqrt(
            sum(p.pow(2).sum() for p in layer1))
    drift = weight_drift(source, converted)
    assert drift["layers"][0] == 0 and drift["layers"][1] == pytest.approx(float(expected), rel=1e-4)
    assert 0 < drift["overall"] < drift["layers"][1]


def test_per_position_loss_shapes_and_periodicity_inputs():
    dlm = make_dlm(block_size=4)
    x0 = torch.randint(1, 200, (3, 16))
    out = per_position_loss(dlm, x0, samples=2, seed=0)
    assert len(out["by_position"]) == 16 and len(out["by_offset"]) == 4
    assert all(math.isfinite(v) and v > 0 for v in out["by_offset"])
    assert out == per_position_loss(dlm, x0, samples=2, seed=0)  # seeded


def test_verdict_rules():
    assert verdict([0.5, 0.52, 0.51], [0.3, 0.31, 0.29], None)["verdict"] == "reproduced"
    assert verdict([0.3, 0.31, 0.29], [0.5, 0.52, 0.51], None)["verdict"] == "not reproduced"
    assert verdict([0.5, 0.3, 0.4], [0.45, 0.35, 0.38], None)["verdict"] == "inconclusive"
    # one seed each: the noise comes from elsewhere, or there is none
    assert verdict([0.5], [0.4], noise=0.01)["verdict"] == "reproduced"
    assert verdict([0.5], [0.4], noise=0.1)["verdict"] == "inconclusive"
    assert verdict([0.5], [0.4], noise=None)["verdict"] == "inconclusive"
    assert verdict([], [0.4], noise=None)["verdict"] == "not run"


def test_study_runs_skips_and_resumes(tmp_path, monkeypatch):
    import edlm.train

    cfg = tiny_study(tmp_path, conversion_steps=4, save_every=2)
    results = run_study(cfg)
    assert not results["missing"]
    assert 0 <= results["source"]["answers"]["acc"] <= 1 and results["source"]["answers"]["tokens_per_forward"] == 1
    att = results["comparisons"]["attention"]
    assert [r["seed"] for r in att["bidirectional"]["runs"]] == [0, 1]
    masking = results["comparisons"]["masking"]["uniform"]["runs"][0]
    assert [a["threshold"] for a in masking["answers"]] == [0.9, 0.5]  # the comparison's thresholds
    clean = att["block_causal_clean"]["runs"][0]
    assert clean["tokens"] == 4 * 2 * 32 and clean["weight_drift"]["overall"] > 0
    assert len(clean["per_position_loss"]["by_offset"]) == 8

    # a finished study trains nothing again
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("edlm.studies.grid.convert", no_training)
    monkeypatch.setattr("edlm.studies.grid.pretrain_ar", no_training)
    assert run_study(cfg)["comparisons"] == results["comparisons"]
    monkeypatch.undo()

    # an interrupted run (checkpoint-2 on disk, no final model, no eval) resumes from its checkpoint
    run_dir = tmp_path / "runs" / "runs" / att["bidirectional"]["runs"][1]["run"]
    assert (run_dir / "checkpoint-2").is_dir()
    for f in ("eval.json", "edlm_config.json", "model.safetensors"):
        (run_dir / f).unlink()
    calls = []
    real = edlm.train.convert
    monkeypatch.setattr("edlm.studies.grid.convert", lambda c, resume, progress: calls.append(resume) or real(
        c, resume, progress))
    again = run_study(cfg)
    assert calls == [True]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert again["comparisons"]["attention"]["bidirectional"]["runs"][1]["final_loss"] == pytest.approx(
        att["bidirectional"]["runs"][1]["final_loss"], rel=1e-4)

    report = write_report(again, cfg.report_dir, command="edlm study --config x.yaml")
    text = report.read_text()
    assert "weight drift" in text.lower() and "## Verdicts" in text and "edlm study --config x.yaml" in text
    # provenance: the CPU and the kernels it trained with (they decide which model a seed gives)
    kernels = again["machine"]["cpu_kernels"]
    assert kernels and f"ATen kernels {kernels}" in text and f"ATEN_CPU_CAPABILITY={kernels.lower()}" in text
    for png in ("attention.png", "weight_drift.png", "masking_pareto.png", "lora.png", "loss_by_position.png"):
        assert (report.parent / png).stat().st_size > 1000 and f"({png})" in text
    for verdict_word in ("reproduced", "inconclusive", "not reproduced"):
        if verdict_word in text:
            break
    else:
        pytest.fail("no verdict in the report")
    assert text.count("| **") >= 5  # clean vs bidirectional, drift, masking, full vs LoRA, periodic loss


def test_study_cli_help_and_bad_config(tmp_path, capsys):
    from edlm.cli import main

    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "verdict" in capsys.readouterr().out
    assert main(["study", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_changed_settings_are_refused_not_silently_reused(tmp_path):
    cfg = tiny_study(tmp_path)
    cfg.comparisons = {"only": Comparison(variants={"default": {}})}
    run_study(cfg)
    cfg.conversion["lr"] = 5e-4
    with pytest.raises(EdlmError, match="other settings"):
        run_study(cfg)


def test_study_source_is_the_given_model_or_the_one_the_study_trains(tmp_path):
    assert study_source(StudyConfig(output_dir=str(tmp_path))) == tmp_path / "source"
    assert study_source(StudyConfig(source={"pretrained": str(tmp_path / "m")})) == tmp_path / "m"
    # the headline measured Path("embedded") here, while the study trained on the embedded model's folder
    assert study_source(StudyConfig(source={"pretrained": "embedded"})) == embedded_model_dir()
