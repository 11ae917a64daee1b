"""Issue 38, item 2: which GEMM kernel is fastest per width on this host, over one SmolLM2-135M forward's weights.

Every candidate runs the 121 products of one forward (30 layers x q/k/v, o, gate/up, down, and the LM head) on
its own copy of random weights of SmolLM2-135M's shapes (as cold as a model's layers: ~135-540 MB per kernel),
at m = 1, 2, 4, 8 and 16 activation rows. Kernels and widths take turns over the repeats; each cell is the
median. Each kernel's output is checked against fp32 on one product first (relative error printed).

    python docs/roofline/kernels_38.py [threads] [out.json] [--autotune]

Candidates (the issue's list): fp32 and bf16 ``F.linear`` (MKL / oneDNN as PyTorch dispatches them); oneDNN's packed
fp32 / bf16 linear (``torch.ops.mkldnn._linear_pointwise`` on weights reordered once); fbgemm's dynamic int8
(edlm's int8: per-token scales, guard features); oneDNN's static int8 (``torch.ops.onednn.qlinear_pointwise``:
rows normalised by their maximum are quantized with one fixed scale, so no range is computed per call); aten's
int8 and int4 weight-only kernels (torchao's CPU layouts). ``--autotune`` instead compares inductor's
max-autotune GEMM with ``F.linear`` in fp32 (:func:`autotune_probe`) and writes that to ``out.json``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from edlm.engine import Linear
from edlm.results import machine_info

D, KV, FF, V, LAYERS = 576, 192, 1536, 49152, 30
SHAPES = [(D + 2 * KV, D), (D, D), (2 * FF, D), (D, FF)] * LAYERS + [(V, D)]
WIDTHS = (1, 2, 4, 8, 16)


def engine_linear(dtype):
    def make(w):
        return Linear(w, None, dtype)
    return make


def dense(dtype):
    def make(w):
        w = w.to(dtype).contiguous()
        return lambda x: F.linear(x.to(dtype), w)
    return make


def mkldnn_packed(dtype):
    def make(w):
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), None)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
    return make


VNNI = bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(machine_info()["cpu_flags"]))
LEVELS = 127 if VNNI else 63
"""Activation levels each side of zero for oneDNN's static int8: without VNNI the u8 x s8 products are summed in
pairs into saturating int16 (``vpmaddubsw``), so activations keep 7 bits (as fbgemm's ``reduce_range`` does);
with 8 bits here the products saturated (relative error 0.022 against the exact quantized product, 2.6e-7 at 7)."""


def onednn_static_int8(w):
    """Per-channel int8 weights packed once for oneDNN; activations: each row divided by its absolute maximum, then
    quantized with the fixed scale 1 / LEVELS (symmetric, as uint8 with zero point LEVELS + 1)."""
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    packed = torch.ops.onednn.qlinear_prepack(q, None)
    zeros = torch.zeros(w.shape[0], dtype=torch.int64)

    def run(x):
        row = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        qx = (x / row * LEVELS).round().add(LEVELS + 1).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(qx, 1 / LEVELS, LEVELS + 1, packed, scale, zeros, None, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y * row
    return run


def int8_weight_only(w):
    scale = w.abs().amax(1).clamp_min(1e-8) / 127
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    scale = scale.bfloat16()
    return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale)


def autotune_probe(widths=(1, 8), repeats=7) -> dict:
    """Inductor's max-autotune GEMM against ``F.linear``, fp32, per distinct SmolLM2 shape (one weight each, so
    warmer than a forward's: a comparison of kernels, not a forward's time), ms per forward (each shape's time times
    its count in a forward). Weights are graph inputs, so each (shape, width) compiles once."""
    torch._dynamo.config.recompile_limit = 64  # 5 shapes x the widths: past the default 8 it would run eagerly
    tuned = torch.compile(F.linear, mode="max-autotune", dynamic=False)
    g = torch.Generator().manual_seed(0)
    counts = {shape: SHAPES.count(shape) for shape in dict.fromkeys(SHAPES)}
    out = {"F.linear": {}, "max-autotune": {}}
    with torch.no_grad():
        for m in widths:
            for name, fn in (("F.linear", F.linear), ("max-autotune", tuned)):
                total = 0.0
                for (n, k), count in counts.items():
                    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
                    fn(x, w)
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        fn(x, w)
                        times.append(time.perf_counter() - t0)
                    total += count * statistics.median(times)
                out[name][m] = 1e3 * total
    return out


KERNELS = {
    "fp32 F.linear": dense(torch.float32),
    "fp32 oneDNN packed": mkldnn_packed(torch.float32),
    "bf16 F.linear": dense(torch.bfloat16),
    "bf16 oneDNN packed": mkldnn_packed(torch.bfloat16),
    "int8 fbgemm dynamic (edlm)": engine_linear("int8"),
    "int8 oneDNN static": onednn_static_int8,
    "int8 weight-only (aten)": int8_weight_only,
    "int4 weight-only (aten, edlm)": engine_linear("int4"),
}


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    threads = int(args[0]) if args else 2
    out = args[1] if len(args) > 1 else None
    torch.set_num_threads(threads)
    kernels = dict(KERNELS)
    if "--autotune" in sys.argv:
        tuned = autotune_probe()
        print("fp32, ms per forward's GEMMs (warm weights): " + "; ".join(
            f"{name} " + ", ".join(f"{m} col {ms:.1f}" for m, ms in row.items()) for name, row in tuned.items()))
        if out:
            with open(out, "w") as f:
                json.dump({"autotune_fp32_ms": tuned, "threads": threads, "machine": machine_info()}, f, indent=1)
        return
    g = torch.Generator().manual_seed(0)
    check_w = torch.randn(2 * FF, D, generator=g) / D ** 0.5
    check_x = torch.randn(8, D, generator=g)
    ref = F.linear(check_x, check_w)
    error, built = {}, {}
    with torch.no_grad():
        for name, make in kernels.items():
            try:
                y = make(check_w)(check_x).float()
            except (RuntimeError, NotImplementedError) as e:  # a kernel this build or CPU lacks
                error[name] = f"unavailable: {str(e).splitlines()[0][:160]}"
                print(f"{name}: {error[name]}", flush=True)
                continue
            error[name] = float((y - ref).norm() / ref.norm())
            built[name] = [make(torch.randn(n, k, generator=g) / k ** 0.5) for n, k in SHAPES]
            print(f"built {name}: relative error {error[name]:.4f}", flush=True)
        xs = {m: {k: torch.randn(m, k, generator=g) for k in (D, FF)} for m in WIDTHS}

        def forward(name, m):
            for f, (_, k) in zip(built[name], SHAPES):
                f(xs[m][k])

        cells = [(name, m) for name in built for m in WIDTHS]
        for cell in cells:  # compile, pack, warm
            forward(*cell)
        times = {cell: [] for cell in cells}
        for r in range(7):
            for cell in cells[r % len(cells):] + cells[:r % len(cells)]:
                t0 = time.perf_counter()
                forward(*cell)
                times[cell].append(time.perf_counter() - t0)
    ms = {name: {m: 1e3 * statistics.median(times[name, m]) for m in WIDTHS} for name in built}
    print(f"{'kernel':<32}" + "".join(f"{m:>8}" for m in WIDTHS) + "   8 / 1")
    for name, row in ms.items():
        print(f"{name:<32}" + "".join(f"{row[m]:8.1f}" for m in WIDTHS) + f"   {row[8] / row[1]:.2f}")
    best = {m: min(ms, key=lambda n: ms[n][m]) for m in WIDTHS}
    print("fastest per width: " + ", ".join(f"{m}: {n}" for m, n in best.items()))
    if out:
        with open(out, "w") as f:
            json.dump({"ms_per_forward_gemms": ms, "relative_error": error, "fastest": best, "threads": threads,
                       "machine": machine_info(), "shapes": "SmolLM2-135M: 30 x (960x576, 576x576, 3072x576, "
                                                          "576x1536) + 49152x576"}, f, indent=1)


if __name__ == "__main__":
    main()
