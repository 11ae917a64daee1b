import json
import subprocess
import sys
from pathlib import Path

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
    bench = tmp_path / "bench.json"
    r = run("bench", "--model", str(out), "--json", str(bench), "--max-new-tokens", "16", "--sweep", "0.9", "0.5",
            "--dtypes", "fp32", "--no-chat")
    assert r.returncode == 0, r.stderr
    result = json.loads(bench.read_text())
    assert {"ar", "dlm", "speedup", "settings", "machine"} <= set(result)
    assert {"tokens_per_s", "tokens_per_forward", "latency_s"} <= set(result["dlm"])
    assert (tmp_path / "bench.png").is_file() and "speedup" in r.stdout


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
