"""V(b): the cost of one source forward over b new columns on a 200-token cache, per dtype and path, in units of the
cheapest one-column step; and the cost of one block-drafter draft. Reproduces docs/drafter.md's verify-cost table.

    python docs/drafter/verify_cost.py [--threads 2] [--out docs/drafter/verify_cost.json] [--drafter DIR]

Widths and dtypes are interleaved over the repeats (median and spread per cell). The engine pads a width up to its
bucket (1, 2, 4, 8, 16), so widths inside a bucket cost alike. Pause other jobs first (kill -STOP): a benchmark
beside a training run measures the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from edlm.checkpoints import resolve_model
from edlm.compat import cache_kwargs, new_cache
from edlm.drafter import DraftContext, Drafter, DrafterConfig
from edlm.engine import compile_model
from edlm.results import machine_info

CACHE = 200
WIDTHS = list(range(1, 17))


def step(model, width: int):
    """A callable: one forward of ``width`` columns after a CACHE-column cache, the cache cropped back after."""
    cache = new_cache(model, 1)
    with torch.no_grad():
        model(input_ids=torch.arange(100, 100 + CACHE)[None], use_cache=True, logits_to_keep=1,
              **cache_kwargs(model, cache))
    ids = torch.arange(300, 300 + width)[None]
    pos = torch.arange(CACHE, CACHE + width)[None]

    def run():
        with torch.no_grad():
            model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=width, **cache_kwargs(model, cache))
        cache.crop(CACHE)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtypes", default="fp32,bf16,int8,int4")
    ap.add_argument("--drafter", default=None, help="a drafter folder (default: a fresh one-layer drafter)")
    ap.add_argument("--out", default="docs/drafter/verify_cost.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source, _ = resolve_model("embedded", dtype=torch.float32)
    source.eval()
    calls = {("eager", "fp32", w): step(source, w) for w in WIDTHS}
    for dtype in args.dtypes.split(","):
        engine = compile_model(source, dtype)
        calls.update({("compiled", dtype, w): step(engine, w) for w in WIDTHS})
    if args.drafter:
        drafter = Drafter.load(args.drafter, source)
    else:
        drafter = Drafter(DrafterConfig.for_source(source, draft_vocab_size=8192), source).eval()
    ctx = DraftContext(drafter, 1)
    ctx.extend(0, torch.randn(CACHE, len(drafter.cfg.target_layer_ids), source.config.hidden_size))
    calls[("drafter", "fp32", drafter.cfg.block_size)] = lambda: ctx.draft([0], [5])
    for fn in calls.values():  # compile every shape, warm every allocator
        fn()
        fn()
    times: dict[tuple, list[float]] = {k: [] for k in calls}
    keys = list(calls)
    for r in range(args.repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
    rows = [{"path": p, "dtype": d, "width": w, "ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t),
             "max_ms": 1e3 * max(t)} for (p, d, w), t in times.items()]
    one = min(r["ms"] for r in rows if r["width"] == 1 and r["path"] != "drafter")
    for r in rows:
        r["ar_steps"] = r["ms"] / one
    verify_ms = {w: min(r["ms"] for r in rows if r["width"] == w and r["path"] != "drafter") for w in WIDTHS}
    out = {"cache": CACHE, "threads": args.threads, "repeats": args.repeats, "rows": rows,
           "verify_ms": verify_ms, "verify_ratio_8": verify_ms[8] / verify_ms[1], "machine": machine_info()}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{'path':<10}{'dtype':<6}" + "".join(f"{w:>7}" for w in WIDTHS))
    for (p, d) in dict.fromkeys((r["path"], r["dtype"]) for r in rows if r["path"] != "drafter"):
        cells = {r["width"]: r["ms"] for r in rows if (r["path"], r["dtype"]) == (p, d)}
        print(f"{p:<10}{d:<6}" + "".join(f"{cells[w]:7.1f}" for w in WIDTHS))
    d = next(r for r in rows if r["path"] == "drafter")
    print(f"drafter draft (block {d['width']}, {CACHE} context): {d['ms']:.1f} ms = {d['ar_steps']:.2f} AR steps")
    print(f"cheapest verify over cheapest AR step at 8 columns: {out['verify_ratio_8']:.2f}")


if __name__ == "__main__":
    main()
