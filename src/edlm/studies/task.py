"""The study task: short arithmetic problems with exact answers, a seeded training set and a held-out test set.

Problems come from ``reasoning-gym`` (``generator: reasoning_gym``, any of its datasets; the compact expression in
the item's metadata is used as the question when there is one) or from edlm's own generator (``builtin``, no extra
dependency, for tests). A problem is written ``"QUESTION = ANSWER"``; documents are separated by EOS in training,
so at test time the prompt is ``EOS QUESTION =`` and the answer is what the model writes before its next EOS.
Test questions never occur in the training set.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edlm.errors import EdlmError


@dataclass
class TaskConfig:
    """Where the study's problems come from."""

    generator: str = "reasoning_gym"
    """``reasoning_gym`` (needs ``pip install reasoning-gym``) or ``builtin`` (sums and differences)."""
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

    def __post_init__(self) -> None:
        if self.generator not in ("reasoning_gym", "builtin"):
            raise EdlmError(f"task.generator must be 'reasoning_gym' or 'builtin', got {self.generator!r}")
        if self.train_size < 1 or self.test_size < 1:
            raise EdlmError("task.train_size and task.test_size must be >= 1")


@dataclass
class Problem:
    question: str
    answer: str

    @property
    def text(self) -> str:
        return f"{self.question} {self.answer}"


def _builtin(n: int, seed: int, max_digits: int = 2, **_: Any) -> list[Problem]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(10 ** max_digits), rng.randrange(10 ** max_digits)
        op = rng.choice("+-")
        out.append(Problem(f"{a} {op} {b} =", str(a + b if op == "+" else a - b)))
    return out


def _reasoning_gym(name: str, n: int, seed: int, options: dict[str, Any]) -> list[Problem]:
    from edlm.evaluate import load_reasoning_gym

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
                       (test_path, [{"question": p.question, "answer": p.answer} for p in test])):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
    return train_path, test_path


def read_test(path: Path) -> list[Problem]:
    return [Problem(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
