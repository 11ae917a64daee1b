"""Which int8 GEMM the compiled engine should call on this CPU (docs/roofline.md, section 7).

Usage: python docs/roofline/int8_kernels.py [THREADS]

Thirty int8 copies of SmolLM2's fused gate/up weight (3072 x 576, 53 MB in all, more than the caches hold, as a
model's layers are) are multiplied by m = 1, 8, 16 activation rows, median of 7 passes over all thirty:
- aten._weight_int8pack_mm (weight-only int8, bf16 activations; what torchao's int8 weight-only uses on CPU);
- fbgemm's dynamic int8 GEMM (torch.ops.quantized.linear_dynamic, per-channel weights: what edlm.quant's int8 uses);
- inductor's code for two weight-only formulations (a decomposed multiply-sum, and F.linear of the converted weight).
Then the memory bandwidth a reduction over 1 GB of random fp32 reaches at 1 and 2 threads.
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

from edlm.bench.timing import median_seconds
from edlm.quant import quantize_int8


def bench(fn, n=7):
    """Median milliseconds of ``n`` calls after one untimed call."""
    return median_seconds(fn, n) * 1e3


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    g = torch.Generator().manual_seed(0)
    layers = 30
    weights = [torch.randn(3072, 576, generator=g) * 0.02 for _ in range(layers)]
    scales = [w.abs().amax(1) / 127 for w in weights]
    int8 = [(w / s[:, None]).round().to(torch.int8) for w, s in zip(weights, scales)]
    packed = []
    for w in weights:
        lin = nn.Linear(576, 3072, bias=False)
        with torch.no_grad():
            lin.weight.copy_(w)
        packed.append(quantize_int8(nn.Sequential(lin))[0]._packed_params._packed_params)
    megabytes = sum(w.numel() for w in int8) / 1e6

    def decomposed(x, w, s):
        return (x[:, None, :] * w[None].float()).sum(-1) * s

    def converted(x, w, s):
        return F.linear(x, w.to(x.dtype)) * s

    compiled_decomposed = torch.compile(decomposed, dynamic=False)
    compiled_converted = torch.compile(converted, dynamic=False)
    with torch.no_grad():
        for m in (1, 8, 16):
            x = torch.randn(m, 576, generator=g)
            xb, sb = x.bfloat16(), [s.bfloat16() for s in scales]
            rows = {
                "aten int8pack (bf16 act.)": bench(
                    lambda xb=xb, sb=sb: [torch.ops.aten._weight_int8pack_mm(xb, w, s) for w, s in zip(int8, sb)]),
                "fbgemm dynamic int8": bench(
                    lambda x=x: [torch.ops.quantized.linear_dynamic(x, p, True) for p in packed]),
                "inductor multiply-sum": bench(
                    lambda x=x: [compiled_decomposed(x, w, s) for w, s in zip(int8, scales)]),
                "inductor linear(w.float())": bench(
                    lambda x=x: [compiled_converted(x, w, s) for w, s in zip(int8, scales)]),
            }
            print(f"m={m:2d}: " + "; ".join(f"{k} {v:.1f} ms ({megabytes / v:.1f} GB/s)" for k, v in rows.items()),
                  flush=True)
    big = torch.randn(256 * 1024 * 1024, generator=g)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"{threads} thread(s): reduction over 1 GB reads {big.numel() * 4 / bench(lambda: big.sum()) / 1e6:.1f} "
              "GB/s")


if __name__ == "__main__":
    main()
