"""Self-distillation data: the source's own continuations of a prompt set, written as jsonl.

A drafter must predict what the source will say, not what a corpus says (DFlash, Medusa-2 and d3LLM train on the
target's outputs). :func:`distill` decodes every prompt with the source (greedy, or sampled with a seed per prompt),
in batches of prompts of similar length, and appends one record per prompt::

    {"id": 17, "domain": "math", "prompt": "...", "completion": "...", "text": "<chat template>...<completion><eos>"}

``text`` is what conversion trains on (``data.text_field: text``). A rerun skips the ids already in the file, so an
interrupted run resumes where it stopped; records are appended whole, one line each.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from edlm.api import encode_prompt
from edlm.ar import iter_ar
from edlm.assets.prompts import distillation_prompts
from edlm.config import DecodeConfig
from edlm.errors import EdlmError

logger = logging.getLogger(__name__)

_WINDOW_BATCHES = 4  # batches whose prompts are sorted by length together


@dataclass
class DistillConfig:
    """What ``edlm distill`` generates."""

    prompts: str = "builtin"
    """``builtin`` (chat instructions, maths word problems and code requests made from templates, never a demo
    prompt), or a file: ``.jsonl`` with a ``prompt`` field per line, or plain text with one prompt per line."""
    num_prompts: int = 1200
    """How many built-in prompts (a file's prompts are all used)."""
    max_new_tokens: int = 160
    """Longest continuation per prompt."""
    batch_size: int = 16
    """Prompts decoded together."""
    temperature: float = 0.0
    """0: the source's greedy continuations (what speculative decoding verifies against); > 0 samples."""
    seed: int = 0
    """Seeds the built-in prompt set and, when sampling, each prompt's generator (seed + id)."""
    chat: bool = True
    """Wrap each prompt in the tokenizer's chat template (with the generation prompt)."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise EdlmError("distill: num_prompts, max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0:
            raise EdlmError(f"distill: temperature must be >= 0, got {self.temperature}")


def read_prompts(cfg: DistillConfig) -> list[tuple[str, str]]:
    """(domain, prompt) pairs of the configured set."""
    if cfg.prompts == "builtin":
        return distillation_prompts(cfg.num_prompts, seed=cfg.seed)
    path = Path(cfg.prompts)
    if not path.is_file():
        raise EdlmError(f"prompt file {str(path)!r} does not exist; give a .jsonl file with a 'prompt' field per "
                        "line, a text file with one prompt per line, or 'builtin'")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                out.append((str(record.get("domain", "file")), str(record["prompt"])))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise EdlmError(f"{path}:{i} is not a JSON object with a 'prompt' field") from None
        return out
    return [("file", line.strip()) for line in lines]


def _done_ids(out: Path) -> set[int]:
    """Ids already answered in ``out``; a last line cut off by a kill is removed first."""
    if not out.is_file():
        return set()
    text = out.read_text()
    if text and not text.endswith("\n"):
        tmp = out.with_suffix(".tmp")
        tmp.write_text(text[:text.rfind("\n") + 1])
        os.replace(tmp, out)
    ids = set()
    for line in out.read_text().splitlines():
        try:
            ids.add(int(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by a kill: its prompt is generated again
    return ids


def distill(model, tokenizer, cfg: DistillConfig, out: str | os.PathLike,
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Append the source's continuations of the prompt set to ``out`` (jsonl); returns its path.

    Args:
        model: the source causal LM (eval mode is set here).
        tokenizer: its tokenizer.
        cfg: the prompt set and decoding settings.
        out: the jsonl file; prompts whose id it already holds are skipped (resume).
        progress: called as ``progress(done, total)`` after every batch.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = read_prompts(cfg)
    done = _done_ids(out)
    todo = [i for i in range(len(prompts)) if i not in done]
    encoded = {i: encode_prompt(tokenizer, prompts[i][1], cfg.chat) for i in todo}
    # Similar lengths share a batch (little padding), sorted within windows of a few batches taken in prompt order:
    # a run stopped early holds a prefix of the prompt set, window by window, not its shortest prompts.
    window = _WINDOW_BATCHES * cfg.batch_size
    todo = [i for at in range(0, len(todo), window)
            for i in sorted(todo[at:at + window], key=lambda i: len(encoded[i]))]
    eos = tokenizer.eos_token_id
    model.eval()
    logger.info("distilling %d prompts (%d already in %s)", len(todo), len(done), out)
    finished = len(prompts) - len(todo)
    for at in range(0, len(todo), cfg.batch_size):
        batch = todo[at:at + cfg.batch_size]
        records = []
        for row, i in zip(_decode(model, [encoded[i] for i in batch], batch, cfg, eos), batch):
            ids = row[:-1] if row and row[-1] == eos else row
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            prompt_text = tokenizer.decode(encoded[i], skip_special_tokens=False)
            text = prompt_text + tokenizer.decode(row, skip_special_tokens=False)
            records.append({"id": i, "domain": prompts[i][0], "prompt": prompts[i][1], "completion": completion,
                            "text": text, "tokens": len(row)})
        with out.open("a") as f:  # whole lines, flushed per batch
            f.write("".join(json.dumps(r) + "\n" for r in records))
        finished += len(batch)
        if progress is not None:
            progress(finished, len(prompts))
    return out


def _decode(model, prompts: list[list[int]], ids: list[int], cfg: DistillConfig, eos: int | None) -> list[list[int]]:
    """Continuations of a batch; when sampling, prompt ``i`` draws from its own generator (seed + i), so a row's
    text never depends on its batch neighbours."""
    decode = DecodeConfig(mode="ar", max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    rows: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        for new, _ in iter_ar(model, prompts, decode, eos, seeds=[cfg.seed + i for i in ids]):
            for row, part in zip(rows, new):
                row.extend(part)
    return rows


def distilled_tokens(path: str | os.PathLike) -> tuple[int, int]:
    """(records, generated tokens) of a distilled file."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return len(records), sum(int(r.get("tokens", 0)) for r in records)
