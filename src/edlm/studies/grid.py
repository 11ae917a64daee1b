"""``edlm study``: a grid of conversion runs from one AR source model, each evaluated on held-out problems.

Layout of the output folder::

    task/{train,test}.jsonl      the problems (test questions never occur in training)
    source/                      the AR source model (trained from scratch, or a given model folder) + eval.json
    runs/NAME__sSEED/            one conversion run (edlm convert's folder) + eval.json
    study.json                   every result in one file; the report is rendered from it

Every step is skipped when its output exists, and a conversion interrupted mid-way resumes from its last checkpoint,
so re-running the same command finishes an interrupted study. Runs shared by several comparisons (e.g. the default
settings) are trained once.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edlm.checkpoints import embedded_model_dir, load_hf
from edlm.config import DecodeConfig, TrainConfig, apply_overrides, from_dict, load_yaml
from edlm.errors import ConfigError, EdlmError
from edlm.model import DiffusionLM
from edlm.results import provenance, write_json
from edlm.studies.analysis import answer_accuracy, pack_problems, per_position_loss, weight_drift
from edlm.studies.source import is_trained, pretrain_ar
from edlm.studies.task import TaskConfig, read_test, write_task
from edlm.train import config_fingerprint, convert, latest_checkpoint

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"


@dataclass
class Comparison:
    """One comparison: named variants of the conversion settings, each trained with ``seeds`` seeds."""

    variants: dict[str, dict[str, Any]]
    """Variant name -> dotted overrides of ``conversion`` (e.g. ``{diffusion.pattern: bidirectional}``)."""
    seeds: int = 1
    """Conversion seeds per variant (data order and noise); 3 or more shows the spread."""
    thresholds: list[float] | None = None
    """Decoding thresholds evaluated for this comparison (None: the study's first threshold only)."""

    def __post_init__(self) -> None:
        if not self.variants:
            raise ConfigError("a comparison needs at least one variant")
        if self.seeds < 1:
            raise ConfigError(f"comparison seeds must be >= 1, got {self.seeds}")


@dataclass
class StudyConfig:
    """A study: task, AR source, conversion defaults and the comparisons to run."""

    output_dir: str = "runs/study"
    report_dir: str = "docs/study"
    """Where report.md, its PNG plots and study.json are written."""
    task: TaskConfig = field(default_factory=TaskConfig)
    source: dict[str, Any] = field(default_factory=dict)
    """AR pretraining settings (TrainConfig keys; ``data.corpus`` is filled in with the task and text corpus).
    Set ``pretrained: FOLDER`` (or ``embedded`` for SmolLM2-135M) instead to use an existing model as the source."""
    conversion: dict[str, Any] = field(default_factory=dict)
    """Conversion settings shared by every run (TrainConfig keys; ``model`` and ``data.corpus`` filled in)."""
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    thresholds: list[float] = field(default_factory=lambda: [DecodeConfig().threshold])
    """Default decoding threshold(s); the first is the one comparisons report accuracy at."""
    max_new_tokens: int = 8
    per_position_samples: int = 8
    per_position_rows: int = 32


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    if "headline" in data:
        raise EdlmError(f"{path} is a headline config (it has a 'headline:' section): run it with "
                        f"edlm headline --config {path}")
    return study_config_from_dict(data)


def study_config_from_dict(data: dict[str, Any]) -> StudyConfig:
    """A StudyConfig from the (override-applied) contents of a study YAML; ``data`` is consumed."""
    comparisons = data.pop("comparisons", {}) or {}
    task = data.pop("task", {}) or {}
    cfg = from_dict(StudyConfig, data)
    cfg.task = from_dict(TaskConfig, task, where="task.")
    cfg.comparisons = {name: from_dict(Comparison, c, where=f"comparisons.{name}.") for name, c in comparisons.items()}
    return cfg


# ----------------------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Run:
    overrides: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def name(self) -> str:
        slug = ",".join(f"{k.split('.')[-1]}={v}" for k, v in self.overrides)
        return f"{re.sub(r'[^A-Za-z0-9_.,=-]', '_', slug) or 'default'}__s{self.seed}"


def _freeze(overrides: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in overrides.items()))


def expand(cfg: StudyConfig) -> dict[str, dict[str, list[Run]]]:
    """comparison -> variant -> runs (one per seed). Equal settings give equal Run objects (trained once)."""
    return {name: {variant: [Run(_freeze(o or {}), seed) for seed in range(c.seeds)]
                   for variant, o in c.variants.items()}
            for name, c in cfg.comparisons.items()}


def unique_runs(grid: dict[str, dict[str, list[Run]]]) -> list[Run]:
    return list(dict.fromkeys(r for variants in grid.values() for runs in variants.values() for r in runs))


def thresholds_for(cfg: StudyConfig, run: Run, grid) -> list[float]:
    found = {cfg.thresholds[0]}
    for name, variants in grid.items():
        if any(run in runs for runs in variants.values()):
            found.update(cfg.comparisons[name].thresholds or [])
    return sorted(found, reverse=True)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
    node[parts[-1]] = json.loads(value) if isinstance(value, str) and value[:1] in "[{" else value


def run_config(cfg: StudyConfig, run: Run, source: Path, corpus: list[str]) -> TrainConfig:
    data = copy.deepcopy(cfg.conversion)
    for key, value in run.overrides:
        _set(data, key, value)
    data["model"] = str(source)
    data["seed"] = run.seed
    data["output_dir"] = str(Path(cfg.output_dir) / "runs" / run.name)
    data.setdefault("data", {})["corpus"] = corpus
    return from_dict(TrainConfig, data, where=f"conversion ({run.name}): ")


def source_config(cfg: StudyConfig, corpus: list[str]) -> TrainConfig:
    data = {k: v for k, v in copy.deepcopy(cfg.source).items() if k != "pretrained"}
    data["output_dir"] = str(Path(cfg.output_dir) / "source")
    data.setdefault("data", {})["corpus"] = corpus
    return from_dict(TrainConfig, data, where="source.")


# ----------------------------------------------------------------------------------------------- running


def evaluate_source(cfg: StudyConfig, source: Path, problems) -> dict[str, Any]:
    model, tok = load_hf(source)
    model.eval()
    return {"answers": answer_accuracy(problems, ar_model=model, tokenizer=tok,
                                       decode=DecodeConfig(max_new_tokens=cfg.max_new_tokens)),
            "parameters": sum(p.numel() for p in model.parameters())}


def evaluate_run(cfg: StudyConfig, run_dir: Path, source: Path, problems, thresholds: list[float]) -> dict[str, Any]:
    dlm = DiffusionLM.from_pretrained(run_dir).eval()
    src, _ = load_hf(source)
    seq_len = yaml.safe_load((run_dir / "train_config.yaml").read_text())["data"]["seq_len"]
    x0 = pack_problems(dlm.tokenizer, problems, seq_len, cfg.per_position_rows)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {
        "answers": [answer_accuracy(problems, dlm=dlm, decode=DecodeConfig(max_new_tokens=cfg.max_new_tokens,
                                                                           threshold=t))
                    for t in thresholds],
        "weight_drift": weight_drift(src, dlm.model),
        "per_position_loss": per_position_loss(dlm, x0, samples=cfg.per_position_samples),
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "tokens": metrics[-1]["tokens"] if metrics else None,
        "diffusion": dataclasses.asdict(dlm.config),
    }


def _check_same_settings(run_dir: Path, tcfg: TrainConfig) -> None:
    """A finished or started run must have been trained with the settings the study now asks for."""
    saved = run_dir / "train_config.yaml"
    if not saved.is_file():
        return
    if config_fingerprint(from_dict(TrainConfig, yaml.safe_load(saved.read_text()))) != config_fingerprint(tcfg):
        raise EdlmError(f"{run_dir} was trained with other settings than this study now gives it (see {saved}); "
                        "use a new output_dir for changed settings, or delete that run folder to retrain it")


def study_source(cfg: StudyConfig) -> Path:
    """The AR source's folder: ``source.pretrained`` (``embedded``: the embedded SmolLM2-135M), else the one the
    study trains in ``OUTPUT_DIR/source``."""
    spec = cfg.source.get("pretrained")
    if not spec:
        return Path(cfg.output_dir) / "source"
    return embedded_model_dir() if spec == "embedded" else Path(spec)


def run_study(cfg: StudyConfig, progress: Callable[[str], None] | None = None,
              new_bar: Callable[[str], Callable] | None = None) -> dict[str, Any]:
    """Run (or finish) every step of the study; returns the collected results (also written to study.json).

    ``progress(message)`` announces each step; ``new_bar(name)`` returns a ``progress(step, total, info)``
    callback for one training run (a fresh progress bar in the CLI).
    """
    say = progress or (lambda msg: logger.info(msg))
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str) + "\n")
    train_path, test_path = write_task(cfg.task, out / "task")
    problems = read_test(test_path)
    corpus = [str(train_path.resolve()), *cfg.task.text_corpus]

    source = study_source(cfg)
    if cfg.source.get("pretrained"):
        if not (source / "config.json").is_file():
            raise EdlmError(f"source.pretrained {str(source)!r} is not a Hugging Face model folder")
        source_eval_dir = out / "source"
        source_eval_dir.mkdir(exist_ok=True)
    else:
        if not is_trained(source):
            say(f"training the AR source model -> {source}")
            pretrain_ar(source_config(cfg, corpus), source, progress=new_bar("source") if new_bar else None)
        source_eval_dir = source
    if not (source_eval_dir / EVAL_FILE).is_file():
        say("evaluating the AR source model")
        write_json(evaluate_source(cfg, source, problems), source_eval_dir / EVAL_FILE)

    grid = expand(cfg)
    runs = unique_runs(grid)
    for i, run in enumerate(runs, 1):
        run_dir = out / "runs" / run.name
        tcfg = run_config(cfg, run, source, corpus)
        _check_same_settings(run_dir, tcfg)
        if (run_dir / EVAL_FILE).is_file():
            continue
        if not (run_dir / "edlm_config.json").is_file():
            say(f"[{i}/{len(runs)}] converting {run.name}")
            convert(tcfg, resume=latest_checkpoint(run_dir) is not None,
                    progress=new_bar(run.name) if new_bar else None)
        say(f"[{i}/{len(runs)}] evaluating {run.name}")
        write_json(evaluate_run(cfg, run_dir, source, problems, thresholds_for(cfg, run, grid)), run_dir / EVAL_FILE)
    results = collect(cfg)
    write_json(results, out / "study.json")
    return results


def collect(cfg: StudyConfig) -> dict[str, Any]:
    """Every finished result of the study in one dict (missing runs are listed, not fatal)."""
    out = Path(cfg.output_dir)
    source_eval = out / "source" / EVAL_FILE
    grid = expand(cfg)
    comparisons: dict[str, Any] = {}
    missing = []
    for name, variants in grid.items():
        comparisons[name] = {}
        for variant, runs in variants.items():
            found = []
            for run in runs:
                path = out / "runs" / run.name / EVAL_FILE
                if path.is_file():
                    found.append({"run": run.name, "seed": run.seed, **json.loads(path.read_text())})
                else:
                    missing.append(run.name)
            comparisons[name][variant] = {"overrides": dict(runs[0].overrides), "runs": found}
    return {"source": json.loads(source_eval.read_text()) if source_eval.is_file() else None,
            "comparisons": comparisons, "missing": sorted(set(missing)),
            "config": json.loads((out / "study_config.json").read_text())
            if (out / "study_config.json").is_file() else None,
            "machine": provenance()}
