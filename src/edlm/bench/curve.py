"""The verify-cost curve V(b): what one forward over ``b`` new columns costs on a KV cache, for every width b and
weight dtype, in units of the cheapest one-column (AR) step, against the host's floors measured in the same run.

Speculative and diffusion decoding trade one narrow forward for one wide forward that commits several tokens, so
their speed-up is (tokens per cycle) / V(b). Each row of :func:`verify_curve` carries its distance to its floor:
the weight bytes over the measured memory bandwidth (what a narrow step cannot beat) and the step's multiply-adds
over the measured GEMM rate of its dtype (what a wide step cannot beat). Widths and dtypes are interleaved over
the repeats, so a slow spell of the machine spreads over every cell instead of biasing one; each cell reports its
median and its spread (min, max).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from edlm.bench.timing import forward_step, median_seconds
from edlm.drafter import DraftContext
from edlm.engine import Linear, compile_model
from edlm.results import machine_info


def memory_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes per second a reduction over an ``mb`` MB fp32 tensor reads at the current thread count (median).

    Random contents: a freshly filled constant tensor measured several times faster than DRAM here."""
    x = torch.randn(mb * 1024 * 1024 // 4, generator=torch.Generator().manual_seed(0))
    return x.numel() * 4 / median_seconds(x.sum, repeats)


def gemm_rate(dtype: str, rows: int = 256, size: int = 1536, repeats: int = 5) -> float:
    """Multiply-adds x 2 per second (FLOP/s) of the engine's linear in ``dtype`` (:class:`edlm.engine.Linear`) on a
    (rows x size) @ (size x size) product: the arithmetic a wide step can reach at this thread count."""
    g = torch.Generator().manual_seed(0)
    lin = Linear(torch.randn(size, size, generator=g) / size ** 0.5, None, dtype)
    x = torch.randn(rows, size, generator=g).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    with torch.no_grad():
        return 2 * rows * size * size / median_seconds(lambda: lin(x), repeats)


def step_flops(source, width: int, cache_len: int) -> float:
    """FLOP of one forward of ``width`` columns on a ``cache_len`` cache of a Hugging Face causal LM: the weight
    products (2 per weight per column, LM head included) and attention (scores and values over the cache)."""
    cfg = source.config
    weights = sum(p.numel() for n, p in source.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if getattr(cfg, "tie_word_embeddings", False):
        weights += source.get_input_embeddings().weight.numel()
    attention = 4 * cfg.num_hidden_layers * cfg.hidden_size * (cache_len + width)
    return width * (2 * weights + attention)


def verify_curve(source, dtypes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4"), widths: tuple[int, ...] =
                 tuple(range(1, 17)), cache_len: int = 200, repeats: int = 7, eager: bool = True,
                 compile: bool = True, exact_widths: int = 0) -> dict[str, Any]:
    """V(b) of an fp32 Hugging Face causal LM ``source``: eager fp32 (when ``eager``) and the compiled engine at each
    dtype, every width, interleaved over ``repeats`` passes after a pass that compiles every shape.

    Returns a JSON-ready dict: ``rows`` (path, dtype, width, ms median/min/max, ``ar_steps`` = ms over the cheapest
    one-column ms, ``floor_ms`` and ``over_floor``), ``verify_ms`` (the cheapest forward per width over all paths),
    ``verify_ratio_8`` (the cheapest 8-column forward over the cheapest 1-column one), ``floors``
    (``memory_bandwidth_gb_s``, ``gemm_gflops`` per dtype), ``weight_bytes`` per dtype and ``machine`` (CPU flags
    included). The engine pads widths to its buckets (:func:`edlm.engine._bucket`), which the curve shows as steps,
    except widths up to ``exact_widths``.
    """
    bandwidth = memory_bandwidth()
    engines = {d: compile_model(source, d, compile=compile, exact_widths=exact_widths) for d in dtypes}
    peak = {d: gemm_rate(d) for d in dtypes}
    peak.setdefault("fp32", gemm_rate("fp32"))
    path = "compiled" if compile else "engine"
    models = ({("eager", "fp32"): source} if eager else {}) | {(path, d): e for d, e in engines.items()}
    steps = {key: forward_step(m, cache_len) for key, m in models.items()}
    cells = [(key, w) for key in models for w in widths]
    with torch.no_grad():
        for key, w in cells:  # compile every shape, warm every allocator
            steps[key](w)
            steps[key](w)
        times: dict[tuple, list[float]] = {cell: [] for cell in cells}
        for r in range(repeats):
            for key, w in cells[r % len(cells):] + cells[:r % len(cells)]:
                t0 = time.perf_counter()
                steps[key](w)
                times[key, w].append(time.perf_counter() - t0)
    weight_bytes = {d: e.weight_bytes() for d, e in engines.items()}
    weight_bytes.setdefault("fp32", compile_model(source, "fp32", compile=False).weight_bytes())
    rows = []
    for ((path, d), w), t in times.items():
        ms = 1e3 * statistics.median(t)
        floor = 1e3 * max(weight_bytes[d] / bandwidth, step_flops(source, w, cache_len) / peak[d])
        rows.append({"path": path, "dtype": d, "width": w, "ms": ms, "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                     "floor_ms": floor, "over_floor": ms / floor})
    one = min(r["ms"] for r in rows if r["width"] == 1)
    for r in rows:
        r["ar_steps"] = r["ms"] / one
    verify_ms = {w: min(r["ms"] for r in rows if r["width"] == w) for w in widths}
    return {"rows": rows, "verify_ms": verify_ms,
            "verify_ratio_8": verify_ms[8] / verify_ms[1] if 8 in verify_ms and 1 in verify_ms else None,
            "floors": {"memory_bandwidth_gb_s": bandwidth / 1e9, "gemm_gflops": {d: p / 1e9 for d, p in peak.items()}},
            "weight_bytes": weight_bytes, "cache_len": cache_len, "repeats": repeats, "exact_widths": exact_widths,
            "threads": torch.get_num_threads(), "machine": machine_info()}


def curve_report(c: dict[str, Any]) -> str:
    """The curve as text: ms per (path, dtype) and width, then V(b) of the cheapest forward per width."""
    widths = sorted({r["width"] for r in c["rows"]})
    lines = [f"forward ms on a {c['cache_len']}-token cache by new columns (median of {c['repeats']}, "
             f"{c['threads']} threads); floors: {c['floors']['memory_bandwidth_gb_s']:.1f} GB/s, GEMM "
             + ", ".join(f"{d} {g:.0f}" for d, g in c["floors"]["gemm_gflops"].items()) + " GFLOP/s",
             f"{'path':<9}{'dtype':<6}" + "".join(f"{w:>7}" for w in widths) + "   x floor (1 / 8)"]
    for path, d in dict.fromkeys((r["path"], r["dtype"]) for r in c["rows"]):
        cells = {r["width"]: r for r in c["rows"] if (r["path"], r["dtype"]) == (path, d)}
        floor = " / ".join(f"{cells[w]['over_floor']:.1f}" for w in (1, 8) if w in cells)
        lines.append(f"{path:<9}{d:<6}" + "".join(f"{cells[w]['ms']:7.1f}" for w in widths) + f"   {floor}")
    one = c["verify_ms"][widths[0]]
    lines.append(f"{'V(b)':<15}" + "".join(f"{c['verify_ms'][w] / one:7.2f}" for w in widths))
    if c["verify_ratio_8"] is not None:
        lines.append(f"cheapest 8-column forward / cheapest 1-column forward: {c['verify_ratio_8']:.2f}")
    return "\n".join(lines)


def cycle_costs(model, drafter, cache_len: int = 200, repeats: int = 5) -> list[float]:
    """Milliseconds of a drafted cycle that verifies ``k`` drafts, k = 0 .. block - 1: a forward of k + 1 columns
    of ``model`` on a ``cache_len`` cache (median of ``repeats``) plus one draft of ``drafter`` over as many
    context positions: the ``verify_costs`` of :class:`edlm.config.DecodeConfig`. Compiles the widths it times.
    A wider forward never costs less than a narrower one, so the medians are made non-decreasing (a running max):
    single medians right after compiling were noisy enough here to rank 8 columns below 5."""
    block = drafter.cfg.block_size
    step = forward_step(model, cache_len)
    draft_s = draft_seconds(drafter, cache_len, repeats)
    with torch.no_grad():
        ms = [1e3 * (median_seconds(lambda w=w: step(w), repeats) + draft_s) for w in range(1, block + 1)]
    return [max(ms[:k + 1]) for k in range(len(ms))]


def draft_seconds(drafter, cache_len: int = 200, repeats: int = 5) -> float:
    """Median seconds of one draft of ``drafter`` over ``cache_len`` context positions (random features)."""
    ctx = DraftContext(drafter, 1)
    g = torch.Generator().manual_seed(0)
    ctx.extend(0, torch.randn(cache_len, len(drafter.cfg.target_layer_ids), drafter.cfg.hidden_size, generator=g))
    with torch.no_grad():
        return median_seconds(lambda: ctx.draft([0], [0]), repeats)
