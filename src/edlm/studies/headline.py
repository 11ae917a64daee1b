"""``edlm headline``: the Efficient-DLM headline in miniature, measured on this machine.

A study (see :mod:`edlm.studies.grid`) trains the AR source from scratch and converts it; this module then
decodes the held-out problems with both, in one process, greedy, with the same prompts and batches:

* the AR source with its KV cache at each dtype (its fastest is the baseline);
* the dLM at each decoding block size and threshold of the sweep (the accuracy / tokens-per-second curve), and
  at the headline setting at each dtype and batch size.

Prompts are grouped by task family, so the rows of a batch have equal prompt lengths (as a server sorting by
length would batch them). Results: ``results.json``, ``report.md`` and ``pareto.png`` in the report folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edlm.assets import miniature_dir
from edlm.bench.decode import MODE_VARIANTS, forward_overhead
from edlm.checkpoints import load_hf
from edlm.config import DecodeConfig, apply_overrides, from_dict, load_yaml
from edlm.errors import ConfigError, EdlmError
from edlm.evals.tasks import Problem
from edlm.harness import ar_system, dlm_system, versus
from edlm.model import DiffusionLM
from edlm.quant import DTYPES, cast, cast_model
from edlm.results import new_figure, provenance, replace_dir, save_figure, write_json
from edlm.studies.analysis import decode_interleaved, decode_problems, prompt_ids  # noqa: F401 (public here)
from edlm.studies.grid import (
    EVAL_FILE,
    StudyConfig,
    expand,
    run_config,
    run_study,
    source_config,
    study_config_from_dict,
    study_source,
)
from edlm.studies.task import read_test
from edlm.table import Table, pct

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


@dataclass
class HeadlineSettings:
    """How the source and the converted model are compared (the ``headline:`` section of the YAML)."""

    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """How the dLM decodes at the headline point (``threshold``: the paper's released models decode at 0.9;
    ``block_size`` None: the training block); ``max_new_tokens`` is the study's. The old keys ``threshold`` and
    ``block_size`` of this section are read into it."""
    sweep_thresholds: list[float] = field(default_factory=lambda: [0.95, 0.9, 0.8, 0.7, 0.5])
    """Thresholds of the accuracy / speed curve (batch 1)."""
    sweep_block_sizes: list[int | None] = field(default_factory=lambda: [None, 8])
    """Decoding blocks of the curve (None: the training block)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    """Weight dtypes tried for both systems (fp32, bf16, int8); each system is reported at its fastest."""
    modes: list[str] = field(default_factory=list)
    """Also decode with these modes of the converted model (``ar``, ``speculative``, ``speculative_separate_draft``;
    ``DecodeConfig.mode``) at each batch size, at the dLM's batch-1 dtype: the three-modes table."""
    samples: int = 3
    """Sample answers per family in the report."""
    targets: dict[str, float] = field(default_factory=lambda: {
        "accuracy_gap_points": 1.0, "tokens_per_forward": 3.0, "speedup_batch1": 2.5, "speedup_batch8": 1.5})
    """dLM accuracy >= AR - gap (overall and per family), tokens per forward and speed-ups at the headline point."""
    mode_targets: dict[str, float] = field(default_factory=lambda: {
        "ar_mode_gap_points": 1.0, "speculative_tokens_per_forward": 2.0, "speculative_speedup_batch1": 1.5})
    """With ``modes``: the converted model's AR mode within this many points of the source (overall and per family),
    and the speculative mode's tokens per forward and batch-1 speed-up over the AR source."""

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes) or self.batch_sizes[0] != 1:
            raise ConfigError("headline.batch_sizes must be a list of sizes >= 1 that starts with 1 (the targets "
                              f"are read at batch 1), got {self.batch_sizes}")
        unknown = sorted(set(self.dtypes) - set(DTYPES))
        if unknown or not self.dtypes:
            raise ConfigError(f"headline.dtypes must be a non-empty subset of {list(DTYPES)}, got {self.dtypes}")
        unknown = sorted(set(self.modes) - set(MODE_VARIANTS))
        if unknown:
            raise ConfigError(f"unknown headline.modes {unknown}; choose from {list(MODE_VARIANTS)}")


@dataclass
class HeadlineConfig:
    study: StudyConfig
    headline: HeadlineSettings


def load_headline_config(path: str | Path, overrides: list[str] | None = None) -> HeadlineConfig:
    """A study YAML with an extra ``headline:`` section; its first comparison's first variant is the dLM."""
    data = load_yaml(path)
    apply_overrides(data, overrides or [])
    section = data.pop("headline", {}) or {}
    for key in ("threshold", "block_size"):  # old keys: headline.threshold -> headline.decode.threshold (they win)
        if key in section:
            section["decode"] = {**(section.get("decode") or {}), key: section.pop(key)}
    settings = from_dict(HeadlineSettings, section, where="headline.")
    study = study_config_from_dict(data)
    if not study.comparisons:
        raise ConfigError(f"{path}: a headline config needs one comparison whose first variant is the dLM")
    return HeadlineConfig(study, settings)


def main_run(study: StudyConfig):
    """The conversion run the headline reports: the first variant of the first comparison, seed 0."""
    first = next(iter(expand(study).values()))
    return next(iter(first.values()))[0]


def main_run_dir(study: StudyConfig) -> Path:
    return Path(study.output_dir) / "runs" / main_run(study).name


# ----------------------------------------------------------------------------------------------- decoding


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "answers"}


@torch.no_grad()
def measure(source_dir: Path, dlm_dir: Path, problems: list[Problem], settings: HeadlineSettings,
            max_new_tokens: int, progress=None) -> dict[str, Any]:
    """AR source vs dLM on ``problems``: every number of the headline, measured in this process."""
    say = progress or (lambda msg: logger.info(msg))
    ar32, tok = load_hf(source_dir)
    ar32.eval()
    dlm32 = DiffusionLM.from_pretrained(dlm_dir).eval()
    ars = {d: ar32 if d == "fp32" else cast_model(ar32, d, copy=True) for d in settings.dtypes}
    dlms = {d: cast(dlm32, d) for d in settings.dtypes}
    eos = tok.eos_token_id

    def ar_run(model):
        return ar_system(model, DecodeConfig(max_new_tokens=max_new_tokens), eos, tok.pad_token_id)

    headline = dataclasses.replace(settings.decode, max_new_tokens=max_new_tokens)

    def dlm_run(dlm, **fields):
        """Decode with the headline's settings, ``fields`` replaced."""
        return dlm_system(dlm, dataclasses.replace(headline, **fields))

    warm = problems[:4]
    for d in settings.dtypes:  # first calls pay one-time costs (allocator, kernels): keep them out of the timings
        decode_problems(ar_run(ars[d]), tok, warm, 1)
        decode_problems(dlm_run(dlms[d]), tok, warm, 1)

    # Every speed-up divides two measurements decoded interleaved, batch of prompts by batch of prompts: first both
    # systems at each dtype; then the curve and the other modes at the dLM's batch-1 dtype beside the AR source at
    # its best dtype, decoded once more as their reference.
    by_batch: dict[str, Any] = {}
    answers: dict[str, list[str]] = {}
    curve: list[dict[str, Any]] = []
    modes: dict[str, Any] = {}
    headline_block = headline.block_size or dlm32.config.block_size
    for batch in settings.batch_sizes:
        say(f"batch {batch}: AR at {settings.dtypes}, dLM at threshold {headline.threshold}")
        runs = {("ar", d): ar_run(ars[d]) for d in settings.dtypes}
        runs.update({("dlm", d): dlm_run(dlms[d]) for d in settings.dtypes})
        got = decode_interleaved(runs, tok, problems, batch)
        row = by_batch[str(batch)] = versus({d: _public(got[("ar", d)]) for d in settings.dtypes},
                                            {d: _public(got[("dlm", d)]) for d in settings.dtypes})
        ar_best = row["ar"]["dtype"]
        answers.setdefault("ar", got[("ar", ar_best)]["answers"])
        answers.setdefault("dlm", got[("dlm", row["dlm"]["dtype"])]["answers"])
        dtype = by_batch["1"]["dlm"]["dtype"]  # batch 1 comes first (HeadlineSettings checks)
        extra: dict[Any, Any] = {}
        points = [(block or dlm32.config.block_size, thr) for block in settings.sweep_block_sizes
                  for thr in settings.sweep_thresholds] if batch == 1 else []
        for block, thr in points:
            if (block, thr) != (headline_block, headline.threshold):  # the headline point is measured above
                extra[("curve", block, thr)] = dlm_run(dlms[dtype], threshold=thr, block_size=block)
        for name in settings.modes:
            extra[("mode", name)] = dlm_run(dlms[dtype], **MODE_VARIANTS[name])
        if extra:
            say(f"batch {batch}: " + ", ".join(f"curve block {k[1]} threshold {k[2]}" if k[0] == "curve"
                                                else f"mode {k[1]}" for k in extra) + f" ({dtype})")
            extra[("ar", ar_best)] = ar_run(ars[ar_best])
            more = decode_interleaved(extra, tok, problems, batch)
            reference = more.pop(("ar", ar_best))["tokens_per_s"]
        for block, thr in points:
            point = {"block_size": block, "threshold": thr, "dtype": dtype}
            if (block, thr) == (headline_block, headline.threshold):
                r, ref = row["dlm"]["all_dtypes"][dtype], row["ar"]["tokens_per_s"]
            else:
                r, ref = more[("curve", block, thr)], reference
            curve.append({**point, **_public(r), "speedup": r["tokens_per_s"] / ref})
        for name in settings.modes:
            r = more[("mode", name)]
            modes.setdefault(name, {})[str(batch)] = {
                **_public(r), "dtype": dtype, "speedup": r["tokens_per_s"] / reference,
                "ar_reference_tokens_per_s": reference,
                "agreement_with_ar_source": sum(a == b for a, b in zip(r["answers"], answers["ar"])) / len(problems)}
    # The decoder's own cost per forward (masks, commit rule, cache bookkeeping) over a bare model forward of the
    # same shape: at this model size it decides how much of the tokens per forward becomes speed.
    overhead = forward_overhead(dlms[dtype], prompt_len=len(prompt_ids(tok, problems[0])), block=headline_block)
    samples = defaultdict(list)
    for p, a, d in zip(problems, answers["ar"], answers["dlm"]):
        if len(samples[p.family]) < settings.samples:
            samples[p.family].append({"question": p.question, "answer": p.answer, "ar": a, "dlm": d})
    return {"by_batch": by_batch, "curve": curve, "modes": modes, "samples": dict(samples),
            "decoder_overhead": overhead, "dlm_block_size": headline_block,
            "threshold": headline.threshold}


def summary(measured: dict[str, Any]) -> dict[str, Any]:
    """The batch-1 comparison at the headline setting: ``ar`` and ``dlm`` (accuracy, tokens/s, tokens per forward,
    dtype) and ``speedup``: the keys of ``results.json`` and ``edlm demo --json``."""
    one = measured["by_batch"]["1"]
    keys = ("accuracy", "tokens_per_s", "tokens_per_forward", "dtype")
    return {"ar": {k: one["ar"][k] for k in keys}, "dlm": {k: one["dlm"][k] for k in keys},
            "speedup": one["speedup"]}


def worst_gap_points(system: dict[str, Any], reference: dict[str, Any]) -> float:
    """The worst of (system - reference) exact match, overall and per family, in points; rounded to 1e-6 so that a
    difference of whole problems compares exactly with its bar (0.77 - 0.78 is -1.0000000000000009 in floats)."""
    diffs = [system["accuracy"] - reference["accuracy"]]
    diffs += [system["per_family"][f] - reference["per_family"][f] for f in reference["per_family"]]
    return round(100 * min(diffs), 6)


def _at_least(value: float, bar: float) -> dict[str, Any]:
    return {"value": value, "bar": bar, "met": value >= bar}


def _within(system: dict[str, Any], reference: dict[str, Any], gap: float, what: str) -> dict[str, Any]:
    worst = worst_gap_points(system, reference)
    return {"value_points": worst, "bar_points": -gap, "met": worst >= -gap, "what": what}


def verdicts(measured: dict[str, Any], settings: HeadlineSettings, mode: str | None = None) -> dict[str, Any]:
    """Each target: the measured value, the bar, met or not, and the gap; for the dLM at the headline setting, or
    (``mode``, e.g. ``speculative``) for the same weights decoded in that mode (``{}`` when it was not measured)."""
    t = settings.targets
    if mode is None:
        one, speedups = measured["by_batch"]["1"]["dlm"], {b: r["speedup"] for b, r in measured["by_batch"].items()}
    else:
        runs = (measured.get("modes") or {}).get(mode) or {}
        if "1" not in runs:
            return {}
        one, speedups = runs["1"], {b: r["speedup"] for b, r in runs.items()}
    out = {"accuracy": _within(one, measured["by_batch"]["1"]["ar"], t["accuracy_gap_points"],
                               "worst of (dLM - AR) overall and per family, in points"),
           "tokens_per_forward": _at_least(one["tokens_per_forward"], t["tokens_per_forward"])}
    for key, batch in (("speedup_batch1", "1"), ("speedup_batch8", "8")):
        if batch in speedups:
            out[key] = _at_least(speedups[batch], t[key])
    return out


def mode_verdicts(measured: dict[str, Any], settings: HeadlineSettings) -> dict[str, Any]:
    """The three-modes targets that the measured modes allow judging (batch 1)."""
    t, modes = settings.mode_targets, measured.get("modes") or {}
    source = measured["by_batch"]["1"]["ar"]
    out: dict[str, Any] = {}
    if "1" in modes.get("ar", {}):
        out["ar_mode_accuracy"] = _within(modes["ar"]["1"], source, t["ar_mode_gap_points"],
                                          "worst of (AR mode - AR source) overall and per family, in points")
    if "1" in modes.get("speculative", {}):
        sp = modes["speculative"]["1"]
        out["speculative_tokens_per_forward"] = _at_least(sp["tokens_per_forward"], t["speculative_tokens_per_forward"])
        out["speculative_speedup_batch1"] = _at_least(sp["speedup"], t["speculative_speedup_batch1"])
    return out


# ----------------------------------------------------------------------------------------------- running


def run_headline(cfg: HeadlineConfig, progress=None, new_bar=None,
                 config_path: str | None = None) -> dict[str, Any]:
    """Train (or reuse) source and conversion through the study, then measure; writes results.json + report."""
    say = progress or (lambda msg: logger.info(msg))
    study = cfg.study
    t0 = time.perf_counter()
    studied = run_study(study, progress=say, new_bar=new_bar)
    out = Path(study.output_dir)
    problems = read_test(out / "task" / "test.jsonl")
    source = study_source(study)
    run_dir = main_run_dir(study)
    say(f"measuring AR source ({source}) vs dLM ({run_dir}) on {len(problems)} held-out problems")
    measured = measure(source, run_dir, problems, cfg.headline, study.max_new_tokens, progress=say)

    corpus = ["unused"]
    pretrain_tokens = None if study.source.get("pretrained") else _tokens(source_config(study, corpus))
    convert_tokens = _tokens(run_config(study, main_run(study), source, corpus))
    result = {
        **summary(measured),
        "n_problems": len(problems),
        "targets": verdicts(measured, cfg.headline),
        "speculative_targets": verdicts(measured, cfg.headline, mode="speculative"),
        "mode_targets": mode_verdicts(measured, cfg.headline),
        **measured,
        "training": {"source_tokens": pretrain_tokens, "conversion_tokens": convert_tokens,
                     "conversion_fraction": convert_tokens / pretrain_tokens if pretrain_tokens else None,
                     "source_parameters": (studied.get("source") or {}).get("parameters"),
                     "weight_drift": json.loads((run_dir / EVAL_FILE).read_text()).get("weight_drift"),
                     "study_seconds_this_call": time.perf_counter() - t0},
        "settings": dataclasses.asdict(cfg.headline),
        "machine": {**provenance(), "config": config_path},
    }
    report = Path(study.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    write_json(result, report / RESULTS_FILE)
    plot_pareto(result, report / "pareto.png")
    (report / "report.md").write_text(render_report(result, study))
    return result


def ship_miniature(cfg: HeadlineConfig, config_path: str | Path, dest: Path | None = None) -> Path:
    """Copy the trained source and the headline's dLM into the package (``edlm/assets/miniature``) as fp16
    safetensors (half the bytes; loaded back as fp32), with the YAML that made them; ``edlm demo`` uses them.

    The folder is written beside its final name and swapped in, so an interrupted call never leaves half of it.
    """
    dest = Path(dest or miniature_dir())
    study = cfg.study
    source, run_dir = Path(study.output_dir) / "source", main_run_dir(study)
    if not (source / "config.json").is_file() or not (run_dir / "edlm_config.json").is_file():
        raise EdlmError(f"nothing to ship: train first (edlm headline --config {config_path}); "
                        f"need {source} and {run_dir}")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model, tok = load_hf(source)
    model.half().save_pretrained(tmp / "source")
    tok.save_pretrained(tmp / "source")
    dlm = DiffusionLM.from_pretrained(run_dir)
    dlm.model.half()
    dlm.save_pretrained(tmp / "dlm")
    shutil.copy(config_path, tmp / "headline.yaml")
    (tmp / "README.md").write_text(
        "# The headline miniature\n\n`source/`: the AR model pretrained from scratch by `edlm headline`; `dlm/`: its "
        "conversion; `headline.yaml`: the settings that made both. Weights are stored in fp16 and loaded as fp32.\n"
        f"Rebuild: `edlm headline --config {config_path} --ship` (see docs/headline/report.md).\n")
    return replace_dir(tmp, dest)


def _tokens(tcfg) -> int:
    """Training tokens of a run's settings (one process)."""
    return tcfg.max_steps * tcfg.micro_batch_size * tcfg.grad_accum * tcfg.data.seq_len


# ----------------------------------------------------------------------------------------------- report


def plot_pareto(result: dict[str, Any], path: Path) -> list[str]:
    """Accuracy vs tokens/s at batch 1: one line per dLM decoding block across thresholds, the headline dLM point,
    a point per other decoding mode of the same weights (``result["modes"]``) and the AR points. Returns the
    legend's labels, one per series plotted."""
    fig, ax = new_figure()
    blocks = sorted({p["block_size"] for p in result["curve"]})
    for block in blocks:
        pts = [p for p in result["curve"] if p["block_size"] == block]
        ax.plot([p["tokens_per_s"] for p in pts], [100 * p["accuracy"] for p in pts], "o-",
                label=f"dLM, block {block} ({pts[0]['dtype']})")
        for p in pts:
            ax.annotate(f"{p['threshold']:g}: {p['tokens_per_forward']:.1f}/fwd",
                        (p["tokens_per_s"], 100 * p["accuracy"]), fontsize=6, xytext=(3, -8),
                        textcoords="offset points")
    one = result["by_batch"]["1"]
    dlm = one["dlm"]  # the headline setting (also on the curve when the sweep holds its threshold)
    ax.plot([dlm["tokens_per_s"]], [100 * dlm["accuracy"]], "*", markersize=12, color="tab:red",
            label=f"dLM, diffusion at threshold {result['threshold']:g} ({dlm['dtype']})")
    for name, runs in (result.get("modes") or {}).items():
        if "1" in runs:
            r = runs["1"]
            marker = {"speculative": "D", "ar": "^", "speculative_separate_draft": "v"}.get(name, "P")
            ax.plot([r["tokens_per_s"]], [100 * r["accuracy"]], marker, markersize=8,
                    label=f"dLM, {name} mode ({r['dtype']})")
    for d, r in one["ar"]["all_dtypes"].items():
        ax.plot([r["tokens_per_s"]], [100 * r["accuracy"]], "s", color="black" if d == "fp32" else "gray",
                label=f"AR source ({d})")
    ax.set_xlabel("tokens/s (batch 1, greedy)")
    ax.set_ylabel("exact match on held-out problems (%)")
    ax.set_title("accuracy vs speed: AR source and its dLM (thresholds annotated)")
    labels = ax.get_legend_handles_labels()[1]
    save_figure(fig, ax, path)
    return labels


TARGET_NAMES = {
    "accuracy": "dLM - AR accuracy, worst of overall / per family (points)",
    "tokens_per_forward": "dLM tokens per forward", "speedup_batch1": "speed-up, batch 1",
    "speedup_batch8": "speed-up, batch 8",
    "ar_mode_accuracy": "AR mode - AR source accuracy, worst of overall / per family (points)",
    "speculative_tokens_per_forward": "speculative tokens per forward",
    "speculative_speedup_batch1": "speculative speed-up over the AR source, batch 1"}


def _judged(v: dict[str, Any]) -> tuple[str, str, str]:
    """(value, bar, verdict) of one target."""
    value, bar = v.get("value", v.get("value_points")), v.get("bar", v.get("bar_points"))
    return f"{value:.2f}", f"{bar:g}", "met" if v["met"] else f"NOT met (gap {abs(value - bar):.2f})"


def targets_table(result: dict[str, Any]) -> Table:
    """The headline targets at batch 1 (unless named): the dLM decoded by diffusion and, where measured,
    speculatively; then the three-modes targets."""
    spec = result.get("speculative_targets") or {}
    t = Table("<target", "bar", "diffusion", "<verdict", *(("speculative", "<verdict") if spec else ()))
    for k, v in result["targets"].items():
        value, bar, verdict = _judged(v)
        t.add(TARGET_NAMES[k], bar, value, verdict, *((_judged(spec[k])[::2] if k in spec else ("", "")) if spec
                                                      else ()))
    for k, v in (result.get("mode_targets") or {}).items():
        value, bar, verdict = _judged(v)
        t.add(TARGET_NAMES[k], bar, *((value, verdict, "", "") if spec else (value, verdict)))
    return t


def families(result: dict[str, Any]) -> list[str]:
    return list(result["by_batch"]["1"]["ar"]["per_family"])


def comparison_table(result: dict[str, Any]) -> Table:
    """Per batch size: the AR source, the dLM decoded by diffusion at the headline setting and in every other mode
    measured (``result["modes"]``), each at its dtype: accuracy overall and per family, tokens per forward, tokens/s,
    speed-up over the AR source, and for the modes how often their answer is the source's."""
    fams = families(result)
    t = Table("batch", "<system", "<dtype", "accuracy", *fams, "tok/fwd", "tokens/s", "speed-up", "same as AR")
    for batch, b in result["by_batch"].items():
        rows = [("AR source", b["ar"], 1.0, None), ("dLM diffusion", b["dlm"], b["speedup"], None)]
        rows += [(f"dLM {name}", m[batch], m[batch]["speedup"], m[batch]["agreement_with_ar_source"])
                 for name, m in (result.get("modes") or {}).items() if batch in m]
        for system, r, speedup, same in rows:
            t.add(batch, system, r["dtype"], pct(r["accuracy"]), *(pct(r["per_family"][f]) for f in fams),
                  f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_s']:.1f}", f"{speedup:.2f}x",
                  "" if same is None else pct(same))
    return t


def curve_table(result: dict[str, Any]) -> Table:
    """The accuracy / speed curve at batch 1: one row per decoding block and threshold."""
    fams = families(result)
    t = Table("block", "threshold", "accuracy", *fams, "tok/fwd", "tokens/s", "speed-up")
    for p in result["curve"]:
        t.add(p["block_size"], f"{p['threshold']:g}", pct(p["accuracy"]), *(pct(p["per_family"][f]) for f in fams),
              f"{p['tokens_per_forward']:.2f}", f"{p['tokens_per_s']:.1f}", f"{p['speedup']:.2f}x")
    return t


def render_report(result: dict[str, Any], study: StudyConfig) -> str:
    fams = families(result)
    m = result["machine"]
    lines = [
        "# The headline in miniature: AR source vs its converted dLM",
        "",
        f"Command: `edlm headline --config {m.get('config') or 'configs/headline.yaml'}` "
        f"(commit {m.get('commit', '?')}). Machine: {m['cpu']} ({', '.join(m['cpu_flags'])}"
        f"{'; ATen kernels ' + m['cpu_kernels'] if m.get('cpu_kernels') else ''}), "
        f"{m['torch_threads']} thread{'s' if m['torch_threads'] != 1 else ''}, torch {m['torch']}, "
        f"transformers {m['packages'].get('transformers')}.",
        f"{result['n_problems']} held-out problems ({len(fams)} families: {', '.join(fams)}), greedy, one process.",
        "",
        "## Targets (batch 1 unless named)",
        "",
        f"The converted model decoded by blocks (diffusion, threshold {result['threshold']:g}) and, where measured, "
        "speculatively (the same weights: the diffusion head drafts, a causal pass verifies; lossless, so its "
        "answers are the model's AR-mode answers), each against the AR source at its best dtype.",
        "",
        targets_table(result).markdown(),
        "",
        f"## AR vs dLM at the headline setting (threshold {result['threshold']}, decoding block "
        f"{result['dlm_block_size']})",
        "",
        "The converted model decoded by blocks (`diffusion`, the headline setting) and, where measured, causally "
        "(`ar`) and speculatively (`speculative`: the diffusion head drafts, one causal pass verifies; its output is "
        "the `ar` mode's by construction; `speculative_separate_draft` drafts in a forward of its own), against the "
        "AR source at its best dtype. Accuracy is exact match on the held-out problems.",
        "",
        comparison_table(result).markdown(),
        "",
        "Every dtype measured (tokens/s): "
        + "; ".join(f"batch {batch} {system} " + ", ".join(f"{d} {r['tokens_per_s']:.1f}"
                                                        for d, r in b[system]["all_dtypes"].items())
                    for batch, b in result["by_batch"].items() for system in ("ar", "dlm")) + ".",
        "", "## The curve (batch 1): thresholds x decoding blocks", "", "![pareto](pareto.png)", "",
        curve_table(result).markdown()]
    o = result["decoder_overhead"]
    lines += ["", f"Decoder cost per forward: {1e3 * o['decoder_s_per_forward']:.2f} ms against "
              f"{1e3 * o['bare_forward_s']:.2f} ms for a bare model forward of the same shape "
              f"({100 * o['overhead_fraction']:+.0f}%; {o['block']}-token block on a {o['prompt_len']}-token "
              "prompt, one token per forward): the decoder's Python work (masks, commit rule, cache crop) plus "
              "its wider forwards (the prompt's prefill, and each finished block re-encoded in the next "
              "block's first forward)."]
    tr = result["training"]
    lines += ["", "## Training", "",
              f"- Source: {tr['source_parameters']:,} parameters ({study.source.get('model')}), "
              f"{tr['source_tokens']:,} pretraining tokens." if tr["source_parameters"] and tr["source_tokens"]
              else "- Source: given model.",
              f"- Conversion: {tr['conversion_tokens']:,} tokens = {100 * (tr['conversion_fraction'] or 0):.0f}% of "
              "pretraining." if tr["conversion_tokens"] else "- Conversion: (no metrics found)",
              f"- Weight drift of the conversion (relative Frobenius change, all weights): "
              f"{(tr['weight_drift'] or {}).get('overall', float('nan')):.3f}.",
              "", "## Sample answers (AR / dLM at the headline setting)", ""]
    for fam, rows in result["samples"].items():
        for s in rows:
            lines.append(f"- {fam}: `{s['question']}` -> expected `{s['answer']}`; AR `{s['ar']}`; dLM `{s['dlm']}`")
    lines += ["", "Why the targets are (not) met, what was tried, and what is left: [analysis.md](analysis.md).",
              "", f"Packages: {json.dumps(m['packages'])}", ""]
    return "\n".join(lines)
