"""Decoder A/B in one process, interleaved: an older edlm/decode.py vs the installed one, forced TPF 1 and 4 (fixed
policy, block 8, EOS ignored, 48 tokens), batch 1, with bare forward times (the roofline) measured between runs.

Usage: git show REV:src/edlm/decode.py > /tmp/decode_old.py
       python docs/roofline/decoder_ab.py THREADS DTYPES REPS OUT.json CONVERTED_DIR [/tmp/decode_old.py]
Asserts both decoders produce the same tokens. Written for docs/roofline.md (issue 16).
"""

import importlib.util
import json
import statistics
import sys

import torch

from edlm import decode as new
from edlm.assets import default_chat_prompts
from edlm.bench.timing import forward_times
from edlm.config import DecodeConfig
from edlm.loading import load
from edlm.results import machine_info

threads, reps = int(sys.argv[1]), int(sys.argv[3])
torch.set_num_threads(threads)
spec = importlib.util.spec_from_file_location("decode_old", sys.argv[6] if len(sys.argv) > 6 else "/tmp/decode_old.py")
old = importlib.util.module_from_spec(spec)
sys.modules["decode_old"] = old
spec.loader.exec_module(old)

out = {"threads": threads, "reps": reps, "rows": [], "machine": machine_info()}
for d in sys.argv[2].split(","):
    dlm = load(sys.argv[5], d)
    ids = [dlm.encode(default_chat_prompts()[0])]
    cache_len = len(ids[0]) + 24
    for k in (1, 4):
        cfg = DecodeConfig(max_new_tokens=48, block_size=8, policy="fixed", tokens_per_step=k, ignore_eos=True)
        res = {"before": [], "after": [], "t1": [], "t8": [], "t16": []}
        with torch.no_grad():
            old.generate(dlm, ids, cfg)
            new.generate(dlm, ids, cfg)
            for _ in range(reps):
                f = forward_times(dlm.model, cache_len, (1, 8, 16), repeats=3, token=dlm.mask_id)
                res["t1"].append(f[1])
                res["t8"].append(f[8])
                res["t16"].append(f[16])
                a = old.generate(dlm, ids, cfg)
                b = new.generate(dlm, ids, cfg)
                assert a.sequences == b.sequences
                res["before"].append(a.stats.seconds)
                res["after"].append(b.stats.seconds)
        m = {key: statistics.median(v) for key, v in res.items()}
        tok, fw = b.stats.tokens, b.stats.forwards
        tpf = tok / fw
        roof = tpf / m["t8"]  # tokens/s
        row = {
            "dtype": d,
            "tpf_forced": k,
            "tokens_per_forward": tpf,
            "forward_ms": {w: 1e3 * m[f"t{w}"] for w in (1, 8, 16)},
            "roofline_tokens_per_s": roof,
            "ar_roofline_tokens_per_s": 1 / m["t1"],
        }
        for side in ("before", "after"):
            row[side] = {
                "tokens_per_s": tok / m[side],
                "ms_per_forward": 1e3 * m[side] / fw,
                "fraction_of_roofline": tok / m[side] / roof,
            }
        # What the fused re-encode allows: one of the block's 8/k forwards is 16 wide.
        steps = 8 / k
        row["structural_ceiling_fraction"] = steps * m["t8"] / ((steps - 1) * m["t8"] + m["t16"])
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
json.dump(out, open(sys.argv[4], "w"), indent=1)
