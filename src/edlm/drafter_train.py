"""Training a :class:`edlm.drafter.Drafter` on distilled answers and their cached source features.

The data is what ``edlm distill --features`` wrote: the source's own answers (token ids) and the outputs of the
drafter's target layers at every position, so a step never runs the source. Each step takes ``batch_size`` answers
and ``anchors`` random block openings in each (DFlash: random anchors beat fixed blocks): a block opening at
position p holds the token at p and masks, sees the features of positions < p, and is scored on the tokens at
p+1 .. p+B-1 with weight exp(-(k-1)/gamma) at column k (:func:`edlm.drafter.position_weights`).

Resume: ``OUT/drafter`` is the drafter folder (bf16, a few MB: the thing to commit), ``OUT/state.pt`` the fp32
weights, optimizer and step (not committed). A run restarts from ``state.pt``, or, when only the drafter folder is
there (a fresh clone), from its weights with a new optimizer. Each step's batch is a pure function of (seed,
step), so a resumed run sees the data an uninterrupted one would. ``OUT/metrics.jsonl`` is the budget curve: the
held-out mean accepted run (tau) and accuracy per offset against tokens seen.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from edlm.checkpoints import resolve_model
from edlm.config import apply_overrides, from_dict, load_yaml
from edlm.distill import DistillConfig, distill, feature_layers, load_features, rebuild_features
from edlm.drafter import (
    Drafter,
    DrafterConfig,
    block_loss,
    default_target_layers,
    draft_vocabulary,
    position_weights,
    training_mask,
)
from edlm.engine import compile_model
from edlm.errors import EdlmError

logger = logging.getLogger(__name__)


@dataclass
class DrafterTrainConfig:
    """``edlm drafter``'s settings (a YAML file is this dataclass serialised)."""

    output_dir: str = "runs/drafter"
    model: str | None = None
    """The source (None: the embedded SmolLM2-135M-Instruct)."""
    data: str | None = None
    """The distilled jsonl file (None: ``OUT/distill.jsonl``). Its token ids may be committed; its features
    (``<data>.features/``) are rebuilt by a batched prefill when missing."""
    distill: dict[str, Any] | None = None
    """:class:`edlm.distill.DistillConfig` fields: when set, the source's answers are distilled into ``data`` first
    (on the compiled engine, fp32; resumes), with the drafter's target layers as features."""
    drafter: dict[str, Any] = field(default_factory=dict)
    """:class:`edlm.drafter.DrafterConfig` fields: num_hidden_layers, block_size, draft_vocab_size, init,
    target_layer_ids (must be the distilled features' layers, in order)."""
    steps: int = 2000
    batch_size: int = 8
    """Answers per step."""
    anchors: int = 16
    """Blocks per answer per step."""
    lr: float = 6e-4
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    gamma: float = 4.0
    """Loss decay along the block (DFlash: 4 at block 8, 7 at 16)."""
    grad_clip: float = 1.0
    heldout: int = 48
    """Answers kept out of training, to score the budget curve on."""
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    num_threads: int | None = None
    device: str = "auto"
    """Where the drafter trains: ``auto`` (a CUDA GPU when one is visible, else the CPU), ``cpu`` or ``cuda``. The
    source (distillation, feature rebuilds) stays on the CPU; the cached features travel with each batch."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.anchors < 1:
            raise EdlmError("drafter training: steps, batch_size and anchors must be >= 1")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise EdlmError(f"drafter training: device must be auto, cpu or cuda[:N], not {self.device!r}")
        if self.data is None:
            self.data = str(Path(self.output_dir) / "distill.jsonl")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None,
                output_dir: str | None = None) -> DrafterTrainConfig:
    """A config from YAML (first line: the command that runs it), with ``key=value`` overrides."""
    data = apply_overrides(load_yaml(path), overrides or [])
    if output_dir:
        data["output_dir"] = output_dir
    return from_dict(DrafterTrainConfig, data, where=f"{path}: ")


def is_block_drafter_config(path: str | os.PathLike) -> bool:
    """Whether a drafter YAML is this drafter's recipe (the gated adapter's has a ``convert`` section)."""
    return "convert" not in load_yaml(path)


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Answer:
    ids: torch.Tensor
    """(L,) prompt and answer token ids."""
    prompt: int
    """Prompt tokens: anchors open at positions >= this (the first drafted block opens on the first answer token)."""
    features: torch.Tensor
    """(L - 1, layers, D) fp16."""


def load_answers(path: str | os.PathLike) -> list[Answer]:
    """Every distilled answer of ``path`` with its features, in id order."""
    path = Path(path)
    if not path.is_file():
        raise EdlmError(f"no distilled data at {str(path)!r}; make it with: edlm distill --output {path} "
                        "--features 1,8,14,20,27 --compile")
    feats = load_features(path)
    out = []
    missing = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        if "ids" not in r or r["id"] not in feats:
            missing += 1
            continue
        if len(r["ids"]) - r["prompt_tokens"] >= 2:
            out.append((r["id"], Answer(torch.tensor(r["ids"]), r["prompt_tokens"], feats[r["id"]])))
    if missing:
        logger.warning("%d records of %s have no features (rebuild them: edlm distill --rebuild-features)", missing,
                       path)
    if not out:
        raise EdlmError(f"{path} holds no answers with features; run edlm distill with --features")
    return [a for _, a in sorted(out, key=lambda x: x[0])]


def make_batch(answers: list[Answer], anchors: int, block: int, t2d: torch.Tensor, generator: torch.Generator,
               ) -> dict[str, torch.Tensor]:
    """One training batch: random anchors per answer, the context features before the latest one, the block's
    first tokens, positions and labels (draft-vocabulary indices, -100 where there is none)."""
    r = len(answers)
    opens = []
    for a in answers:
        lo, hi = a.prompt, len(a.ids) - 2  # the block's token and at least one label exist
        opens.append(torch.randint(lo, hi + 1, (anchors,), generator=generator))
    opens_t = torch.stack(opens)  # (R, A)
    ctx_len = int(opens_t.max())
    feats = torch.zeros((r, max(ctx_len, 1), *answers[0].features.shape[1:]), dtype=torch.float16)
    first = torch.empty((r, anchors), dtype=torch.long)
    labels = torch.full((r, anchors, block), -100, dtype=torch.long)
    for i, a in enumerate(answers):
        n = min(ctx_len, a.features.shape[0])
        feats[i, :n] = a.features[:n]
        first[i] = a.ids[opens_t[i]]
        for k in range(1, block):
            at = opens_t[i] + k
            ok = at < len(a.ids)
            labels[i, ok, k] = t2d[a.ids[at[ok]]]
    k = torch.arange(block)
    return {"features": feats, "first": first, "anchors": opens_t,
            "positions": (opens_t[:, :, None] + k).reshape(r, -1), "labels": labels.reshape(r, -1),
            "ctx_positions": torch.arange(feats.shape[1])[None].expand(r, -1)}


def run_batch(drafter: Drafter, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Draft logits (R, A*B, Vd) of a (CPU) batch, on the drafter's device."""
    device = drafter.embed.device
    mask = training_mask(batch["anchors"], batch["features"].shape[1], drafter.cfg.block_size).to(device)
    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    ctx = drafter.context(b["features"])
    return drafter(b["first"], b["positions"], ctx, b["ctx_positions"], mask)


def train_device(name: str) -> torch.device:
    """The device of :attr:`DrafterTrainConfig.device`; a clear error when CUDA is asked for and not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EdlmError(f"drafter training on {name!r}, but torch sees no CUDA GPU here (torch {torch.__version__}); "
                        "use --set device=cpu, or install a CUDA build of torch")
    return torch.device(name)


@torch.no_grad()
def block_guesses(drafter: Drafter, answers: list[Answer], anchors: int = 32, seed: int = 1234,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The drafter's greedy guesses at ``anchors`` fixed random blocks per answer, teacher-forced on the source's
    own answer (what greedy decoding sees): ``(right, confidence, real)``, each (N, B-1) over offsets 1..B-1: the
    guess equals the answer's token; the guess's probability; the offset holds a token of the answer."""
    was_training = drafter.training
    drafter.eval()
    b = drafter.cfg.block_size
    t2d = token_to_draft(drafter)
    gen = torch.Generator().manual_seed(seed)
    right, conf, real = [], [], []
    for at in range(0, len(answers), 8):
        batch = make_batch(answers[at:at + 8], anchors, b, t2d, gen)
        logits = run_batch(drafter, batch).cpu()
        r = logits.shape[0]
        p, guess = torch.softmax(logits.float(), -1).max(-1)
        labels = batch["labels"].view(r, anchors, b)[..., 1:]
        right.append(((guess.view(r, anchors, b)[..., 1:] == labels) & (labels >= 0)).reshape(-1, b - 1))
        conf.append(p.view(r, anchors, b)[..., 1:].reshape(-1, b - 1))
        real.append(_true_tokens(answers[at:at + 8], batch["anchors"], b).reshape(-1, b - 1))
    drafter.train(was_training)
    return torch.cat(right), torch.cat(conf), torch.cat(real)


def score(drafter: Drafter, answers: list[Answer], anchors: int = 32, seed: int = 1234) -> dict[str, Any]:
    """Held-out quality: accuracy per block offset and tau, the mean run of right guesses from offset 1 (what a
    greedy verify accepts per block), over ``anchors`` fixed random blocks per answer."""
    right, _, real = block_guesses(drafter, answers, anchors, seed)
    run = (right & real).long().cumprod(-1).sum(-1).float()
    return {"tau": float(run.mean()),
            "accuracy": [float(right[:, k][real[:, k]].float().mean()) for k in range(right.shape[1])]}


def _true_tokens(answers: list[Answer], opens: torch.Tensor, block: int) -> torch.Tensor:
    """(R, A, B-1) bool: the offset's position holds a token of the answer."""
    lengths = torch.tensor([len(a.ids) for a in answers])[:, None, None]
    return opens[:, :, None] + torch.arange(1, block) < lengths


def token_to_draft(drafter: Drafter) -> torch.Tensor:
    """(V,) draft-vocabulary index of every token id, -100 for tokens the drafter cannot propose."""
    t2d = torch.full((drafter.cfg.vocab_size,), -100, dtype=torch.long)
    t2d[drafter.d2t.cpu()] = torch.arange(drafter.d2t.numel())
    return t2d


# ------------------------------------------------------------------------------------------------ the loop


def prepare_data(cfg: DrafterTrainConfig, source, tokenizer, say: Callable[[str], None] = logger.info) -> None:
    """Distil (``cfg.distill``) and rebuild missing features, resuming whatever is done."""
    layers = (cfg.drafter.get("target_layer_ids") or feature_layers(cfg.data)
              or default_target_layers(source.config.num_hidden_layers))
    if cfg.distill is not None:
        dcfg = DistillConfig(**{**cfg.distill, "feature_layers": layers})
        say(f"distilling the source's answers into {cfg.data} (features of layers {layers})")
        t0 = time.perf_counter()
        engine = compile_model(source, "fp32") if type(source).__name__ != "Engine" else source
        distill(engine, tokenizer, dcfg, cfg.data)
        say(f"distillation: {time.perf_counter() - t0:.0f} s")
    if Path(cfg.data).is_file():
        rebuilt = rebuild_features(source, cfg.data, layers)
        if rebuilt:
            say(f"rebuilt the features of {rebuilt} answers by prefill")


def train_drafter(cfg: DrafterTrainConfig, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                  say: Callable[[str], None] = logger.info) -> Path:
    """Distil if configured, then train (or resume) a drafter; returns its folder ``OUT/drafter``."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "drafter_train.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    source, tokenizer = resolve_model(cfg.model, dtype=torch.float32)
    source.eval().requires_grad_(False)
    prepare_data(cfg, source, tokenizer, say)
    answers = load_answers(cfg.data)
    heldout, train = answers[-cfg.heldout:], answers[:-cfg.heldout] or answers
    folder, state_path = out / "drafter", out / "state.pt"
    if (folder / "drafter_config.json").is_file():
        drafter = Drafter.load(folder, source)
    else:
        counts = torch.zeros(source.config.vocab_size)
        for a in train:
            counts += torch.bincount(a.ids[a.prompt:], minlength=counts.numel()).float()
        settings = dict(cfg.drafter)
        size = settings.get("draft_vocab_size") or counts.numel()
        always = [t for t in (tokenizer.eos_token_id,) if t is not None]
        d2t = draft_vocabulary(counts, size, always)
        layers = feature_layers(cfg.data)
        if settings.setdefault("target_layer_ids", layers) != layers:
            raise EdlmError(f"{cfg.data} holds features of source layers {layers}, the drafter config asks for "
                            f"{settings['target_layer_ids']}: distil again with --features "
                            f"{','.join(map(str, settings['target_layer_ids']))}, or drop target_layer_ids")
        dcfg = DrafterConfig.for_source(source, source=cfg.model or "embedded",
                                        **{**settings, "draft_vocab_size": size})
        drafter = Drafter(dcfg, source, d2t=d2t)
        covered = float(counts[d2t].sum() / counts.sum().clamp_min(1))
        logger.info("draft vocabulary: %d tokens cover %.1f%% of training answer tokens", size, 100 * covered)
    device = train_device(cfg.device)
    drafter.to(device).train()
    params = [p for p in drafter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    start = 0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True, map_location=device)
        drafter.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        logger.info("resumed at step %d from %s", start, state_path)
    elif (out / "progress.json").is_file():
        start = json.loads((out / "progress.json").read_text())["step"]
        logger.warning("resumed at step %d from the drafter folder alone (a new optimizer)", start)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    weights = position_weights(drafter.cfg.block_size, cfg.gamma).to(device)
    t2d = token_to_draft(drafter)
    metrics = out / "metrics.jsonl"
    tokens_per_step = cfg.batch_size * cfg.anchors * (drafter.cfg.block_size - 1)
    t0, window = time.perf_counter(), []
    for step in range(start, cfg.steps):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # the batch is a function of (seed, step)
        picks = torch.randint(len(train), (cfg.batch_size,), generator=gen).tolist()
        batch = make_batch([train[i] for i in picks], cfg.anchors, drafter.cfg.block_size, t2d, gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = block_loss(run_batch(drafter, batch), batch["labels"].to(device), weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        window.append(float(loss.detach()))
        done = step + 1
        info: dict[str, Any] = {}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            held = score(drafter, heldout)
            rate = len(window) / (time.perf_counter() - t0)
            info = {"step": done, "loss": sum(window) / len(window), "heldout_tau": held["tau"],
                    "heldout_accuracy": held["accuracy"], "tokens_seen": done * tokens_per_step,
                    "steps_per_s": rate, "tokens_per_s": rate * tokens_per_step}
            with metrics.open("a") as f:
                f.write(json.dumps(info) + "\n")
            t0, window = time.perf_counter(), []
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save(drafter, optimizer, done, folder, state_path, out)
        if progress:
            progress(done, cfg.steps, info)
    return folder


def _save(drafter: Drafter, optimizer, step: int, folder: Path, state_path: Path, out: Path) -> None:
    drafter.save(folder)
    tmp = state_path.with_suffix(".tmp")
    torch.save({"model": drafter.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    os.replace(tmp, state_path)
    (out / "progress.json").write_text(json.dumps({"step": step}) + "\n")
