"""Greedy agreement of llama.cpp (the embedded SmolLM2's Q4_1 GGUF) with the PyTorch AR of the same weights
de-quantized (fp32) and int8-quantized, on edlm bench's default prompts; writes JSON.

    python docs/roofline/llamacpp_agreement.py --max-new-tokens 48 --json docs/roofline/llamacpp-agreement.json
"""

import argparse

import torch

from edlm.checkpoints import resolve_model

from edlm.assets import default_chat_prompts
from edlm.assets.embedded import smollm2_gguf_path
from edlm.ar import ar_generate
from edlm.bench.llamacpp import llamacpp_ar
from edlm.bench.timing import agreement
from edlm.config import DecodeConfig
from edlm.model import encode_prompt
from edlm.quant import cast_model
from edlm.results import machine_info, write_json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    model, tok = resolve_model(None)
    ids = [encode_prompt(tok, p) for p in default_chat_prompts()]
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens)
    theirs = llamacpp_ar(smollm2_gguf_path(), ids, args.max_new_tokens, threads=torch.get_num_threads())["sequences"]
    result = {"max_new_tokens": args.max_new_tokens, "prompts": len(ids), "machine": machine_info()}
    for dtype in ("fp32", "int8"):
        m = model if dtype == "fp32" else cast_model(model, dtype, copy=True)
        ours = ar_generate(m, ids, cfg, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id).sequences
        result[f"agreement_with_{dtype}_ar"] = agreement([t[:len(o)] for t, o in zip(theirs, ours)], ours)
        result[f"first_divergence_{dtype}"] = [next((i for i, (a, b) in enumerate(zip(t, o)) if a != b), len(o))
                                               for t, o in zip(theirs, ours)]
    write_json(result, args.json)
    print({k: v for k, v in result.items() if k != "machine"})


if __name__ == "__main__":
    main()
