"""Self-distillation data and the gated-drafter recipe end to end on a tiny model."""

import json

import pytest

from edlm.api import encode_prompt
from edlm.ar import ar_generate
from edlm.assets.prompts import DEMO_PROMPTS, distillation_prompts, heldout_prompts, packaged_prompts
from edlm.checkpoints import tiny_model
from edlm.config import DecodeConfig
from edlm.distill import DistillConfig, distill, distilled_tokens, read_prompts
from edlm.errors import EdlmError


def test_builtin_prompts_mix_domains_never_hold_a_demo_prompt_and_are_stable():
    prompts = distillation_prompts(600, seed=0)
    assert len({p for _, p in prompts}) == 600
    assert {d for d, _ in prompts} == {"chat", "math", "code"}
    assert not {p for _, p in DEMO_PROMPTS} & {p for _, p in prompts}
    assert distillation_prompts(600, seed=0)[:50] == distillation_prompts(50, seed=0)  # a prefix, whatever n


def test_packaged_prompts_are_balanced_stable_and_never_held_out_or_demo():
    prompts = packaged_prompts(seed=0)
    held = heldout_prompts()
    assert len(prompts) > 4000 and len({p for _, p in prompts}) == len(prompts)
    assert len(held) == 40 and {d for d, _ in held} == {"chat", "math", "code"}
    assert not ({p for _, p in held} | {p for _, p in DEMO_PROMPTS}) & {p for _, p in prompts}
    first = [d for d, _ in prompts[:300]]
    assert {first.count(d) for d in ("chat", "math", "code")} == {100}  # the domains take turns
    assert packaged_prompts(seed=0) == prompts and packaged_prompts(seed=1) != prompts
    mixed = read_prompts(DistillConfig(prompts="mixed", num_prompts=30))
    assert mixed[:30] == distillation_prompts(30, seed=0) and mixed[30:] == prompts  # builtin ids stay put


def test_distill_writes_the_sources_greedy_answers_and_resumes(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    model.eval()
    cfg = DistillConfig(num_prompts=7, max_new_tokens=6, batch_size=3)
    out = tmp_path / "d.jsonl"
    distill(model, tok, cfg, out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == list(range(7))
    prompts = read_prompts(cfg)
    for r in records:  # each answer is what the source says greedily, alone
        ids = encode_prompt(tok, prompts[r["id"]][1])
        want = ar_generate(model, [ids], DecodeConfig(max_new_tokens=6), tok.eos_token_id).sequences[0]
        assert r["tokens"] == len(want) and r["prompt"] == prompts[r["id"]][1]
        assert r["text"].endswith(tok.decode(want, skip_special_tokens=False))
    # A cut-off last line and missing ids are redone; whole records are kept.
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:4]) + "\n" + lines[4][:10])
    distill(model, tok, cfg, out)
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert again[:4] == records[:4] and sorted(r["id"] for r in again) == list(range(7))
    # Resuming with another prompt set would pair answers with the wrong prompts: refused, nothing written.
    before = out.read_text()
    with pytest.raises(EdlmError, match="another prompt set"):
        distill(model, tok, DistillConfig(num_prompts=7, max_new_tokens=6, batch_size=3, seed=1), out)
    assert out.read_text() == before


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(DistillConfig(prompts=str(tmp_path / "p.txt"))) == [("file", "first prompt"),
                                                                             ("file", "second prompt")]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "domain": "chat"}\n{"text": "b"}\n')
    with pytest.raises(EdlmError, match="p.jsonl:2"):
        read_prompts(DistillConfig(prompts=str(tmp_path / "p.jsonl")))
    with pytest.raises(EdlmError, match="does not exist"):
        read_prompts(DistillConfig(prompts=str(tmp_path / "missing.txt")))


def test_drafter_recipe_end_to_end_on_a_tiny_model(tmp_path):
    from edlm.studies.drafter import load_drafter_config, run_drafter

    cfg_file = tmp_path / "drafter.yaml"
    cfg_file.write_text(f"""
output_dir: {tmp_path / 'run'}
distill: {{num_prompts: 6, max_new_tokens: 12, batch_size: 3}}
convert:
  model: tiny
  diffusion: {{block_size: 4, token_shift: true, clean_causal: true}}
  data: {{seq_len: 32, align_documents: true}}
  lora: {{gated: true, r: 4, alpha: 8}}
  max_steps: 3
  lr: 1.0e-3
  save_every: 2
measure: {{prompts_per_domain: 1, max_new_tokens: 8, batch_sizes: [1, 2], exact_problems: 3}}
""")
    cfg = load_drafter_config(cfg_file)
    assert cfg.convert.data.corpus == [str(tmp_path / "run" / "distill.jsonl")]
    result = run_drafter(cfg)
    assert distilled_tokens(tmp_path / "run" / "distill.jsonl")[0] == 6
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()
    for batch in ("1", "2"):
        row = result["by_batch"][batch]
        assert row["identical"] == 1.0  # speculative text == the source's, prompt by prompt
        assert row["speculative"]["texts"] == row["ar"]["texts"] and len(row["ar"]["texts"]) == 3
        assert row["ar"]["tokens_per_forward"] == pytest.approx(1.0, abs=0.2)  # + the prefill forward
    curve = result["budget_curve"]  # the checkpoint at step 2 of 3 (50%) and the end
    assert [p["step"] for p in curve] == [2, 3] and all(p["tokens_per_forward"] >= 1.0 for p in curve)
    exact = result["exact_answers"]
    assert exact["n_per_family"] == 3 and set(exact["families"]) == {"sequence", "addition"}
    assert all(0.0 <= v <= 1.0 for row in exact["families"].values() for v in row.values())
    from edlm.studies.drafter import drafter_report

    table = drafter_report(result)
    assert "budget curve" in table and "50% " in table and "exact answers, addition (n=3)" in table
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["distilled"]["records"] == 6 and "machine" in saved
    # A second run reuses every stage's output.
    before = [(tmp_path / "run" / f).stat().st_mtime_ns for f in ("adapter/adapter.safetensors", "results.json")]
    assert run_drafter(cfg) == saved
    assert [(tmp_path / "run" / f).stat().st_mtime_ns for f in ("adapter/adapter.safetensors", "results.json")] \
        == before


def test_embedded_demo_cli_with_an_adapter_writes_the_documented_json(tmp_path, capsys):
    from test_adapter import gated

    from edlm.cli import main

    dlm, _ = gated(random_head=False)
    dlm.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "demo.json"
    assert main(["demo", "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "8", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert set(saved) >= {"model", "prompts", "ar", "speculative", "diffusion", "machine"}
    assert set(saved["ar"]) == {"tokens_per_s", "dtype"}
    assert set(saved["speculative"]) == {"tokens_per_forward", "tokens_per_s", "speedup", "identical"}
    assert set(saved["diffusion"]) == {"tokens_per_forward", "tokens_per_s", "speedup"}
    assert saved["settings"]["threshold"] == DecodeConfig().threshold  # no --threshold: DecodeConfig's default
    assert saved["speculative"]["identical"] == 1.0 and len(saved["prompts"]) == 4
    assert all(p["speculative"]["text"] == p["ar"]["text"] for p in saved["prompts"])
    printed = capsys.readouterr().out
    assert printed.count("identical to the source") == 4 and "all prompts: AR" in printed


def test_exact_problems_are_deterministic_with_checkable_answers():
    from edlm.evals.tasks import score_answer
    from edlm.studies.drafter import exact_problems

    problems = exact_problems(50)
    assert problems == exact_problems(50) and len(problems) == 100
    for p in problems:
        fields = p.question.replace("=", ",").replace("+", ",").replace("\n", ",").split(",")
        numbers = [int(x) for x in fields if x.strip()]
        answer = [int(x) for x in p.answer.split(", ")]
        if p.family == "sequence":  # an arithmetic progression whose next two terms are the answer
            d = numbers[1] - numbers[0]
            assert d > 0 and numbers + answer == [numbers[0] + i * d for i in range(7)]
        else:  # the sum of the last two numbers, after three worked examples
            assert p.question.count("\n") == 3 and answer == [numbers[-2] + numbers[-1]]
    assert score_answer(" 63, 70, 77", "63, 70") and not score_answer(" 63, 71", "63, 70")
    assert not score_answer("none", "5") and not score_answer(" 63", "63, 70")
