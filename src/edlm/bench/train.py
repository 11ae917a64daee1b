"""Training benchmarks: conversion vs AR fine-tuning throughput, attention-mask memory, peak training memory."""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any

import torch

from edlm.checkpoints import resolve_model
from edlm.config import DiffusionConfig, TrainConfig, to_dict
from edlm.data import build_data
from edlm.errors import EdlmError
from edlm.masks import PATTERNS, flex_block_mask
from edlm.model import DiffusionLM
from edlm.noising import noise_samples
from edlm.results import machine_info
from edlm.table import Table
from edlm.train import OBJECTIVES


def train_throughput(cfg: TrainConfig, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Tokens/s of a conversion step vs a plain AR fine-tuning step of the same model, batch and length, and (for
    patterns with a clean copy) of the joint objective's step: the same conversion step plus the AR loss on the
    causal clean copy (``ar_weight`` 1.0, ``clean_causal``), whose cost over the diffusion-only step it reports.

    Each phase's loss is the training loop's objective (:data:`edlm.train.OBJECTIVES`: ``ar`` on the converted
    model's weights, ``diffusion``). All use AdamW on the same trainable parameters and the same packed batches.
    The AR phase runs first, so the process's peak RSS after each phase shows the extra memory of the dLM step
    (RSS peaks never go down). On CUDA, peak allocated memory is reset and read per phase instead.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = resolve_model(cfg.model, dtype=torch.float32, attn_implementation="sdpa", seed=cfg.seed)
    dlm = DiffusionLM.from_ar(model, tokenizer, cfg.diffusion).to(device)
    data, _ = build_data(cfg.data, tokenizer, cfg.diffusion.block_size)
    mb = cfg.micro_batch_size
    batches = [data[[(i * mb + j) % len(data) for j in range(mb)]].to(device) for i in range(steps + warmup)]

    def run_phase(step_fn) -> dict[str, float]:
        optimizer = torch.optim.AdamW([p for p in dlm.parameters() if p.requires_grad], lr=1e-6)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i, x0 in enumerate(batches):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step_fn(x0, i)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]  # median: robust to a noisy neighbour
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else rss
        return {"step_s_median": step_s, "tokens_per_s": mb * cfg.data.seq_len / step_s, "peak_mem_mb": peak / 2**20}

    def loss_of(objective: str, module):
        """A phase's step loss: the training loop's own objective on the batch at stream position i * mb."""
        return lambda x0, i: OBJECTIVES[objective].loss(module, module, x0, list(range(i * mb, (i + 1) * mb)),
                                                        cfg.seed)[0]

    dlm.train()
    ar = run_phase(loss_of("ar", dlm.model))
    diff = run_phase(loss_of("diffusion", dlm))
    joint: dict[str, Any] = {}
    if dlm.pattern.clean_copy:
        both = DiffusionLM(dlm.model, tokenizer, dataclasses.replace(dlm.config, clean_causal=True,
                                                                     ar_weight=dlm.config.ar_weight or 1.0))
        step = run_phase(loss_of("diffusion", both))
        joint = {"dlm_convert_joint": {**step, "ar_weight": both.config.ar_weight,
                                       "diffusion_weight": both.config.diffusion_weight},
                 "joint_over_dlm_step_time": step["step_s_median"] / diff["step_s_median"]}
    return {
        "ar_finetune": ar,
        "dlm_convert": diff,
        "dlm_over_ar_step_time": diff["step_s_median"] / ar["step_s_median"],
        **joint,
        "settings": {**to_dict(cfg), "steps": steps, "warmup": warmup, "device": device},
        "machine": machine_info(),
        "memory_note": "CPU: process peak RSS after each phase (AR phase ran first)" if device == "cpu"
        else "CUDA: peak allocated per phase",
    }


# ----------------------------------------------------------------------------------------------- masks


def mask_memory(lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192), block: int = 64,
                device: str | None = None) -> dict[str, Any]:
    """Bytes held by the training attention mask of ``[xt ; x0]`` at growing sequence lengths.

    Dense: the (2L, 2L) bool mask SDPA needs (the CPU path). Flex: the tensors of the sparse ``BlockMask`` built
    from the same predicate (the GPU path; built here on ``device``, CPU by default). The dense mask grows
    quadratically; the BlockMask stores per 128x128 tile only indices of the non-empty tiles.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for n in lengths:
        total = 2 * n
        mod = PATTERNS["block_causal_clean"].build(n, block, False)
        dense_bytes = total * total  # torch.bool: one byte per entry
        row: dict[str, Any] = {"seq_len": n, "attention_len": total, "dense_bytes": dense_bytes}
        try:
            t0 = time.perf_counter()
            bm = flex_block_mask(mod, total, total, device)
            row["flex_build_s"] = time.perf_counter() - t0
            row["flex_bytes"] = sum(t.numel() * t.element_size() for t in bm.as_tuple() if torch.is_tensor(t))
        except Exception as e:  # flex needs a recent torch; report instead of failing the whole benchmark
            row["flex_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return {"pattern": "block_causal_clean", "block": block, "device": device, "rows": rows,
            "machine": machine_info()}


def training_memory(model: str = "tiny:llama@256x4", lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192),
                    block: int = 64, impls: tuple[str, ...] = ("sdpa", "flex_attention"), batch: int = 1,
                    dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """Peak CUDA memory of one training forward + backward (``[xt ; x0]``, block-causal-clean) per attention path.

    Needs a CUDA GPU. Each (implementation, length) runs in a fresh model so the peaks do not mix; an out-of-memory
    is recorded as such. The dense SDPA mask is (2L)^2 per batch; flex builds a BlockMask from the same predicate.
    """
    if not torch.cuda.is_available():
        raise EdlmError("the training-memory benchmark needs a CUDA GPU; on CPU use edlm bench masks (mask bytes)")
    rows = []
    for impl in impls:
        for n in lengths:
            row: dict[str, Any] = {"attn_implementation": impl, "seq_len": n, "batch": batch}
            try:
                net, tok = resolve_model(model, dtype=dtype, attn_implementation=impl)
                dlm = DiffusionLM.from_ar(net.cuda(), tok, DiffusionConfig(block_size=block)).train()
                x0 = torch.randint(1, len(tok), (batch, n), device="cuda")
                noised = noise_samples(x0, dlm.config, dlm.mask_id, 0, list(range(batch)))
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                dlm(noised).loss.backward()
                torch.cuda.synchronize()
                row.update(seconds=time.perf_counter() - t0,
                           peak_mb=(torch.cuda.max_memory_allocated() - base) / 2**20)
            except torch.cuda.OutOfMemoryError:
                row["error"] = "out of memory"
            except Exception as e:  # e.g. flex unavailable in this torch build: report, keep measuring
                row["error"] = f"{type(e).__name__}: {e}"
            finally:
                dlm = net = None  # noqa: F841 (free before the next size)
                torch.cuda.empty_cache()
            rows.append(row)
    return {"model": model, "block": block, "dtype": str(dtype), "rows": rows, "machine": machine_info()}


def train_report(result: dict[str, Any]) -> str:
    """What ``edlm bench train`` prints: tokens/s and peak memory of each phase."""
    t = Table("<phase", "tokens/s", "peak MB")
    for name, key in (("AR fine-tune", "ar_finetune"), ("dLM convert", "dlm_convert"),
                      ("dLM + AR loss", "dlm_convert_joint")):
        if key in result:
            t.add(name, f"{result[key]['tokens_per_s']:.1f}", f"{result[key]['peak_mem_mb']:.0f}")
    joint = f"; dLM + AR loss step / dLM step: {result['joint_over_dlm_step_time']:.2f}" \
        if "joint_over_dlm_step_time" in result else ""
    return t.text() + f"\ndLM step time / AR step time: {result['dlm_over_ar_step_time']:.2f}{joint}"


def masks_report(result: dict[str, Any]) -> str:
    """What ``edlm bench masks`` prints: the mask's bytes, dense vs flex, and the training peaks when measured."""
    t = Table("seq_len", "dense MB", "flex MB", "flex build s")
    for row in result["rows"]:
        t.add(row["seq_len"], f"{row['dense_bytes'] / 2**20:.1f}",
              f"{row['flex_bytes'] / 2**20:.3f}" if "flex_bytes" in row else None,
              f"{row['flex_build_s']:.3f}" if "flex_build_s" in row else None)
    lines = [t.text()]
    if "training" in result:
        t = Table("<attention", "seq_len", "peak MB", "<error")
        for row in result["training"]["rows"]:
            t.add(row["attn_implementation"], row["seq_len"], f"{row.get('peak_mb', float('nan')):.1f}",
                  row.get("error", ""))
        lines += ["training forward + backward:", t.text()]
    return "\n".join(lines)
