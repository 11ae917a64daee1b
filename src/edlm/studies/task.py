"""The study task: short arithmetic problems with exact answers, a seeded training set and a held-out test set.

Problems come from ``reasoning-gym`` (``generator: reasoning_gym``, any of its datasets; the compact expression in
the item's metadata is used as the question when there is one), from edlm's own sums (``builtin``, no extra
dependency, for tests), or from a mix of edlm's sequence-continuation families (``families``: count, down, seq; see
``FAMILIES``), each with its own test set. A problem is written ``"QUESTION ANSWER"`` (the question ends with
``=``); documents are separated by EOS in training, so at test time the prompt is ``EOS QUESTION`` and the answer
is what the model writes before its next EOS.
Test questions never occur in the training set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edlm.errors import EdlmError
from edlm.evals.tasks import Problem, arithmetic, load_reasoning_gym


@dataclass
class TaskConfig:
    """Where the study's problems come from."""

    generator: str = "reasoning_gym"
    """``reasoning_gym`` (needs ``pip install reasoning-gym``), ``builtin`` (sums and differences) or ``families``
    (a mix of the task families named in ``families``)."""
    dataset: str = "chain_sum"
    """reasoning-gym dataset name (ignored by ``builtin``)."""
    options: dict[str, Any] = field(default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                             "max_digits": 2})
    """Keyword arguments of the dataset (difficulty); ``builtin`` reads ``max_digits``."""
    train_size: int = 100_000
    test_size: int = 200
    seed: int = 1
    """Seed of the training problems; the test problems use ``seed + 1000``."""
    text_corpus: list[str] = field(default_factory=lambda: ["builtin:tiny"])
    """Plain text mixed into the source model's training data and every conversion run (may be empty)."""
    families: dict[str, dict[str, Any]] = field(default_factory=dict)
    """``generator: families`` only: family name (see ``FAMILIES``) -> its options. ``train_size`` and
    ``test_size`` are per family."""

    def __post_init__(self) -> None:
        if self.generator not in ("reasoning_gym", "builtin", "families"):
            raise EdlmError(f"task.generator must be 'reasoning_gym', 'builtin' or 'families', got {self.generator!r}")
        if self.train_size < 1 or self.test_size < 1:
            raise EdlmError("task.train_size and task.test_size must be >= 1")
        if self.generator == "families":
            if not self.families:
                raise EdlmError(f"task.generator 'families' needs task.families, e.g. {{count: {{}}, seq: {{}}}}; "
                                f"known families: {sorted(FAMILIES)}")
            unknown = sorted(set(self.families) - set(FAMILIES))
            if unknown:
                raise EdlmError(f"unknown task families {unknown}; choose from {sorted(FAMILIES)}")


def _builtin(n: int, seed: int, max_digits: int = 2, **_: Any) -> list[Problem]:
    return [Problem(f"{p.expression} =", str(p.value))
            for p in arithmetic(n, seed, max_digits=max_digits, ops="+-", exact_digits=False)]


# ------------------------------------------------------------------------------------------- task families
# Sequences continued from a short prompt (``count 374 =`` -> ``375 376 377 378 379 380``): every answer token follows
# from the few tokens before it, a local rule that a small model learns within a CPU budget, and the answer is a
# structured continuation with room for parallel decoding. Designs that need a lookup far back in the prompt were
# not learned by the 2.4M source in 700-1,500 steps (answers copied at a fixed 20-40 position offset; labelled
# groups; associative recall over a key table): see docs/headline/analysis.md. The families differ in the rule:
# increment (count), decrement (down) and a step read from the first two terms (seq).


def _numbers(values: list[int]) -> str:
    return " ".join(str(v) for v in values)


def _count(rng: random.Random, terms: int = 6) -> Problem:
    """``count 374 =`` -> ``375 376 377 378 379 380`` (three-digit numbers throughout)."""
    start = rng.randrange(100, 1000 - terms)
    return Problem(f"count {start} =", _numbers(list(range(start + 1, start + terms + 1))), "count")


def _down(rng: random.Random, terms: int = 6) -> Problem:
    """``down 403 =`` -> ``402 401 400 399 398 397``."""
    start = rng.randrange(100 + terms, 1000)
    return Problem(f"down {start} =", _numbers(list(range(start - 1, start - terms - 1, -1))), "down")


def _seq(rng: random.Random, terms: int = 6, max_step: int = 9) -> Problem:
    """``seq 312 315 =`` -> ``318 321 324 327 330 333`` (the step of the first two terms, continued)."""
    step = rng.randrange(1, max_step + 1)
    first = rng.randrange(100, 1000 - step * (terms + 1))
    values = [first + step * i for i in range(terms + 2)]
    return Problem(f"seq {values[0]} {values[1]} =", _numbers(values[2:]), "seq")


FAMILIES = {"count": _count, "down": _down, "seq": _seq}


def _families(families: dict[str, dict[str, Any]], n: int, seed: int) -> list[Problem]:
    """``n`` problems of each family, interleaved; each family has its own seeded stream."""
    per_family = []
    for i, (name, options) in enumerate(sorted(families.items())):
        rng = random.Random(seed * 1009 + i)
        try:
            per_family.append([FAMILIES[name](rng, **(options or {})) for _ in range(n)])
        except TypeError as e:
            raise EdlmError(f"task family {name!r}: bad options {options}: {e}") from None
    return [p for row in zip(*per_family) for p in row]


def _reasoning_gym(name: str, n: int, seed: int, options: dict[str, Any]) -> list[Problem]:
    items = load_reasoning_gym(
        name, n, seed, options,
        missing="task.generator reasoning_gym needs the package: pip install reasoning-gym (or set task.generator: "
                "builtin)",
        error="reasoning-gym could not build dataset {name!r} with options {options}: {e}")
    out = []
    for item in items:
        expression = item.get("metadata", {}).get("expression")
        question = f"{expression} =" if expression else item["question"]
        out.append(Problem(question, str(item["answer"])))
    return out


def make_problems(cfg: TaskConfig, n: int, seed: int) -> list[Problem]:
    if cfg.generator == "builtin":
        return _builtin(n, seed, **cfg.options)
    if cfg.generator == "families":
        return _families(cfg.families, n, seed)
    return _reasoning_gym(cfg.dataset, n, seed, cfg.options)


def write_task(cfg: TaskConfig, folder: Path) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (documents: problems, then the text corpus is added by the data config) and
    ``test.jsonl`` (question, answer) into ``folder``; returns both paths. Idempotent."""
    folder.mkdir(parents=True, exist_ok=True)
    train_path, test_path = folder / "train.jsonl", folder / "test.jsonl"
    if train_path.is_file() and test_path.is_file():
        return train_path, test_path
    test = make_problems(cfg, cfg.test_size, cfg.seed + 1000)
    held_out = {p.question for p in test}
    train = [p for p in make_problems(cfg, cfg.train_size, cfg.seed) if p.question not in held_out]
    if not train:
        raise EdlmError("every training problem is also a test problem; widen the task's difficulty options")
    for path, rows in ((train_path, [{"text": p.text} for p in train]),
                       (test_path, [{"question": p.question, "answer": p.answer, "family": p.family}
                                    for p in test])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return train_path, test_path


def read_test(path: Path) -> list[Problem]:
    return [Problem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def first_per_family(problems: list[Problem], n: int | None) -> list[Problem]:
    """The first ``n`` problems of each family (all when ``n`` is None), families in sorted order."""
    return [p for fam in sorted({q.family for q in problems}) for p in [q for q in problems if q.family == fam][:n]]
