"""``edlm bench decode --compile``: batch-1 AR on every backend and dtype in one run (PyTorch eager, the compiled
engine, llama.cpp at Q8_0 and at the GGUF's own quantization), each against the bandwidth bound (weight bytes over
measured memory bandwidth); the engine's step cost by forward width; and the dLM's forced-TPF decoding on the
engine, against the best AR.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from edlm.assets import cache_dir
from edlm.bench.curve import curve_report, memory_bandwidth, verify_curve
from edlm.bench.llamacpp import llamacpp_ar, q8_0_gguf, skip_reason, source_gguf
from edlm.bench.timing import forward_step, forward_times
from edlm.config import DecodeConfig
from edlm.engine import ENGINE_DTYPES, compile_dlm, compile_model
from edlm.harness import ar_system, dlm_system, run_interleaved
from edlm.loading import load, load_ar
from edlm.model import source_spec
from edlm.quant import cast_model
from edlm.results import machine_info, write_json
from edlm.table import Table

HEADLINE = ("ar_best_tokens_per_s", "ar_best", "llamacpp_tokens_per_s", "bandwidth_bound_tokens_per_s")
"""The fields ``edlm bench decode --compile`` also copies to its JSON's top level."""


def _source(model_dir: str | os.PathLike, ar_source: str | None):
    """The fp32 AR model the engine benchmarks time: ``"auto"`` the source named in the folder's
    ``train_config.yaml``, a model spec, or None: the converted weights decoded causally, as in edlm bench decode
    (``load_ar(None)`` would be the embedded model)."""
    spec = source_spec(model_dir) if ar_source == "auto" else ar_source
    return load(model_dir, "fp32").model if spec is None else load_ar(spec, "fp32")[0]


def _ar_row(model, ids, max_new_tokens: int, repeats: int) -> dict[str, Any]:
    """Greedy AR of every prompt at batch 1, EOS ignored, through the comparison harness after a whole untimed
    pass (which compiles): the median run's summary and the wall time with warm-up."""
    cfg = DecodeConfig(max_new_tokens=max_new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    run = run_interleaved({"ar": ar_system(model, cfg, None)}, ids, 1, repeats=repeats, warmup="pass")["ar"]
    return {**run.summary(), "wall_s": time.perf_counter() - t0}


def engine_benchmark(model_dir: str | os.PathLike, ids: list[list[int]], max_new_tokens: int,
                     dtypes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4"),
                     eager_dtypes: tuple[str, ...] = ("fp32", "int8"), repeats: int = 1, block: int = 8,
                     tpfs: tuple[int, ...] = (1, 4), ar_source: str | None = "auto",
                     gguf: str | os.PathLike | None = None, llama_cpp: bool = True,
                     compile: bool = True, curve_repeats: int = 5, exact_widths: int | None = None) -> dict[str, Any]:
    """Batch-1 AR tokens/s of the source on each backend and dtype, EOS ignored (every run makes
    ``max_new_tokens`` per prompt), and the dLM at forced tokens per forward on the engine, at the dtype whose
    block-wide forward is fastest (the diffusion step's width).

    Returns a JSON-ready dict: ``ar`` (one row per backend and dtype: tokens/s, weight bytes, bandwidth bound,
    compile seconds for the engine), ``ar_best_tokens_per_s`` and ``ar_best`` (backend, dtype),
    ``llamacpp_tokens_per_s`` (Q8_0, None when skipped), ``bandwidth_bound_tokens_per_s`` (of the fastest row's
    weights), ``memory_bandwidth_gb_s``, ``forward_ms`` (engine, by dtype and width 1 / block / 2 x block on a
    typical cache), ``curve`` (V(b) for every width 1..16 per dtype with the host's floors:
    :func:`edlm.bench.curve.verify_curve`, ``curve_repeats`` interleaved passes), ``verify_ms`` and
    ``verify_ratio_8`` (the curve's cheapest forward per width, and at 8 over 1 column), ``dlm`` (forced-TPF rows on
    the engine), and ``targets`` (the engine issue's ratios).
    ``ar_source``: ``"auto"`` (the source named in the folder's ``train_config.yaml``), a model spec, or None (the
    converted weights decoded causally). ``compile=False`` runs the engine's function eagerly (backend ``engine``).
    ``exact_widths``: the curve's engines run widths up to this many columns unpadded (default: the block, as the
    drafted decoders run their verifies).
    """
    bandwidth = memory_bandwidth()
    source = _source(model_dir, ar_source)
    cache_len = sorted(len(i) for i in ids)[len(ids) // 2] + max_new_tokens // 2
    rows: list[dict[str, Any]] = []
    for d in eager_dtypes:
        model = source if d == "fp32" else cast_model(source, d, copy=True)
        rows.append({"backend": "eager", "dtype": d, **_ar_row(model, ids, max_new_tokens, repeats)})
    forward_ms: dict[str, dict[str, float]] = {}
    backend = "compiled" if compile else "engine"
    for d in dtypes:  # one engine at a time: each holds its own copy of the weights
        engine = compile_model(source, d, compile=compile)
        row = _ar_row(engine, ids, max_new_tokens, repeats)
        weight_bytes = engine.weight_bytes()
        widths = (1, block, 2 * block)
        t0 = time.perf_counter()
        fwd = forward_times(engine, cache_len, widths, repeats=5)
        forward_ms[d] = {str(w): 1e3 * t for w, t in fwd.items()}
        rows.append({"backend": backend, "dtype": d, **row, "weight_bytes": weight_bytes,
                     "bandwidth_bound_tokens_per_s": bandwidth / weight_bytes,
                     "compile_s": sum(engine.compile_s.values()), "forward_bench_s": time.perf_counter() - t0})
    exact = block if exact_widths is None else exact_widths
    curve = verify_curve(source, dtypes, cache_len=cache_len, repeats=curve_repeats, compile=compile,
                         exact_widths=exact)
    lc = llamacpp_rows(model_dir, ids, max_new_tokens, repeats, gguf) if llama_cpp else {"skipped": "--no-llama-cpp"}
    if "rows" in lc:
        for r in lc["rows"]:
            r["bandwidth_bound_tokens_per_s"] = bandwidth / r["file_bytes"]
        rows += lc["rows"]
    best = max(rows, key=lambda r: r["tokens_per_s"] if r["backend"] != "llama.cpp" else -1.0)
    engine_best = max((r for r in rows if r["backend"] == backend), key=lambda r: r["tokens_per_s"])
    d = min(forward_ms, key=lambda name: forward_ms[name][str(block)])  # the cheapest block-wide step
    dlm = compile_dlm(load(model_dir, "fp32"), d, compile=compile)
    systems = {k: dlm_system(dlm, DecodeConfig(max_new_tokens=max_new_tokens, block_size=block, policy="fixed",
                                               tokens_per_step=k, ignore_eos=True)) for k in tpfs}
    t0 = time.perf_counter()  # the forced TPFs interleaved, after a pass that compiles
    got = run_interleaved(systems, ids, 1, repeats=repeats, warmup="pass")
    wall = time.perf_counter() - t0
    dlm_rows = [{"dtype": d, "tpf_forced": k, **run.summary(), "wall_s": wall,
                 "speedup_vs_best_ar": run.tokens_per_s / best["tokens_per_s"]} for k, run in got.items()]
    q8 = next((r["tokens_per_s"] for r in rows if r["backend"] == "llama.cpp" and r["quant"] == "Q8_0"), None)
    fwd = forward_ms[d]  # the width-8 step against the AR step at the same (the dLM's) dtype
    tpf4 = next((r for r in dlm_rows if r["tpf_forced"] == 4), None)
    return {
        "ar": rows, "ar_best_tokens_per_s": best["tokens_per_s"], "ar_best": [best["backend"], best["dtype"]],
        "llamacpp_tokens_per_s": q8, "llamacpp": {k: v for k, v in lc.items() if k != "rows"},
        "bandwidth_bound_tokens_per_s": bandwidth / engine_best["weight_bytes"],
        "memory_bandwidth_gb_s": bandwidth / 1e9, "forward_ms": forward_ms, "forward_cache_len": cache_len,
        "curve": curve, "verify_ms": curve["verify_ms"], "verify_ratio_8": curve["verify_ratio_8"],
        "dlm": dlm_rows, "dlm_engine_compile_s": sum(dlm.model.compile_s.values()),
        "targets": {
            "best_ar_over_llamacpp_q8": None if q8 is None else best["tokens_per_s"] / q8,
            "width8_over_ar_step": fwd[str(block)] / fwd["1"], "verify_ratio_8": curve["verify_ratio_8"],
            "tpf4_over_best_ar": None if tpf4 is None else tpf4["speedup_vs_best_ar"], **cpu_class_targets(curve)},
        "settings": {"block": block, "tpfs": list(tpfs), "dtypes": list(dtypes), "eager_dtypes": list(eager_dtypes),
                     "max_new_tokens": max_new_tokens, "prompts": len(ids), "repeats": repeats,
                     "threads": torch.get_num_threads()},
    }


WIDE_ARITHMETIC = ("avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
"""CPU flags of the class whose wide steps the engine issue holds to V(8) <= 1.5 (native bf16 or int8 dot products);
other x86 CPUs (AVX2) are held to 1.8."""


def cpu_class_targets(curve: dict[str, Any]) -> dict[str, Any]:
    """The engine issue's V(8) target for this host's class (from ``curve["machine"]["cpu_flags"]``) and whether the
    curve's cheapest 8-column forward over its cheapest 1-column one meets it."""
    flags = set(curve["machine"].get("cpu_flags") or ())
    wide = sorted(flags & set(WIDE_ARITHMETIC))
    target = 1.5 if wide else 1.8
    ratio = curve["verify_ratio_8"]
    return {"cpu_class": "avx512-bf16/vnni or amx" if wide else "avx2", "verify_ratio_8_target": target,
            "verify_ratio_8_met": None if ratio is None else ratio <= target}


def llamacpp_rows(model_dir, ids: list[list[int]], max_new_tokens: int, repeats: int,
                  gguf: str | os.PathLike | None = None) -> dict[str, Any]:
    """llama.cpp's greedy AR at batch 1 on the source's GGUF as shipped and requantized to Q8_0 (int8's bytes per
    weight); ``{"skipped": reason}`` when it cannot run here."""
    path = source_gguf(model_dir, gguf)
    reason = skip_reason(path)
    if reason is not None:
        return {"skipped": reason}
    rows = []
    for quant, file in (("default", path), ("Q8_0", q8_0_gguf(path))):
        run = llamacpp_ar(file, ids, max_new_tokens, threads=torch.get_num_threads(), repeats=repeats)
        run.pop("sequences")
        rows.append({"backend": "llama.cpp", "dtype": quant if quant == "Q8_0" else Path(file).stem.split(".")[-1],
                     "quant": quant, "tokens_per_s": run["tokens_per_s"], "latency_s": run["seconds"],
                     "tokens": run["tokens"], "file_bytes": Path(file).stat().st_size, "gguf": str(file),
                     "llama_cpp": run["llama_cpp"]})
    return {"rows": rows}


# Op categories of a forward's profile (torch.profiler event names), first match wins: a substring of the name, or
# for the bookkeeping ops the exact op name after "aten::".
_CATEGORIES = (
    ("attention", ("scaled_dot_product", "softmax", "bmm")),
    ("gemm", ("mm", "linear", "matmul", "_weight_int", "quantized::", "edlm::int8", "mkl")),
    ("compiled kernels", ("CompiledFxGraph", "Torch-Compiled Region")),
    ("compiler runtime", ("TorchDynamo", "AOTDispatcher", "Pregraph", "Postgraph")),
)
_BOOKKEEPING = {"empty", "empty_like", "empty_strided", "view", "transpose", "as_strided", "expand", "reshape",
                "slice", "select", "unsqueeze", "squeeze", "contiguous", "detach", "alias", "t", "permute",
                "_to_copy", "to", "copy_", "clone", "arange", "index_copy_", "fill_", "zero_", "resize_",
                "_unsafe_view", "lift_fresh"}


def _category(name: str) -> str:
    for category, keys in _CATEGORIES:
        if any(k in name for k in keys):
            return category
    if name.split("::")[-1] in _BOOKKEEPING:
        return "tensor bookkeeping"
    return "other ops (norms, rope, activations)"


@torch.no_grad()
def profile_forward(model, cache_len: int, width: int, repeats: int = 5) -> dict[str, Any]:
    """Where a forward of ``width`` new columns on a ``cache_len``-token cache spends its time: wall ms (median,
    unprofiled), then ms per forward by op category from ``torch.profiler`` (op self times), and the rest, wall
    minus every op's self time: Python, module calls and dispatch outside any op."""
    wall = forward_times(model, cache_len, (width,), repeats=repeats)[width]
    step = forward_step(model, cache_len)
    step(width)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step(width)
    ms: dict[str, float] = {}
    for event in prof.key_averages():
        category = _category(event.key)
        ms[category] = ms.get(category, 0.0) + event.self_cpu_time_total / 1e3 / repeats
    profiled = sum(ms.values())
    return {"wall_ms": 1e3 * wall, "profiled_ms": profiled, "by_category_ms": dict(sorted(ms.items())),
            "outside_ops_ms": max(0.0, 1e3 * wall - profiled)}


def profile_engine(model_dir: str | os.PathLike, dtypes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4"),
                   eager_dtypes: tuple[str, ...] = ("fp32", "bf16", "int8"), widths: tuple[int, ...] = (1, 8, 16),
                   cache_len: int = 100, ar_source: str | None = "auto", compile: bool = True) -> dict[str, Any]:
    """:func:`profile_forward` of the source's forward on the eager Hugging Face path and on the compiled engine,
    per dtype and width: ``{"eager": {dtype: {width: ...}}, "compiled": {...}, "settings": ...}``."""
    source = _source(model_dir, ar_source)
    engine_path = "compiled" if compile else "engine"
    out: dict[str, Any] = {"eager": {}, engine_path: {}}
    for d in eager_dtypes:
        model = source if d == "fp32" else cast_model(source, d, copy=True)
        out["eager"][d] = {str(w): profile_forward(model, cache_len, w) for w in widths}
    for d in dtypes:
        engine = compile_model(source, d, compile=compile)
        out[engine_path][d] = {str(w): profile_forward(engine, cache_len, w) for w in widths}
    out["settings"] = {"cache_len": cache_len, "widths": list(widths), "threads": torch.get_num_threads(),
                       "model": str(model_dir)}
    return out


def _remembered(identity: list, width: int, compile: bool, candidates: tuple[str, ...], build) -> tuple[str, dict]:
    """The candidate dtype whose forward of ``width`` new columns is fastest, measured with ``build(dtype)`` (a
    model) once per machine and ``identity`` (what names the weights) and remembered in
    ``<edlm cache>/dtype-choices.json``."""
    machine = machine_info()
    key = hashlib.sha256(json.dumps([machine["cpu"], machine["cpu_flags"], machine["torch"], torch.get_num_threads(),
                                     *identity, compile, width, list(candidates)]).encode()).hexdigest()[:16]
    path = cache_dir() / "dtype-choices.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]["dtype"], {**known[key], "cached": True}
    times = {}
    for d in candidates:
        model, token = build(d)
        times[d] = 1e3 * forward_times(model, 128, (width,), repeats=5, token=token)[width]
    best = min(times, key=times.get)
    record = {"dtype": best, "forward_ms": times, "width": width, "compile": compile, "model": str(identity[0])}
    known[key] = record
    write_json(known, path)
    return best, {**record, "cached": False}


def choose_dtype(model_dir: str | os.PathLike, width: int, compile: bool = False,
                 candidates: tuple[str, ...] | None = None) -> tuple[str, dict[str, Any]]:
    """``--dtype auto`` for a converted model: the weight dtype whose forward of ``width`` new columns (1 for AR, the
    block for diffusion and speculative steps) is fastest here, measured once per machine, model folder, thread
    count, path and width and remembered in ``<edlm cache>/dtype-choices.json``. Returns (dtype, the record: times
    per dtype, whether it came from the cache)."""
    candidates = candidates or (("fp32", "bf16", "int8", "int4") if compile else ("fp32", "bf16", "int8"))
    folder = Path(model_dir).resolve()
    stamp = max((f.stat().st_mtime for f in folder.glob("*.safetensors")), default=0.0)

    def build(d):
        dlm = load(folder, d, compile=compile)
        return dlm.model, dlm.mask_id

    return _remembered([str(folder), stamp], width, compile, candidates, build)


def choose_source_dtype(source, fingerprint: str, width: int, candidates: tuple[str, ...] = ENGINE_DTYPES,
                        exact_widths: int = 0) -> tuple[str, dict[str, Any]]:
    """``--dtype auto`` for an AR source on the compiled engine (``--drafter``): the engine dtype whose forward of
    ``width`` columns is fastest here (1: the AR step; the drafter's block: its verify), remembered per machine and
    source weights (``fingerprint``, :func:`edlm.drafter.fingerprint`) as :func:`choose_dtype` does."""
    def build(d):
        return compile_model(source, d, exact_widths=exact_widths), 0

    return _remembered([f"source {fingerprint}"], width, True, tuple(candidates), build)


def engine_report(e: dict[str, Any]) -> str:
    """What ``edlm bench engine`` prints of :func:`engine_benchmark`'s result."""
    s, t = e["settings"], e["targets"]
    rows = Table("<backend", "<dtype", "tokens/s", "bw bound", "compile s")
    for r in e["ar"]:
        bound, compiled = r.get("bandwidth_bound_tokens_per_s"), r.get("compile_s")
        rows.add(r["backend"], r["dtype"], f"{r['tokens_per_s']:.1f}", bound and f"{bound:.0f}",
                 compiled and f"{compiled:.0f}")
    lines = [f"batch-1 AR, {s['max_new_tokens']} tokens x {s['prompts']} prompts, {s['threads']} threads; memory "
             f"bandwidth {e['memory_bandwidth_gb_s']:.1f} GB/s", rows.text()]
    if "skipped" in e["llamacpp"]:
        lines.append(e["llamacpp"]["skipped"])
    lines.append(f"compiled forward ms, {e['forward_cache_len']}-token cache, by new columns:")
    for d, f in e["forward_ms"].items():
        lines.append(f"  {d:<5} " + "  ".join(f"{w:>2}: {ms:6.1f}" for w, ms in f.items()))
    lines.append(curve_report(e["curve"]))
    for r in e["dlm"]:
        lines.append(f"dLM on the engine ({r['dtype']}), forced TPF {r['tpf_forced']}: {r['tokens_per_s']:.1f} "
                     f"tokens/s, {r['tokens_per_forward']:.2f} tokens/forward, {r['speedup_vs_best_ar']:.2f}x the "
                     "best AR")
    q8 = t["best_ar_over_llamacpp_q8"]

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    if t.get("verify_ratio_8") is not None:
        lines.append(f"V(8) = {t['verify_ratio_8']:.2f} of the cheapest AR step; target for this CPU class "
                     f"({t['cpu_class']}) <= {t['verify_ratio_8_target']}: "
                     f"{'met' if t['verify_ratio_8_met'] else 'missed'}")
    lines.append(f"best AR: {e['ar_best'][0]} {e['ar_best'][1]}, {e['ar_best_tokens_per_s']:.1f} tokens/s; "
                 f"llama.cpp Q8_0 / best AR {num(None if q8 is None else 1 / q8)}; width-8 step / AR step "
                 f"{num(t['width8_over_ar_step'])}; forced TPF 4 / best AR {num(t['tpf4_over_best_ar'])}")
    return "\n".join(lines)


def profile_report(p: dict[str, Any]) -> str:
    """What ``edlm bench engine --profile`` prints of :func:`profile_engine`'s result: ms per forward by category."""
    paths = [(path, d, w, r) for path in ("eager", "compiled", "engine") for d, by_width in p.get(path, {}).items()
             for w, r in by_width.items()]
    cats = sorted({c for *_, r in paths for c in r["by_category_ms"]})
    short = {c: c.split(" ")[0][:9] for c in cats}
    t = Table("<path", "<dtype", "width", "wall", *(short[c] for c in cats), "outside")
    for path, d, w, r in paths:
        t.add(path, d, w, f"{r['wall_ms']:.1f}", *(f"{r['by_category_ms'].get(c, 0.0):.1f}" for c in cats),
              f"{r['outside_ops_ms']:.1f}")
    s = p["settings"]
    return "\n".join([f"ms per forward on a {s['cache_len']}-token cache ({s['threads']} threads)", t.text(),
                      "categories: " + "; ".join(f"{short[c]} = {c}" for c in cats)
                      + "; outside = wall - profiled ops"])
