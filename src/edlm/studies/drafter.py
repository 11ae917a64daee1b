"""The gated-drafter recipe: a real model made faster with exactly its own answers.

``edlm drafter --config configs/smollm2-135m-drafter.yaml`` runs three resumable stages in one output folder::

    OUT/distill.jsonl     the source's own greedy answers to the built-in prompt set   (edlm distill)
    OUT/adapter/          a gated adapter trained on them over the frozen source      (edlm convert, lora.gated)
    OUT/results.json      source AR vs speculative vs diffusion on held-out prompts   (measure_drafter)

A stage whose output is complete is skipped; an interrupted one resumes (distillation skips prompts already
written, conversion continues from its last checkpoint). Measurement decodes every held-out prompt with the
unmodified source (AR, KV cache), with the adapter drafting and the source verifying (``speculative``: greedy text
identical to the source's by construction, checked per prompt) and with the paper's threshold decoder
(``diffusion``), interleaved prompt batch by prompt batch so that a slow spell of the machine hits all alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from edlm.adapter import adapter_state, load_adapter_state
from edlm.api import encode_prompt
from edlm.assets.prompts import DOMAINS, distillation_prompts
from edlm.checkpoints import resolve_model
from edlm.config import DecodeConfig, TrainConfig, apply_overrides, from_dict, load_yaml
from edlm.decode import generate
from edlm.distill import DistillConfig, distill, distilled_tokens, read_prompts
from edlm.errors import ConfigError
from edlm.evals.models import generation_system
from edlm.evals.tasks import Problem, score_answer
from edlm.harness import run_interleaved
from edlm.loading import load, load_ar
from edlm.model import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, EDLM_CONFIG_NAME
from edlm.results import provenance, replace_dir, write_json
from edlm.table import Table, pct
from edlm.train import CHECKPOINT_PREFIX, STATE_FILE, convert, latest_checkpoint

if TYPE_CHECKING:
    from edlm.harness import Run

logger = logging.getLogger(__name__)


@dataclass
class MeasureConfig:
    """How the finished adapter is measured against its source."""

    prompts_per_domain: int = 4
    """Held-out built-in prompts per domain (chat, math, code), never in the distillation set."""
    max_new_tokens: int = 96
    """Tokens generated per prompt (greedy; EOS ends a row earlier)."""
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    """Batch sizes to measure (each system decodes the same prompts at each)."""
    dtype: str = "fp32"
    """Weights of both the source and the drafter (``fp32``, ``bf16``, ``int8``)."""
    threshold: float = DecodeConfig().threshold
    """Diffusion mode's commit threshold (default: :class:`~edlm.config.DecodeConfig`'s)."""
    draft_hypotheses: int = 1
    """Speculative mode: acceptance lengths drafted for per forward."""
    aligned_draft: bool = True
    """Speculative mode: draft the aligned block holding the next position (False: a block starting there)."""
    block_size: int | None = None
    """Decoding block size (None: the training block)."""
    seed: int = 1
    """Seeds the held-out prompt set (the distillation set is excluded)."""
    exact_problems: int = 200
    """Problems per family of the exact-answer accuracy check (:func:`exact_accuracy`; 0 skips it)."""


@dataclass
class DrafterConfig:
    """The whole recipe: distillation, gated conversion, measurement."""

    output_dir: str = "runs/drafter"
    """Folder of every stage's output."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """The self-distillation data (``OUTPUT_DIR/distill.jsonl``)."""
    convert: TrainConfig = field(default_factory=TrainConfig)
    """The gated conversion; ``output_dir`` is set to ``OUTPUT_DIR/adapter`` and an empty ``data.corpus`` to the
    distilled file."""
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    """The final measurement."""

    def __post_init__(self) -> None:
        if self.convert.lora is None or not self.convert.lora.gated:
            raise ConfigError("the drafter recipe trains a gated adapter: set convert.lora.gated: true")


def load_drafter_config(path: str | Path, overrides: list[str] | None = None,
                        output_dir: str | None = None) -> DrafterConfig:
    """Read a drafter YAML (first line: the command that runs it), apply ``key=value`` overrides."""
    data = apply_overrides(load_yaml(path), overrides or [])
    if output_dir:
        data["output_dir"] = output_dir
    cfg = from_dict(DrafterConfig, data, where=f"{path}: ")
    out = Path(cfg.output_dir)
    corpus = cfg.convert.data.corpus if data.get("convert", {}).get("data", {}).get("corpus") else \
        [str(out / "distill.jsonl")]
    convert = dataclasses.replace(cfg.convert, output_dir=str(out / "adapter"),
                                  data=dataclasses.replace(cfg.convert.data, corpus=corpus))
    return dataclasses.replace(cfg, convert=convert)


# ------------------------------------------------------------------------------------------------ measurement


@dataclass
class Measurement:
    """Source AR vs the adapter's two modes on the same prompts, per batch size."""

    prompts: list[str]
    domains: list[str]
    runs: dict[str, dict[int, Run]]
    """System name (``ar``, ``speculative``, ``diffusion``) -> batch size -> run (with texts)."""
    dtype: str = "fp32"

    def speedup(self, system: str, batch: int) -> float:
        return self.runs[system][batch].tokens_per_s / max(self.runs["ar"][batch].tokens_per_s, 1e-9)

    def identical(self, batch: int) -> float:
        """Share of prompts whose speculative text equals the source's."""
        pairs = zip(self.runs["speculative"][batch].texts, self.runs["ar"][batch].texts)
        return sum(a == b for a, b in pairs) / max(len(self.prompts), 1)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompts": self.prompts, "domains": self.domains, "by_batch": {}}
        for batch in self.runs["ar"]:
            row = {}
            for name, runs in self.runs.items():
                r = runs[batch]
                row[name] = {"dtype": self.dtype, "tokens": r.tokens, "forwards": r.forwards, "seconds": r.seconds,
                             "tokens_per_forward": r.tokens_per_forward, "tokens_per_s": r.tokens_per_s,
                             "speedup": self.speedup(name, batch), "texts": r.texts}
            row["identical"] = self.identical(batch)
            out["by_batch"][str(batch)] = row
        return out


def heldout_prompts(per_domain: int, distill: DistillConfig, seed: int) -> list[tuple[str, str]]:
    """``per_domain`` built-in prompts of each domain that the distillation set does not hold."""
    train = {p for _, p in distillation_prompts(distill.num_prompts, seed=distill.seed)} \
        if distill.prompts == "builtin" else set()
    pool = distillation_prompts(len(train) + 40 * per_domain * len(DOMAINS), seed=seed + 7919)
    out: list[tuple[str, str]] = []
    for domain in DOMAINS:
        out += [(d, p) for d, p in pool if d == domain and p not in train][:per_domain]
    return out


def _system(source, dlm, cfg: DecodeConfig):
    """One batch -> DecodeOutput: ``mode="ar"`` decodes the unmodified source, other modes the adapter over it
    (:func:`edlm.evals.models.generation_system`)."""
    return generation_system(cfg, dlm.tokenizer, dlm=dlm, ar_model=source if cfg.mode == "ar" else None)


def measure_drafter(adapter_dir: str | Path, cfg: MeasureConfig, prompts: list[tuple[str, str]],
                    say=None) -> Measurement:
    """Decode ``prompts`` with the unmodified source (AR), the adapter speculatively and by diffusion, through the
    comparison harness (interleaved per batch of prompts); all greedy, at ``cfg.dtype``."""
    dlm = load(adapter_dir, cfg.dtype)
    source, tok = load_ar(dlm.adapter["source"]["model"], cfg.dtype)
    ids = [encode_prompt(tok, p) for _, p in prompts]
    common = dict(max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size)
    systems = {"ar": _system(source, dlm, DecodeConfig(mode="ar", max_new_tokens=cfg.max_new_tokens)),
               "speculative": _system(source, dlm, DecodeConfig(
                   mode="speculative", draft_hypotheses=cfg.draft_hypotheses, aligned_draft=cfg.aligned_draft,
                   **common)),
               "diffusion": _system(source, dlm, DecodeConfig(mode="diffusion", threshold=cfg.threshold, **common))}
    runs: dict[str, dict[int, Run]] = {name: {} for name in systems}
    for batch in cfg.batch_sizes:
        systems["ar"](ids[:batch])  # warm-up, not counted
        got = run_interleaved(systems, ids, batch, detokenize=lambda s: tok.decode(s, skip_special_tokens=True),
                              progress=lambda done, total, b=batch: say and say(f"batch {b}: {done}/{total} prompts"))
        for name, run in got.items():
            runs[name][batch] = run
    return Measurement(prompts=[p for _, p in prompts], domains=[d for d, _ in prompts], runs=runs, dtype=cfg.dtype)


def budget_curve(adapter_dir: str | Path, cfg: MeasureConfig, prompts: list[tuple[str, str]],
                 fractions: tuple[float, ...] = (0.25, 0.5)) -> list[dict[str, float]]:
    """Speculative tokens per forward (batch 1, greedy) of the adapter as it was after each fraction of its
    conversion run (from the run's checkpoints) and at the end: what more compute buys."""
    dlm = load(adapter_dir, "fp32")
    final = {k: v.clone() for k, v in adapter_state(dlm.model).items()}
    ids = [encode_prompt(dlm.tokenizer, p) for _, p in prompts]
    decode = DecodeConfig(mode="speculative", max_new_tokens=cfg.max_new_tokens, block_size=cfg.block_size,
                          draft_hypotheses=cfg.draft_hypotheses, aligned_draft=cfg.aligned_draft)
    ckpts = {int(p.name[len(CHECKPOINT_PREFIX):]): p for p in Path(adapter_dir).glob(f"{CHECKPOINT_PREFIX}*")
             if (p / STATE_FILE).is_file()}
    run_cfg = Path(adapter_dir) / "train_config.yaml"
    steps = yaml.safe_load(run_cfg.read_text())["max_steps"] if run_cfg.is_file() else max(ckpts, default=0)
    points = []
    for fraction in (*fractions, 1.0):
        step = round(fraction * steps)
        if fraction < 1.0:
            if step not in ckpts:
                continue
            state = torch.load(ckpts[step] / "pytorch_model.bin", map_location="cpu", weights_only=True)
            load_adapter_state(dlm.model, {k.removeprefix("model."): v for k, v in state.items()})
        else:
            load_adapter_state(dlm.model, final)
        tokens = forwards = 0
        for one in ids:
            out = generate(dlm, [one], decode)
            tokens, forwards = tokens + out.stats.tokens, forwards + out.stats.forwards
        points.append({"fraction": fraction, "step": step, "tokens_per_forward": tokens / max(forwards, 1)})
    return points


# ------------------------------------------------------------------------------------------- exact answers

_ADDITION_SHOTS = "12 + 5 = 17\n31 + 8 = 39\n24 + 13 = 37\n"


def exact_problems(n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of each of two arithmetic families with exact answers, as raw text (no chat template; the
    drafter never saw this format):

    - ``sequence``: five terms of an arithmetic progression; the answer is the next two terms;
    - ``addition``: two-digit addition after three worked examples; the answer is the sum.

    SmolLM2-135M-Instruct solved 44% of the addition family and 36.5% of the sequence family greedily (200 each,
    docs/drafter.md), which leaves room to see a drop; it solves almost none of the same sums asked as chat
    questions."""
    rng = random.Random(seed)
    out: list[Problem] = []
    for _ in range(n):
        a, d = rng.randint(1, 30), rng.randint(1, 9)
        terms = [a + i * d for i in range(7)]
        out.append(Problem(", ".join(map(str, terms[:5])) + ",", f"{terms[5]}, {terms[6]}", "sequence"))
    for _ in range(n):
        a, b = rng.randint(10, 60), rng.randint(1, 30)
        out.append(Problem(f"{_ADDITION_SHOTS}{a} + {b} =", str(a + b), "addition"))
    return out


def exact_accuracy(adapter_dir: str | Path, n: int = 200, dtype: str = "fp32", threshold: float | None = None,
                   batch: int = 16, max_new_tokens: int = 8, say=None) -> dict[str, Any]:
    """Greedy accuracy (:func:`edlm.evals.tasks.score_answer`) of the unmodified source (AR) and of the adapter's
    diffusion decoder at ``threshold`` (None: :class:`~edlm.config.DecodeConfig`'s) on :func:`exact_problems`, per
    family (the speculative mode's text is the source's: tested, not re-measured)."""
    dlm = load(adapter_dir, dtype)
    source, tok = load_ar(dlm.adapter["source"]["model"], dtype)
    problems = exact_problems(n)
    ids = [tok(p.question, add_special_tokens=False)["input_ids"] for p in problems]
    diffusion = DecodeConfig(mode="diffusion", max_new_tokens=max_new_tokens)
    if threshold is not None:
        diffusion = dataclasses.replace(diffusion, threshold=threshold)
    configs = {"ar": DecodeConfig(mode="ar", max_new_tokens=max_new_tokens), "diffusion": diffusion}
    systems = {name: _system(source, dlm, cfg) for name, cfg in configs.items()}
    runs = run_interleaved(systems, ids, batch, detokenize=lambda r: tok.decode(r, skip_special_tokens=True),
                           progress=lambda done, total: say and say(f"exact answers: {done}/{total} problems"))
    texts = {name: run.texts for name, run in runs.items()}
    out: dict[str, Any] = {"n_per_family": n, "threshold": diffusion.threshold, "dtype": dtype, "families": {}}
    for family in dict.fromkeys(p.family for p in problems):
        idx = [i for i, p in enumerate(problems) if p.family == family]
        out["families"][family] = {name: sum(score_answer(texts[name][i], problems[i].answer) for i in idx) / len(idx)
                                   for name in systems}
    out["diffusion_tokens_per_forward"] = runs["diffusion"].tokens_per_forward
    out["examples"] = [{"prompt": problems[i].question, "answer": [int(x) for x in problems[i].answer.split(", ")],
                        **{name: texts[name][i] for name in systems}} for i in (0, n)]
    return out


# ------------------------------------------------------------------------------------------------ the recipe


def run_drafter(cfg: DrafterConfig, progress=None, say=None) -> dict[str, Any]:
    """Distil, convert, measure (each stage skipped when its output is complete); returns the results dict also
    written to ``OUTPUT_DIR/results.json``."""
    say = say or (lambda _msg: None)
    out = Path(cfg.output_dir)
    data = out / "distill.jsonl"
    distilled = distilled_tokens(data)[0] if data.is_file() else 0
    if distilled < len(read_prompts(cfg.distill)):
        say(f"distilling the source's answers to {len(read_prompts(cfg.distill))} prompts -> {data}")
        model, tok = resolve_model(cfg.convert.model)
        distill(model, tok, cfg.distill, data)
        del model
    adapter = Path(cfg.convert.output_dir)
    if not (adapter / ADAPTER_CONFIG_NAME).is_file():
        say(f"training the gated adapter ({cfg.convert.max_steps} steps) -> {adapter}")
        convert(cfg.convert, resume=latest_checkpoint(adapter) is not None, progress=progress)
    results = out / "results.json"
    stamp = _adapter_stamp(adapter)
    if results.is_file():  # measured already, for this adapter and these settings: reuse
        done = json.loads(results.read_text())
        if done.get("adapter_stamp") == stamp and done.get("settings") == dataclasses.asdict(cfg.measure):
            say(f"reusing the measurement in {results} (delete it to measure again)")
            return done
    prompts = heldout_prompts(cfg.measure.prompts_per_domain, cfg.distill, cfg.measure.seed)
    say(f"measuring on {len(prompts)} held-out prompts")
    measured = measure_drafter(adapter, cfg.measure, prompts, say=say)
    say("budget curve: speculative tokens per forward along the run, on the held-out chat prompts")
    curve = budget_curve(adapter, cfg.measure, [p for p in prompts if p[0] == "chat"])
    exact = exact_accuracy(adapter, cfg.measure.exact_problems, cfg.measure.dtype, cfg.measure.threshold, say=say) \
        if cfg.measure.exact_problems else None
    records, tokens = distilled_tokens(data)
    result = {"adapter": str(adapter), "adapter_stamp": stamp, "distilled": {"records": records, "tokens": tokens},
              "settings": dataclasses.asdict(cfg.measure), "machine": provenance(), "budget_curve": curve,
              "exact_answers": exact, **measured.to_json()}
    write_json(result, results)
    return result


def _adapter_stamp(adapter: Path) -> str:
    """Identifies the trained adapter a measurement belongs to: its weights' size and modification time."""
    info = (adapter / ADAPTER_WEIGHTS_NAME).stat()
    return f"{info.st_size}:{info.st_mtime_ns}"


def ship_drafter(adapter_dir: str | Path, dest: str | Path, config_path: str | Path) -> Path:
    """Copy a trained adapter folder into ``dest`` (the package's shipped drafter) with its weights in fp16, and a
    README naming the command that rebuilds it; written to a temporary sibling and renamed into place."""
    from safetensors.torch import load_file, save_file

    src, dest = Path(adapter_dir), Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.half() for k, v in load_file(str(src / ADAPTER_WEIGHTS_NAME)).items()}, tmp / ADAPTER_WEIGHTS_NAME)
    for name in (ADAPTER_CONFIG_NAME, EDLM_CONFIG_NAME):
        shutil.copy(src / name, tmp / name)
    spec = json.loads((src / ADAPTER_CONFIG_NAME).read_text())
    (tmp / "README.md").write_text(
        "# The gated drafter adapter shipped with edlm\n\n"
        f"A gated LoRA adapter (rank {spec['r']}, {spec['target_modules']}) over the embedded SmolLM2-135M-Instruct, "
        "stored in fp16. `edlm demo` uses it. Rebuild it (distillation, conversion and measurement, resumable) with\n\n"
        f"    edlm drafter --config {config_path} --ship\n")
    for item in tmp.iterdir():
        item.chmod(0o644)  # safetensors writes 0600; a package's data must be readable by whoever installs it
    return replace_dir(tmp, dest)


def drafter_report(result: dict[str, Any]) -> str:
    """What ``edlm drafter`` prints: one row per batch size and system, the budget curve and the exact answers."""
    t = Table("batch", "<system", "<dtype", "tok/fwd", "tokens/s", "speed-up", "identical")
    for batch, row in result["by_batch"].items():
        for name in ("ar", "speculative", "diffusion"):
            r = row[name]
            t.add(batch, name, r["dtype"], f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_s']:.1f}",
                  f"{r['speedup']:.2f}x", pct(row["identical"], ".0f") if name == "speculative" else "")
    lines = [t.text()]
    if result.get("budget_curve"):
        lines.append("budget curve (speculative tokens/forward, held-out chat, batch 1): " + ", ".join(
            f"{100 * p['fraction']:.0f}% {p['tokens_per_forward']:.2f}" for p in result["budget_curve"]))
    exact = result.get("exact_answers")
    for family, row in (exact or {}).get("families", {}).items():
        lines.append(f"exact answers, {family} (n={exact['n_per_family']}): source AR {100 * row['ar']:.1f}%, "
                     f"diffusion {100 * row['diffusion']:.1f}%")
    return "\n".join(lines)
