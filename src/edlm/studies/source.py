"""Train the study's AR source model from scratch (plain next-token loss), resumable and saved atomically.

The settings are a :class:`~edlm.config.TrainConfig` (its ``diffusion`` and ``lora`` parts are unused): the same
data pipeline, seeded data order and learning-rate schedule as a conversion run, so the source model and its
conversions see their data the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from edlm.config import TrainConfig, to_dict
from edlm.train import DataStream, ProgressFn, config_fingerprint, lr_lambda

logger = logging.getLogger(__name__)

DONE_FILE = "edlm_source.json"
_STATE = "ar_state.pt"


def is_trained(out: Path) -> bool:
    return (Path(out) / DONE_FILE).is_file()


def pretrain_ar(cfg: TrainConfig, out: str | os.PathLike, progress: ProgressFn | None = None) -> Path:
    """Train ``cfg.model`` autoregressively on ``cfg.data``; save a Hugging Face folder at ``out``.

    A finished folder is left alone. An interrupted run resumes from ``out.partial/ar_state.pt`` (written every
    ``cfg.save_every`` steps) when its settings are unchanged; the final folder appears only when complete.
    """
    from edlm.assets import resolve_model
    from edlm.data import build_data

    out = Path(out)
    if is_trained(out):
        return out
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    work = out.with_name(out.name + ".partial")
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = resolve_model(cfg.model, dtype=torch.float32, seed=cfg.seed)
    train_data, _ = build_data(cfg.data, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    fingerprint = config_fingerprint(cfg)
    start = 0
    state_path = work / _STATE
    if state_path.is_file():
        state = torch.load(state_path, weights_only=False)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start = state["step"]
            logger.info("resumed AR pretraining at step %d", start)
        else:
            logger.warning("ignoring %s: written with other settings", state_path)
    stream = DataStream(len(train_data), cfg.seed)
    mb = cfg.micro_batch_size
    metrics = (work / "metrics.jsonl").open("a")
    model.train()
    t0, seen = time.perf_counter(), 0
    for step in range(start, cfg.max_steps):
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            first = (step * cfg.grad_accum + micro) * mb
            x = train_data[stream.rows(list(range(first, first + mb)))]
            loss = model(input_ids=x, labels=x).loss
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        seen += cfg.grad_accum * mb * cfg.data.seq_len
        record = {"step": done, "loss": loss_sum, "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
        if progress:
            progress(done, cfg.max_steps, record if done % cfg.log_every == 0 else {})
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"step": done, "fingerprint": fingerprint, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
            os.replace(tmp, state_path)
    metrics.close()
    final = work / "model"
    shutil.rmtree(final, ignore_errors=True)
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    shutil.copy(work / "metrics.jsonl", final / "metrics.jsonl")
    (final / DONE_FILE).write_text(json.dumps({"steps": cfg.max_steps, "config": to_dict(cfg)}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(final, out)
    shutil.rmtree(work, ignore_errors=True)
    return out
