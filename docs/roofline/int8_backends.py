"""int8 backends compared: forward ms of k = 1, 4, 8 new tokens on a 100-token KV cache (median of 5 after 2).

Usage: python docs/roofline/int8_backends.py CONVERTED_DIR THREADS
fp32, bf16, torch dynamic int8 (edlm.quant's CPU choice), torchao int8 weight-only / dynamic-activation int8 (needs
pip install torchao). Written for docs/roofline.md (issue 16).
"""

import copy
import sys
import time
import warnings

import torch
from transformers import DynamicCache

from edlm.model import DiffusionLM, cache_kwargs


def variants(base):
    yield "fp32", base
    yield "bf16", copy.deepcopy(base).to(torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield "torch dynamic int8", torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear},
                                                                            dtype=torch.qint8)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    for name, cfg, dtype in (("torchao int8 weight-only", Int8WeightOnlyConfig(), torch.float32),
                             ("torchao int8 dyn-act int8", Int8DynamicActivationInt8WeightConfig(), torch.float32),
                             ("torchao int8 weight-only bf16", Int8WeightOnlyConfig(), torch.bfloat16)):
        m = copy.deepcopy(base).to(dtype)
        quantize_(m, cfg)
        yield name, m


def main() -> None:
    torch.set_num_threads(int(sys.argv[2]))
    base = DiffusionLM.from_pretrained(sys.argv[1]).eval().model
    ids = torch.randint(10, 1000, (1, 100))
    print(f"{'weights':<30} {'k=1':>7} {'k=4':>7} {'k=8':>7}  (ms)")
    for name, m in variants(base):
        with torch.no_grad():
            cache = DynamicCache(config=m.config)
            m(input_ids=ids, use_cache=True, **cache_kwargs(m, cache))
            row = []
            for k in (1, 4, 8):
                blk, pos = torch.randint(10, 1000, (1, k)), torch.arange(100, 100 + k)[None]
                ts = []
                for _ in range(7):
                    t0 = time.perf_counter()
                    m(input_ids=blk, position_ids=pos, use_cache=True, logits_to_keep=k, **cache_kwargs(m, cache))
                    ts.append(time.perf_counter() - t0)
                    cache.crop(-k)
                row.append(sorted(ts[2:])[2] * 1e3)
        print(f"{name:<30} " + " ".join(f"{x:7.1f}" for x in row), flush=True)


if __name__ == "__main__":
    main()
