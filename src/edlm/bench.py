"""Benchmarks that write JSON: settings, machine and the baseline measured in the same process."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from edlm.config import TrainConfig, to_dict


def machine_info() -> dict[str, Any]:
    """CPU model and flags that decide kernel speed, thread count, torch version, GPU if any."""
    cpu, flags = platform.processor() or "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
                flags = sorted(f for f in wanted if f in have)
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_throughput(cfg: TrainConfig, steps: int = 5, warmup: int = 2) -> dict[str, Any]:
    """Tokens/s of a conversion step vs a plain AR fine-tuning step of the same model, batch and length.

    Both use AdamW on the same trainable parameters and the same packed batches. The AR phase runs first, so the
    process's peak RSS after each phase shows the extra memory of the dLM step (RSS peaks never go down). On CUDA,
    peak allocated memory is reset and read per phase instead.
    """
    from edlm.assets import resolve_model
    from edlm.data import build_data
    from edlm.model import DiffusionLM
    from edlm.noising import noise_samples

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = resolve_model(cfg.model, dtype=torch.float32, attn_implementation="sdpa", seed=cfg.seed)
    dlm = DiffusionLM.from_ar(model, tokenizer, cfg.diffusion).to(device)
    data, _ = build_data(cfg.data, tokenizer)
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
        out = {"step_s_median": step_s, "tokens_per_s": mb * cfg.data.seq_len / step_s}
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else _peak_rss_mb()
        return out

    dlm.train()
    ar = run_phase(lambda x0, i: dlm.model(input_ids=x0, labels=x0).loss)
    diff = run_phase(lambda x0, i: dlm.loss(noise_samples(x0, dlm.config, dlm.mask_id, cfg.seed,
                                                          list(range(i * mb, (i + 1) * mb)))).loss)
    return {
        "ar_finetune": ar,
        "dlm_convert": diff,
        "dlm_over_ar_step_time": diff["step_s_median"] / ar["step_s_median"],
        "settings": {**to_dict(cfg), "steps": steps, "warmup": warmup, "device": device},
        "machine": machine_info(),
        "memory_note": "CPU: process peak RSS after each phase (AR phase ran first)" if device == "cpu"
        else "CUDA: peak allocated per phase",
    }


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
