"""The training loop, on accelerate, with one of several objectives (:data:`OBJECTIVES`):

* ``diffusion``: convert an AR model into a block-diffusion LM by continued pretraining (``edlm convert``);
* ``ar``: plain next-token training of the AR model itself (a study's source model, trained from scratch).

Both share the data pipeline, the seeded data order, the optimizer and LR schedule, the atomic resumable
checkpoints and the progress callback; an objective only says what module is trained, what a batch's loss is and
what folder is saved at the end.

Determinism and resume: the data order is a fixed permutation per epoch (seeded) and each sample's noise comes
from a generator seeded by (seed, sample position in the stream), so the batch at step s is a pure function of
(config, s). A checkpoint therefore only needs the model, optimizer and LR-scheduler state plus the step; a
resumed run sees exactly the data and noise an uninterrupted run would, and the same holds under any number of
processes with the same global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml

from edlm.checkpoints import resolve_model
from edlm.config import TrainConfig, to_dict
from edlm.data import build_data
from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.noising import noise_samples

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
# Settings that may change between a run and its resumption without changing what is trained.
_RESUMABLE_FIELDS = ("output_dir", "max_steps", "log_every", "save_every", "keep_checkpoints", "num_threads")


# ----------------------------------------------------------------------------------------------- metric loggers


class MetricLogger(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl``."""

    def __init__(self, path: Path):
        self.file = path.open("a")

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """Scalars to tensorboard, when it is installed."""

    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


def _make_loggers(out: Path) -> list[MetricLogger]:
    loggers: list[MetricLogger] = [JsonlLogger(out / METRICS_FILE)]
    try:
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(out / "tensorboard"))
    except ImportError:
        pass
    return loggers


# ----------------------------------------------------------------------------------------------- pieces


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of cfg.lr at optimizer step s: linear warm-up, then constant or cosine down to min_lr."""

    def fn(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.min_lr / cfg.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


class DataStream:
    """Sample positions -> dataset rows: a seeded permutation per epoch."""

    def __init__(self, n_rows: int, seed: int):
        self.n_rows, self.seed = n_rows, seed
        self._perms: dict[int, torch.Tensor] = {}

    def rows(self, positions: list[int]) -> list[int]:
        out = []
        for pos in positions:
            epoch, i = divmod(pos, self.n_rows)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(
                    self.seed * 7919 + epoch))}
            out.append(int(self._perms[epoch][i]))
        return out


def config_fingerprint(cfg: TrainConfig) -> str:
    """Hash of the settings that define what is trained (excludes max_steps, output_dir, logging...)."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_FIELDS}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``out`` (incomplete ones never have the final name)."""
    found = []
    for p in out.glob(f"{CHECKPOINT_PREFIX}*"):
        if p.is_dir() and (p / STATE_FILE).is_file() and p.name[len(CHECKPOINT_PREFIX):].isdigit():
            found.append((int(p.name[len(CHECKPOINT_PREFIX):]), p))
    return max(found)[1] if found else None


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only metric lines up to ``last_step`` (a resumed run rewrites what follows)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _apply_lora(model: torch.nn.Module, cfg) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    if cfg.train_embeddings:  # the paper trains embeddings, norms and LM head fully alongside the adapters
        for name, param in model.named_parameters():
            if "lora_" not in name and ("embed" in name or "norm" in name or "lm_head" in name):
                param.requires_grad_(True)
    return model


def _resolve_runtime(cfg: TrainConfig) -> tuple[str, str]:
    cuda = torch.cuda.is_available()
    mixed = cfg.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    attn = cfg.attn_implementation
    if attn == "auto":
        attn = "sdpa"  # flex_attention is opt-in until its path is validated on GPU
    if attn == "flex_attention" and not cuda:
        raise EdlmError("attn_implementation=flex_attention needs a CUDA GPU (flex has no backward on CPU); "
                        "use sdpa on CPU")
    return mixed, attn


# ----------------------------------------------------------------------------------------------- objectives


AR_DONE_FILE = "edlm_source.json"
"""Written last into the folder of a finished ``ar`` run: while it is missing, the folder is not a finished model."""


class Objective(Protocol):
    """What the loop trains: the module built from the AR model, the loss of a batch, the folder saved at the end."""

    name: str

    def build(self, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig) -> torch.nn.Module:
        """The module to train (its trainable parameters get the optimizer)."""
        ...

    def loss(self, module: torch.nn.Module, raw: torch.nn.Module, x0: torch.Tensor, positions: list[int],
             seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, extra metrics) of the batch ``x0`` (B, L) at stream ``positions``; ``module`` is ``raw`` as
        prepared by accelerate (call it), ``raw`` the bare module (read its settings)."""
        ...

    def save(self, raw: torch.nn.Module, tokenizer: Any, out: Path, state_dict: dict[str, torch.Tensor] | None,
             cfg: TrainConfig) -> None:
        """Write the finished model into ``out`` (``state_dict``: gathered full weights under FSDP/ZeRO-3)."""
        ...


class DiffusionObjective:
    """Block-diffusion conversion: masked-token loss on noised sequences (+ the AR loss on the clean copy when
    ``diffusion.ar_weight`` > 0); saves a converted folder (HF weights + ``edlm_config.json``)."""

    name = "diffusion"

    def build(self, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig) -> torch.nn.Module:
        dlm = DiffusionLM.from_ar(model, tokenizer, cfg.diffusion)
        if cfg.lora is not None and cfg.lora.gated:
            dlm.add_gated_adapter(cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules, cfg.lora.layers,
                                  source={"model": cfg.model or "embedded", "seed": cfg.seed})
        elif cfg.lora is not None:
            dlm.model = _apply_lora(dlm.model, cfg.lora)
        return dlm

    def loss(self, module, raw, x0, positions, seed):
        result = module(noise_samples(x0, raw.config, raw.mask_id, seed, positions))
        extras = {"masked_ce": result.masked_ce}
        if result.ar_ce is not None:
            extras["ar_ce"] = result.ar_ce
        return result.loss, extras

    def save(self, raw, tokenizer, out, state_dict, cfg) -> None:
        raw.save_pretrained(out, state_dict=state_dict)


class ArObjective:
    """Plain next-token training of the model as it is (all weights); saves a Hugging Face AR folder, then
    :data:`AR_DONE_FILE`."""

    name = "ar"

    def build(self, model: torch.nn.Module, tokenizer: Any, cfg: TrainConfig) -> torch.nn.Module:
        if cfg.lora is not None:
            raise EdlmError("the ar objective trains all weights; remove the lora section")
        return model

    def loss(self, module, raw, x0, positions, seed):
        return module(input_ids=x0, labels=x0).loss, {}

    def save(self, raw, tokenizer, out, state_dict, cfg) -> None:
        raw.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(out)
        tmp = out / f".{AR_DONE_FILE}.tmp"
        tmp.write_text(json.dumps({"steps": cfg.max_steps, "objective": self.name, "config": to_dict(cfg)}, indent=2))
        os.replace(tmp, out / AR_DONE_FILE)


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (DiffusionObjective(), ArObjective())}


# ----------------------------------------------------------------------------------------------- the loop


ProgressFn = Callable[[int, int, dict[str, Any]], None]
"""``progress(step, max_steps, info)``: ``info`` is the metrics record on logging steps (else empty), plus
``"checkpoint"`` (the folder) on steps that wrote one."""


def convert(cfg: TrainConfig, resume: bool = False, progress: ProgressFn | None = None) -> Path:
    """Convert an AR model into a block-diffusion LM: :func:`train` with the ``diffusion`` objective."""
    return train(cfg, "diffusion", resume=resume, progress=progress)


def train(cfg: TrainConfig, objective: str = "diffusion", resume: bool = False,
          progress: ProgressFn | None = None) -> Path:
    """Train ``cfg.model`` on ``cfg.data`` with an objective; returns the output folder (the final model is saved
    there).

    Args:
        cfg: the run's settings (the ``ar`` objective ignores ``diffusion``).
        objective: a name from :data:`OBJECTIVES`: ``diffusion`` (conversion) or ``ar`` (next-token training).
        resume: continue from the latest checkpoint in ``cfg.output_dir`` (error if its settings or objective
            differ).
        progress: called as ``progress(step, max_steps, info)`` (see :data:`ProgressFn`) after every optimizer step
            and its checkpoint, on the main process.
    """
    from accelerate import Accelerator

    if objective not in OBJECTIVES:
        raise EdlmError(f"unknown training objective {objective!r}; choose one of {sorted(OBJECTIVES)}")
    obj = OBJECTIVES[objective]
    out = Path(cfg.output_dir)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    mixed, attn = _resolve_runtime(cfg)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if accelerator.distributed_type.name == "DEEPSPEED" and cfg.grad_accum > 1:
        raise EdlmError("under DeepSpeed set grad_accum: 1 in the edlm config and put the accumulation in the "
                        "accelerate config (deepspeed_config.gradient_accumulation_steps)")

    ckpt = latest_checkpoint(out) if resume else None
    if resume and ckpt is None:
        logger.warning("--resume: no checkpoint in %s; starting from step 0", out)
    if ckpt is not None:
        saved = json.loads((ckpt / STATE_FILE).read_text())
        if saved.get("objective", "diffusion") != objective:
            raise EdlmError(f"checkpoint {ckpt} was written by a {saved.get('objective', 'diffusion')!r} run, not "
                            f"{objective!r}; use a new --output-dir")
        if saved["fingerprint"] != config_fingerprint(cfg):
            raise EdlmError(f"checkpoint {ckpt} was written with different settings than this run "
                            f"(see {out / 'train_config.yaml'}); resume with the same config, or use a new "
                            "--output-dir")
    elif not resume and latest_checkpoint(out) is not None:  # every rank checks: no rank may hang waiting
        raise EdlmError(f"{out} already holds checkpoints; pass --resume to continue that run or choose a new "
                        "--output-dir")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    model, tokenizer = resolve_model(cfg.model, dtype=torch.float32, attn_implementation=attn, seed=cfg.seed)
    module = obj.build(model, tokenizer, cfg)
    with accelerator.main_process_first():
        train_data, _ = build_data(cfg.data, tokenizer, cfg.diffusion.block_size)

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    raw = accelerator.unwrap_model(module)
    frozen_source = getattr(raw, "gate", None) is not None
    if frozen_source:  # checkpoints hold what is trained (a few MB), not the frozen source it sits on
        accelerator.register_save_state_pre_hook(_trainable_only)

    start = 0
    if ckpt is not None:
        accelerator.load_state(str(ckpt), **({"strict": False} if frozen_source else {}))
        start = json.loads((ckpt / STATE_FILE).read_text())["step"]
        logger.info("resumed from %s at step %d", ckpt, start)
    if main:
        _truncate_metrics(out / METRICS_FILE, start)
    loggers = _make_loggers(out) if main else []

    world, rank = accelerator.num_processes, accelerator.process_index
    mb, accum = cfg.micro_batch_size, cfg.grad_accum
    global_batch = mb * accum * world
    stream = DataStream(len(train_data), cfg.seed)
    tokens_per_step = global_batch * cfg.data.seq_len
    logger.info("training %s (%s objective): %d sequences of %d tokens, global batch %d, steps %d..%d",
                type(getattr(raw, "model", raw)).__name__, objective, len(train_data), cfg.data.seq_len,
                global_batch, start, cfg.max_steps)

    window: dict[str, float] = defaultdict(float)  # sums over the steps since the last log line
    steps_in_window = 0
    t_window = time.perf_counter()
    module.train()
    for step in range(start, cfg.max_steps):
        for micro in range(accum):
            first = step * global_batch + micro * mb * world + rank * mb
            positions = list(range(first, first + mb))
            x0 = train_data[stream.rows(positions)].to(accelerator.device)
            sync = micro == accum - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(module)
            with ctx:
                loss, extras = obj.loss(module, raw, x0, positions, cfg.seed)
                accelerator.backward(loss / accum)
            for key, value in {"loss": loss.detach(), **extras}.items():
                window[key] += float(value) / accum
        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        steps_in_window += 1
        done = step + 1
        info: dict[str, Any] = {}  # what progress() gets

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - t_window
            record = {
                "step": done,
                **{key: _mean_across(accelerator, total / steps_in_window) for key, total in window.items()},
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": done * tokens_per_step,
                "tokens_per_s": steps_in_window * tokens_per_step / max(elapsed, 1e-9),
            }
            for lg in loggers:
                lg.log(record)
            window, steps_in_window = defaultdict(float), 0
            t_window = time.perf_counter()
            info = record

        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            info = {**info, "checkpoint": str(_save_checkpoint(accelerator, out, done, cfg, objective))}
        if progress and main:
            progress(done, cfg.max_steps, info)

    for lg in loggers:
        lg.close()
    accelerator.wait_for_everyone()
    # Under FSDP / ZeRO-3 the parameters are sharded: gather a full state dict (every rank takes part).
    sharded = accelerator.distributed_type.name in ("FSDP", "DEEPSPEED")
    state = accelerator.get_state_dict(module) if sharded else None
    if main:
        obj.save(raw, tokenizer, out, state, cfg)
        logger.info("saved the trained model (%s objective) to %s", objective, out)
    accelerator.wait_for_everyone()
    return out


def _trainable_only(models: list[torch.nn.Module], weights: list[dict[str, torch.Tensor]], output_dir: str) -> None:
    """accelerate's save-state hook: keep only the trainable tensors of each model's state dict."""
    for model, state in zip(models, weights):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in trained]:
            del state[name]


def _mean_across(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="mean"))


def _save_checkpoint(accelerator, out: Path, step: int, cfg: TrainConfig, objective: str) -> Path:
    """Write ``checkpoint-STEP`` atomically: everything goes to a hidden folder that is renamed when complete.
    Returns the folder."""
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "objective": objective, "fingerprint": config_fingerprint(cfg), "config": to_dict(cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ckpts = sorted((int(p.name[len(CHECKPOINT_PREFIX):]), p) for p in out.glob(f"{CHECKPOINT_PREFIX}*")
                       if p.name[len(CHECKPOINT_PREFIX):].isdigit())
        for _, old in ckpts[: -cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


