"""The study report: tables, PNG plots and a verdict per paper claim, rendered from ``study.json``.

A verdict compares two groups of runs by the difference of their mean accuracies (or weight drifts) against the
noise: the standard error from the seeds when both groups have two or more, otherwise the seed-to-seed spread
measured on the comparison that has seeds (stated in the report). "reproduced" needs the difference to exceed
twice that standard error in the paper's direction; the opposite gives "not reproduced"; anything else is
"inconclusive". The per-position loss claim compares the mean loss over the second half of the block's offsets with
the first half (a 5% margin either way).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from edlm.config import DecodeConfig
from edlm.results import new_figure, save_figure
from edlm.table import Table

# Which variant names play which role in the claims (names as in configs/study.yaml).
CLEAN, NOISY, BIDIR = "block_causal_clean", "block_causal_noisy", "bidirectional"
SHIFT, NO_SHIFT = "clean_token_shift", "clean_no_shift"  # the variant that flips token shift from the base
UNIFORM = "uniform"


def _values(variant: dict[str, Any], threshold: float, key: str = "acc") -> list[float]:
    """``key`` of each run's answers at ``threshold`` (runs not evaluated there are skipped)."""
    return [a[key] for run in variant["runs"] for a in run["answers"] if a["threshold"] == threshold]


def _drifts(variant: dict[str, Any]) -> list[float]:
    return [r["weight_drift"]["overall"] for r in variant["runs"]]


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) >= 2 else float("nan")


def _fmt(xs: list[float], spec: str = ".3f") -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{format(_mean(xs), spec)} ± {format(_std(xs), spec)} (n={len(xs)})"


def verdict(better: list[float], worse: list[float], noise: float | None) -> dict[str, Any]:
    """Does ``better`` exceed ``worse`` beyond the noise? (see the module docstring)."""
    if not better or not worse:
        return {"verdict": "not run", "diff": None, "se": None}
    diff = _mean(better) - _mean(worse)
    if len(better) >= 2 and len(worse) >= 2:
        se, source = math.sqrt(_std(better) ** 2 / len(better) + _std(worse) ** 2 / len(worse)), "seeds"
    elif noise is not None and not math.isnan(noise):
        se, source = noise * math.sqrt(1 / len(better) + 1 / len(worse)), "seed spread of the attention comparison"
    else:
        return {"verdict": "inconclusive", "diff": diff, "se": None, "noise_from": "none (one seed)"}
    word = "reproduced" if diff > 2 * se else "not reproduced" if diff < -2 * se else "inconclusive"
    return {"verdict": word, "diff": diff, "se": se, "noise_from": source}


def _losses(variant: dict[str, Any]) -> list[float]:
    return [r["final_loss"] for r in variant["runs"] if r.get("final_loss") is not None]


def _summary_table(variants: dict[str, dict[str, Any]], thr: float) -> str:
    """Per variant: accuracy, tokens per forward, final training loss and weight drift (mean ± s.d. over seeds)."""
    t = Table("<variant", "accuracy", "tokens/forward", "final train loss", "weight drift")
    for name, v in variants.items():
        t.add(name, _fmt(_values(v, thr)), _fmt(_values(v, thr, "tokens_per_forward"), ".2f"), _fmt(_losses(v)),
              _fmt(_drifts(v)))
    return t.markdown()


# ----------------------------------------------------------------------------------------------- plots


def _bar_plot(path: Path, names: list[str], groups: list[list[float]], ylabel: str, ar: float | None) -> None:
    fig, ax = new_figure()
    means = [_mean(g) for g in groups]
    errs = [(_std(g) if len(g) >= 2 else 0.0) for g in groups]
    ax.bar(range(len(names)), means, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    for i, g in enumerate(groups):
        ax.plot([i] * len(g), g, "k.", markersize=5)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    if ar is not None:
        ax.axhline(ar, color="black", linestyle="--", label="AR source")
    ax.set_ylabel(ylabel)
    save_figure(fig, ax, path)


def _drift_plot(path: Path, variants: dict[str, dict[str, Any]]) -> None:
    fig, ax = new_figure()
    for name, v in variants.items():
        layers = [r["weight_drift"]["layers"] for r in v["runs"]]
        if not layers:
            continue
        mean = [_mean(list(col)) for col in zip(*layers)]
        ax.plot(range(len(mean)), mean, "o-", label=name)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative weight change ||W - W_AR|| / ||W_AR||")
    save_figure(fig, ax, path)


def _pareto_plot(path: Path, variants: dict[str, dict[str, Any]], thresholds: list[float],
                 ar: dict[str, Any] | None) -> None:
    fig, ax = new_figure()
    for name, v in variants.items():
        pts = [(_mean(_values(v, t, "tokens_per_forward")), _mean(_values(v, t)), t) for t in thresholds
               if _values(v, t)]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
            for x, y, t in pts:
                ax.annotate(f"{t:g}", (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if ar:
        ax.plot([ar["tokens_per_forward"]], [ar["acc"]], "s", color="black", label="AR source")
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy (held-out problems)")
    save_figure(fig, ax, path)


def _position_plot(path: Path, curves: dict[str, list[float | None]], xlabel: str, block: int | None = None) -> None:
    fig, ax = new_figure()
    for name, ys in curves.items():
        ax.plot(range(len(ys)), [float("nan") if y is None else y for y in ys], ".-", label=name)
    if block:  # block boundaries
        longest = max(len(ys) for ys in curves.values())
        for x in range(block, longest, block):
            ax.axvline(x - 0.5, color="grey", linewidth=0.6, alpha=0.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("masked-token cross-entropy")
    save_figure(fig, ax, path)


# ----------------------------------------------------------------------------------------------- report


def write_report(results: dict[str, Any], report_dir: str | Path, command: str) -> Path:
    """Write ``report.md``, its PNG plots and ``study.json`` into ``report_dir``; returns the report path."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(results, indent=2) + "\n")
    cfg = results.get("config") or {}
    thresholds = cfg.get("thresholds") or [DecodeConfig().threshold]
    thr = thresholds[0]
    comps = results["comparisons"]
    source = results.get("source") or {}
    ar = source.get("answers")
    claims: list[tuple[str, dict[str, Any]]] = []
    intro = ["# edlm study: the Efficient-DLM claims in miniature", ""]
    intro += [f"Regenerate everything on this page (runs, tables, plots) with:\n\n```\n{command}\n```\n",
              "Every run converts the same AR source model with the same token budget; accuracy is exact-match on "
              "held-out problems (never seen in training), decoding one problem at a time with the KV cache. "
              f"Accuracies below are at decoding threshold {thr:g} unless a table says otherwise; `a ± s (n=k)` is "
              "the mean and standard deviation over k conversion seeds (data order and noise).", ""]
    m = results.get("machine")
    if m:
        intro += [f"Written at commit {m.get('commit') or '?'} on {m.get('cpu') or 'an unnamed CPU'} "
                  f"({', '.join(m.get('cpu_flags') or [])}; ATen kernels {m.get('cpu_kernels') or '?'}), "
                  f"torch {m.get('torch')}, transformers {(m.get('packages') or {}).get('transformers')}. "
                  "Training from the same seed on CPUs with other kernels gives another model: on another x86 "
                  "CPU, re-make these numbers under the same kernels"
                  + (f" (`ATEN_CPU_CAPABILITY={m['cpu_kernels'].lower()}` before the command)."
                     if m.get("cpu_kernels") else "."), ""]
    conv = cfg.get("conversion") or {}
    if conv:
        tokens = conv.get("max_steps", 0) * conv.get("micro_batch_size", 0) * conv.get("grad_accum", 1) * \
            (conv.get("data") or {}).get("seq_len", 0)
        intro += [f"Base conversion settings (every run, unless its variant overrides them): "
                  f"`{json.dumps(conv.get('diffusion', {}))}`, {conv.get('max_steps')} steps of "
                  f"{conv.get('micro_batch_size')} x {(conv.get('data') or {}).get('seq_len')} tokens "
                  f"({tokens / 1e6:.2f}M training tokens per run), LR {conv.get('lr')} cosine to "
                  f"{conv.get('min_lr')}.", ""]
    lines: list[str] = []
    if ar:
        lines += ["## The AR source model", "",
                  f"{source.get('parameters', 0) / 1e6:.2f}M parameters; greedy AR accuracy **{ar['acc']:.3f}** on "
                  f"{ar['n']} held-out problems (1 token per forward, {ar['tokens_per_s']:.0f} tokens/s at batch 1).",
                  ""]
    noise = None

    att = comps.get("attention")
    if att:
        names = list(att)
        lines += ["## 1. Attention pattern and token shift", "", _summary_table(att, thr)]
        _bar_plot(out / "attention.png", names, [_values(att[n], thr) for n in names], "accuracy",
                  ar["acc"] if ar else None)
        lines += ["", "![attention](attention.png)", ""]
        spreads = [_std(_values(v, thr)) for v in att.values() if len(_values(v, thr)) >= 2]
        spreads = [s for s in spreads if not math.isnan(s)]
        noise = _mean(spreads) if spreads else None
        if CLEAN in att and NOISY in att:
            claims.append(("Block-wise attention with a *clean* context beats a *noisy* context (paper: 38.4 vs "
                           "28.2)", verdict(_values(att[CLEAN], thr), _values(att[NOISY], thr), noise)))
        if CLEAN in att and BIDIR in att:
            claims.append(("Block-wise attention beats fully bidirectional attention (paper: 38.4 vs 18-19)",
                           verdict(_values(att[CLEAN], thr), _values(att[BIDIR], thr), noise)))
        shift_claim = "Without token shift is at least as good as with it (paper: 38.4 vs 37.7, a small gap)"
        if CLEAN in att and SHIFT in att:  # base without shift
            claims.append((shift_claim, verdict(_values(att[CLEAN], thr), _values(att[SHIFT], thr), noise)))
        if CLEAN in att and NO_SHIFT in att:  # base with shift
            claims.append((shift_claim, verdict(_values(att[NO_SHIFT], thr), _values(att[CLEAN], thr), noise)))

        lines += ["## 2. Weight drift from the AR source", "",
                  "The paper's argument for block-wise attention: it keeps the AR weights closer to where they were. "
                  "Weight drift is the relative Frobenius change ||W - W_AR|| / ||W_AR|| of each decoder layer "
                  "(embeddings over the source vocabulary only).", ""]
        t = Table("<variant", "overall", "embeddings", "mean over layers")
        for name in names:
            runs = att[name]["runs"]
            t.add(name, _fmt(_drifts(att[name]), ".4f"),
                  _fmt([r["weight_drift"]["embed"] for r in runs if r["weight_drift"]["embed"]], ".4f"),
                  _fmt([_mean(r["weight_drift"]["layers"]) for r in runs], ".4f"))
        lines.append(t.markdown())
        _drift_plot(out / "weight_drift.png", att)
        lines += ["", "![weight drift](weight_drift.png)", ""]
        if CLEAN in att and BIDIR in att:
            d_noise = _mean([s for s in (_std(_drifts(v)) for v in att.values()) if not math.isnan(s)] or
                            [float("nan")])
            claims.append(("Block-wise attention (clean context) changes the AR weights less than bidirectional "
                           "attention", verdict([-d for d in _drifts(att[CLEAN])], [-d for d in _drifts(att[BIDIR])],
                                                d_noise)))

    mask = comps.get("masking")
    if mask:
        mthr = cfg.get("comparisons", {}).get("masking", {}).get("thresholds") or thresholds
        lines += ["## 3. Masking schedule: uniform vs position-dependent", "",
                  "Accuracy and tokens per forward across decoding thresholds (mean over seeds); the Pareto plot "
                  "puts the AR source at 1 token per forward.", ""]
        t = Table("<variant", *(f"thr {x:g}: acc / tok/fwd" for x in mthr))
        for name, v in mask.items():
            t.add(name, *(f"{_fmt(_values(v, x))} / {_mean(_values(v, x, 'tokens_per_forward')):.2f}" for x in mthr))
        lines.append(t.markdown())
        _pareto_plot(out / "masking_pareto.png", mask, mthr, ar)
        lines += ["", "![masking Pareto](masking_pareto.png)", ""]
        pd = [n for n in mask if n != UNIFORM]
        if UNIFORM in mask and pd:
            best = pd[0]  # the first listed position-dependent variant is the paper's setting

            def avg(v):  # mean accuracy over the thresholds, per seed (one run each)
                return [_mean([a["acc"] for a in r["answers"] if a["threshold"] in mthr]) for r in v["runs"]]

            claims.append((f"Position-dependent masking ({best}) beats uniform masking at equal training tokens "
                           "(accuracy averaged over the thresholds; paper: +2.6 points)",
                           verdict(avg(mask[best]), avg(mask[UNIFORM]), noise)))

    blocks = comps.get("block_size")
    default_run = None
    if att and CLEAN in att and att[CLEAN]["runs"]:
        default_run = att[CLEAN]["runs"][0]
    if blocks or default_run:
        lines += ["## 4. Per-position loss inside a block, and block size", "",
                  "Masked-token loss on held-out packed problems, each block masked at its own ratio t ~ U(0, 1] "
                  "(the same noise for every model)."]
        if default_run:
            _position_plot(out / "loss_by_position.png",
                           {default_run["run"]: default_run["per_position_loss"]["by_position"]},
                           "position in the sequence (grey lines: block boundaries)",
                           block=default_run["per_position_loss"]["block_size"])
            lines += ["", "![loss by position](loss_by_position.png)", ""]
            offsets = default_run["per_position_loss"]["by_offset"]
            lines.append("Loss by offset inside the block (" + default_run["run"] + "): " +
                         ", ".join(f"{x:.3f}" for x in offsets))
            lines.append("")
            first_half = _mean(offsets[: len(offsets) // 2])
            second_half = _mean(offsets[len(offsets) // 2:])
            word = "reproduced" if second_half > first_half * 1.05 else (
                "not reproduced" if second_half < first_half * 0.95 else "inconclusive")
            claims.append(("The loss is periodic with the block: it rises with the offset inside a block (further "
                           "from the clean context)", {"verdict": word, "diff": second_half - first_half, "se": None,
                                                       "noise_from": "second half vs first half of the offsets, 5% "
                                                                     "margin"}))
        if blocks:
            t = Table("<variant", "block size", "accuracy", "tokens/forward", "final train loss")
            curves = {}
            for name, v in blocks.items():
                if not v["runs"]:
                    continue
                r0 = v["runs"][0]
                size = r0["diffusion"]["block_size"]
                curves[f"block {size}"] = r0["per_position_loss"]["by_offset"]
                t.add(name, size, _fmt(_values(v, thr)), _fmt(_values(v, thr, "tokens_per_forward"), ".2f"),
                      _fmt(_losses(v)))
            lines.append(t.markdown())
            _position_plot(out / "loss_by_offset.png", curves, "offset inside the block")
            lines += ["", "![loss by offset](loss_by_offset.png)", ""]

    lora = comps.get("lora")
    if lora:
        lines += ["## 5. Full fine-tuning vs LoRA at equal budget", "", _summary_table(lora, thr)]
        _bar_plot(out / "lora.png", list(lora), [_values(v, thr) for v in lora.values()], "accuracy",
                  ar["acc"] if ar else None)
        lines += ["", "![lora](lora.png)", ""]
        ranks = sorted((v["overrides"].get("lora.r", 0), n) for n, v in lora.items() if "lora.r" in v["overrides"])
        full = [n for n, v in lora.items() if "lora.r" not in v["overrides"]]
        if full and ranks:
            claims.append((f"Full fine-tuning beats LoRA ({ranks[-1][1]}) at equal budget (paper: LoRA r64 30.8 vs "
                           "full 38.4)", verdict(_values(lora[full[0]], thr), _values(lora[ranks[-1][1]], thr),
                                                   noise)))
        if len(ranks) >= 2:
            claims.append((f"A larger LoRA rank is better ({ranks[-1][1]} vs {ranks[0][1]}; paper: r64 30.8 vs r16 "
                           "27.9)", verdict(_values(lora[ranks[-1][1]], thr), _values(lora[ranks[0][1]], thr),
                                            noise)))

    head = ["## Verdicts", "", "Difference: the claimed-better group minus the other (positive = the paper's "
            "direction); accuracy, or for weight drift the drift of the other group minus the claimed-smaller one.", ""]
    t = Table("<claim", "<verdict", "difference", "<noise (2 x s.e.)")
    for text, v in claims:
        t.add(text, f"**{v['verdict']}**", f"{v['diff']:+.3f}" if v.get("diff") is not None else "-",
              f"{2 * v['se']:.3f} ({v['noise_from']})" if v.get("se") is not None else v.get("noise_from", "-"))
    head.append(t.markdown())
    if noise is not None:
        head += ["", f"Seed-to-seed standard deviation of accuracy (attention comparison): {noise:.3f}."]
    if results.get("missing"):
        head += ["", f"Runs not finished when this report was written: {', '.join(results['missing'])}."]
    path = out / "report.md"
    path.write_text("\n".join(intro + head + [""] + lines) + "\n")
    return path
