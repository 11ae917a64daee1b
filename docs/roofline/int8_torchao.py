"""edlm's int8 (fbgemm dynamic, torch.ao) against torchao's CPU int8 configs (docs/roofline.md, section 1.1, issue 36).

Usage: python docs/roofline/int8_torchao.py [THREADS] [JSON]   (needs pip install torchao; default 2 threads)

The embedded SmolLM2-135M-Instruct in one process, each path a copy of the same fp32 weights:
- fp32, for scale;
- edlm int8 (``edlm.quant.cast_model(m, "int8")``: fbgemm's dynamic int8 GEMM, per-channel weights, per-token
  activation scales);
- torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 x int8, per-token activation scales);
- torchao ``Int8WeightOnlyConfig`` on fp32 and on bf16 weights (aten's int8 weight-only kernel is fast only with
  bf16 activations).
Minimum and median ms (of 9, after one untimed call; the paths take turns, so a slow spell of the machine costs each
alike) of a whole forward of 1 (the AR step), 8 and 16 new tokens on a 100-token KV cache, every logit computed
(``edlm.bench.timing.forward_step``), and of one pass over the model's 211 Linear layers alone on random activations
of those widths; top-1 agreement with fp32's next-token predictions on 256 tokens of the bundled sonnets.
"""

import copy
import json
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial

import torch
import torchao
from torch import nn
from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

from edlm.assets import ASSETS_DIR
from edlm.bench.timing import forward_step
from edlm.checkpoints import resolve_model
from edlm.quant import cast_model
from edlm.results import machine_info

WIDTHS = (1, 8, 16)
CACHE = 100


def variants(base: nn.Module):
    yield "fp32", base
    yield "edlm int8 (fbgemm dynamic)", cast_model(base, "int8", copy=True)
    for name, cfg, dtype in (("torchao int8 dyn-act int8-weight", Int8DynamicActivationInt8WeightConfig(), None),
                             ("torchao int8 weight-only", Int8WeightOnlyConfig(), None),
                             ("torchao int8 weight-only, bf16", Int8WeightOnlyConfig(), torch.bfloat16)):
        m = copy.deepcopy(base)
        if dtype is not None:
            m = m.to(dtype)
        quantize_(m, cfg)
        yield name, m


def interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int = 9) -> dict[str, dict[str, float]]:
    """{"min", "median"} ms of each call; the calls take turns (first in a rotating order) so a slow spell of the
    machine costs each alike; one untimed call of each first. On a shared machine the minimum is the number to read:
    a call that another process slowed down only ever takes longer."""
    for fn in calls.values():
        fn()
    names, times = list(calls), {n: [] for n in calls}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            calls[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: {"min": min(t) * 1e3, "median": sorted(t)[repeats // 2] * 1e3} for n, t in times.items()}


def linears(model: nn.Module, names: list[str], width: int) -> Callable[[], object]:
    """One pass over every Linear of ``model`` (by the fp32 model's names) on random (1, width, in) inputs."""
    modules = dict(model.named_modules())
    dtype = model.get_input_embeddings().weight.dtype
    g = torch.Generator().manual_seed(0)
    calls = [(modules[n], torch.randn(1, width, modules[n].in_features, generator=g).to(dtype)) for n in names]
    return lambda: [m(x) for m, x in calls]


@torch.no_grad()
def top1(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Argmax of the logits at every position of ``ids`` (1, T) in one forward: (1, T)."""
    return model(input_ids=ids).logits.argmax(-1)


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")  # torch.ao's deprecation and torchao's import notices: not what is measured
    base, tok = resolve_model(None)
    lines = (ASSETS_DIR / "tiny_corpus.jsonl").read_text().splitlines()[:3]
    text = " ".join(json.loads(line)["text"] for line in lines)
    ids = tok(text, return_tensors="pt").input_ids[:, :256]  # three sonnets: real text, next-token agreement
    base.eval()
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    models = dict(variants(base))
    for m in models.values():
        m.eval()
    reference = top1(base, ids)
    rows = {name: {"model_ms": {}, "linears_ms": {},
                   "top1_agreement": (top1(m, ids) == reference).float().mean().item()} for name, m in models.items()}
    with torch.no_grad():
        for w in WIDTHS:
            steps = {name: partial(forward_step(m, CACHE), w) for name, m in models.items()}
            for name, ms in interleaved_ms(steps).items():
                rows[name]["model_ms"][w] = ms
            for name, ms in interleaved_ms({name: linears(m, names, w) for name, m in models.items()}).items():
                rows[name]["linears_ms"][w] = ms
            print(f"k={w} done", flush=True)
    print(f"{threads} thread(s); min (median) ms of a forward of k new tokens on a {CACHE}-token cache (model) and "
          f"of one pass over its {len(names)} Linear layers (linears)")

    def cell(t: dict[str, float]) -> str:
        return f"{t['min']:.1f} ({t['median']:.0f})".rjust(15)

    print(f"{'path':<34} " + "".join(f"model k={w}".rjust(15) for w in WIDTHS)
          + "".join(f"linears k={w}".rjust(15) for w in WIDTHS) + "  top-1 = fp32")
    for name, row in rows.items():
        print(f"{name:<34} " + "".join(cell(row["model_ms"][w]) for w in WIDTHS)
              + "".join(cell(row["linears_ms"][w]) for w in WIDTHS) + f"  {row['top1_agreement']:.2f}")
    result = {"command": "python docs/roofline/int8_torchao.py " + " ".join(sys.argv[1:]), "threads": threads,
              "cache_len": CACHE, "widths": list(WIDTHS), "torch": torch.__version__,
              "torchao": torchao.__version__, "machine": machine_info(), "rows": rows}
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
