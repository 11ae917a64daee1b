"""Issue 38: the engine's width-free attention (multiply-and-sum reductions, used at int8 / int4) against the
matmul attention it replaced, in one process, widths and variants interleaved.

    python docs/roofline/attention_ab.py [threads] [out.json]

The embedded SmolLM2-135M-Instruct on the compiled int8 engine, a 200-token cache, forwards of 1..8 new columns;
median ms over 15 interleaved passes, after a pass that compiles every shape.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from edlm.bench.timing import forward_step
from edlm.checkpoints import resolve_model
from edlm.engine import Engine
from edlm.results import machine_info


def matmul_attention(engine: Engine) -> Engine:
    """``engine`` with the attention it had before issue 38 (two matmuls at every width)."""
    engine.width_free_up_to = 0
    return engine


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    source, _ = resolve_model("embedded", dtype=torch.float32)
    source.eval()
    engines = {"width-free (reductions)": Engine(source, "int8", exact_widths=8).eval(),
               "matmuls": matmul_attention(Engine(source, "int8", exact_widths=8).eval())}
    steps = {name: forward_step(e, 200) for name, e in engines.items()}
    cells = [(name, w) for name in steps for w in range(1, 9)]
    times = {cell: [] for cell in cells}
    with torch.no_grad():
        for name, w in cells:
            steps[name](w)
            steps[name](w)
        for r in range(15):
            for name, w in cells[r % len(cells):] + cells[:r % len(cells)]:
                t0 = time.perf_counter()
                steps[name](w)
                times[name, w].append(time.perf_counter() - t0)
    ms = {name: {w: 1e3 * statistics.median(times[name, w]) for w in range(1, 9)} for name in steps}
    for name, row in ms.items():
        print(f"{name:<26}" + "".join(f"{row[w]:7.1f}" for w in row))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump({"int8_forward_ms_by_width": ms, "cache_len": 200, "threads": threads,
                       "machine": machine_info()}, f, indent=1)


if __name__ == "__main__":
    main()
