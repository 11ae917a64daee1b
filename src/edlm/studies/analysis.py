"""Measurements on a converted model: answer accuracy and tokens per forward, weight drift from the AR source,
and the masked-token loss at each position of a block."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch

from edlm.config import DecodeConfig
from edlm.evals.tasks import Problem, score_answer
from edlm.harness import ar_system, dlm_system, run_interleaved

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def prompt_ids(tokenizer, problem: Problem) -> list[int]:
    """``EOS QUESTION``: a problem starts a document, as in training."""
    return [tokenizer.eos_token_id] + tokenizer(problem.question, add_special_tokens=False)["input_ids"]


def answer_text(tokenizer, ids: list[int]) -> str:
    """The answer a model wrote: its new tokens up to its first EOS, as stripped text."""
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids).strip()


def decode_problems(run, tokenizer, problems: list[Problem], batch: int) -> dict[str, Any]:
    """Decode every problem with ``run(prompts) -> DecodeOutput``, ``batch`` prompts at a time (grouped by family).

    Returns accuracy overall and per family, tokens per forward (per row), tokens/s (generated tokens up to and
    including EOS over the decoding wall time) and the answers in problem order.
    """
    return decode_interleaved({"run": run}, tokenizer, problems, batch)["run"]


def decode_interleaved(runs: dict[Any, Any], tokenizer, problems: list[Problem], batch: int) -> dict[Any, Any]:
    """:func:`decode_problems` for several systems at once, through the comparison harness
    (:func:`edlm.harness.run_interleaved`: each batch of prompts is decoded by every run in turn, the order
    rotating from batch to batch). Returns ``{name: result}`` for ``runs = {name: run}``."""
    order = sorted(range(len(problems)), key=lambda i: (problems[i].family, i))
    prompts = [prompt_ids(tokenizer, p) for p in problems]
    got = run_interleaved(runs, prompts, batch, order=order, detokenize=lambda ids: answer_text(tokenizer, ids))
    return {name: _scored(problems, r) for name, r in got.items()}


def _scored(problems: list[Problem], run) -> dict[str, Any]:
    right: dict[str, list[bool]] = defaultdict(list)
    for p, a in zip(problems, run.texts):
        right[p.family].append(score_answer(a, p.answer, exact=True))
    flat = [ok for oks in right.values() for ok in oks]
    return {"accuracy": sum(flat) / len(flat), "per_family": {f: sum(v) / len(v) for f, v in sorted(right.items())},
            "tokens_per_forward": run.tokens_per_forward, "tokens_per_s": run.tokens_per_s, "tokens": run.tokens,
            "seconds": run.seconds, "n": len(problems), "batch": run.batch, "answers": run.texts}


@torch.no_grad()
def answer_accuracy(problems: list[Problem], dlm=None, ar_model=None, tokenizer=None,
                    decode: DecodeConfig | None = None) -> dict[str, Any]:
    """Exact-answer accuracy, tokens per forward and tokens/s, decoding one problem at a time (batch 1,
    :func:`decode_problems`).

    Give ``dlm`` to decode it with ``decode`` (None: ``DecodeConfig()``), or ``ar_model`` (+ ``tokenizer``) for
    AR decoding (``decode``'s ``max_new_tokens`` and sampling; greedy by default). Tokens are counted up to and
    including EOS, so both systems are measured on the same text.
    """
    tok = dlm.tokenizer if dlm is not None else tokenizer
    cfg = decode or DecodeConfig()
    system = dlm_system(dlm, cfg) if dlm is not None else ar_system(ar_model, cfg, tok.eos_token_id)
    r = decode_problems(system, tok, problems, 1)
    return {"acc": r["accuracy"], "n": r["n"], "tokens_per_forward": r["tokens_per_forward"],
            "tokens_per_s": r["tokens_per_s"], "threshold": cfg.threshold if dlm is not None else None}


def weight_drift(source: torch.nn.Module, converted: torch.nn.Module) -> dict[str, Any]:
    """Relative change ||W - W0|| / ||W0|| (Frobenius, over all weights of a group) of a converted model.

    Groups: each decoder layer, the embeddings (rows of the source vocabulary only; the added mask token is
    new), and everything else ("other": final norm, untied head). Parameters are matched by name.
    """
    before = dict(source.named_parameters())
    after = dict(converted.named_parameters())
    diff2: dict[str, float] = defaultdict(float)
    base2: dict[str, float] = defaultdict(float)
    for name, w0 in before.items():
        w = after.get(name)
        if w is None:
            continue
        w0, w = w0.detach().float(), w.detach().float()
        if w.shape != w0.shape:  # resized vocabulary: compare the original rows
            w = w[: w0.shape[0]]
        match = _LAYER.search(name)
        group = f"layer{int(match.group(1))}" if match else ("embed" if "embed" in name else "other")
        diff2[group] += float((w - w0).pow(2).sum())
        base2[group] += float(w0.pow(2).sum())
    drift = {g: (diff2[g] / max(base2[g], 1e-30)) ** 0.5 for g in diff2}
    layers = sorted((int(g[5:]), v) for g, v in drift.items() if g.startswith("layer"))
    total = (sum(diff2.values()) / max(sum(base2.values()), 1e-30)) ** 0.5
    return {"layers": [v for _, v in layers], "embed": drift.get("embed"), "other": drift.get("other"),
            "overall": total}


@torch.no_grad()
def per_position_loss(dlm, x0: torch.Tensor, samples: int = 8, seed: int = 0) -> dict[str, Any]:
    """Masked-token cross-entropy at every position of held-out sequences ``x0`` (N, L).

    Every block gets its own mask ratio t ~ U(0, 1] and each position is masked with probability t (the same
    noise for every model, whatever schedule it was trained with). Returns the mean loss per absolute position
    (shows the periodic pattern across blocks) and per offset inside a block.
    """
    block = dlm.config.block_size
    n, length = x0.shape
    x0 = x0.to(dlm.device)
    generator = torch.Generator(device=dlm.device).manual_seed(seed)
    loss_sum = torch.zeros(length, dtype=torch.float64)
    count = torch.zeros(length, dtype=torch.float64)
    for _ in range(samples):
        t = 1.0 - torch.rand(n, length // block, generator=generator, device=dlm.device)
        u = torch.rand(n, length, generator=generator, device=dlm.device)
        masked = u < t.repeat_interleave(block, dim=1)
        if dlm.config.token_shift:
            masked[:, 0] = False  # token 0 has no predictor
        xt = torch.where(masked, torch.full_like(x0, dlm.mask_id), x0)
        logits = dlm.training_logits(xt, x0).float()
        logits[..., dlm.mask_id] = float("-inf")
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (N, L)
        loss_sum += torch.where(masked, ce, 0.0).sum(0).double().cpu()
        count += masked.sum(0).double().cpu()
    by_position = [float(v) if c > 0 else None for v, c in zip(loss_sum / count.clamp_min(1), count)]
    offset_sum = loss_sum.view(-1, block).sum(0)
    offset_count = count.view(-1, block).sum(0)
    return {"block_size": block, "by_position": by_position,
            "by_offset": (offset_sum / offset_count.clamp_min(1)).tolist()}


def pack_problems(tokenizer, problems: list[Problem], seq_len: int, rows: int) -> torch.Tensor:
    """Held-out problems joined with EOS into ``rows`` sequences of ``seq_len`` tokens (as training packs)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for p in problems:
        stream += tokenizer(p.text, add_special_tokens=False)["input_ids"] + [eos]
    rows = min(rows, len(stream) // seq_len)
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)
