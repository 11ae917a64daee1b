"""edlm eval / sweep / table on a tiny converted model, and choice-task scoring."""

import pytest
from conftest import make_dlm

from edlm.evals.run import evaluate_choices
from edlm.evals.tasks import ChoiceDoc


def test_choice_scoring_picks_the_most_likely_continuation():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    def loglik(context, continuation):  # prefers continuations made of 'a'
        return sum(0.0 if t == ord("a") else -1.0 for t in continuation)

    docs = [ChoiceDoc("Q", [" bb", " aa"], gold=1), ChoiceDoc("Q", [" a", " bbbb"], gold=0),
            ChoiceDoc("Q", [" b", " bbbbbbbb"], gold=1)]
    r = evaluate_choices(docs, Tok(), loglik)
    assert r["n"] == 3 and r["acc"] == pytest.approx(2 / 3)
    assert r["acc_norm"] == pytest.approx(2 / 3)


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
