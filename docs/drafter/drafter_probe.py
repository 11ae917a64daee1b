"""Teacher-forced draft quality of a gated drafter, on its training answers and on held-out ones (issue 25).

Usage: python docs/drafter/drafter_probe.py [--known K] ADAPTER HELDOUT_JSONL [CHECKPOINT ...]

HELDOUT_JSONL is ``edlm distill`` output for prompts the adapter never saw, e.g. the drafter recipe's held-out chat
prompts written to a file and answered with ``edlm distill --prompts FILE --max-new-tokens 96 --output OUT``. The
training answers are ``runs/drafter/distill.jsonl``. For 24 chat answers of each set, every block lying wholly
inside the answer is masked at once (one training-style forward per answer: each block sees the source's clean
keys/values before it, as a speculative draft made from verified tokens does). Prints per set the accuracy at each
in-block offset (offset 0 is the source's own next token, the rest are the adapter's guesses) and the mean run of
right guesses from offset 1: what a fused speculative step can accept beyond the source's token. CHECKPOINT folders
(``ADAPTER/checkpoint-N``) are probed too, for the curve along the run. ``--known K`` leaves the first K tokens of
every block unmasked (K = 1: the first guess is one token ahead of a known one, as when drafting after the verify);
the run is then counted from offset K.
"""

import json
import sys
from pathlib import Path

import torch

from edlm.adapter import load_adapter_state
from edlm.model import DiffusionLM


def answers(tok, path: str, n: int = 24) -> list[tuple[list[int], int]]:
    """(prompt + answer token ids, where the answer starts) of the first n chat records."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = []
    for r in [r for r in rows if r["domain"] == "chat"][:n]:
        ids = tok(r["text"], add_special_tokens=False)["input_ids"]
        out.append((ids, len(ids) - r["tokens"]))
    return out


def probe(dlm, records, known: int = 0) -> dict:
    tok, block = dlm.tokenizer, dlm.config.block_size
    hit, blocks, chain = torch.zeros(block), 0, 0
    for ids, start in records:
        x0 = torch.tensor([ids + [tok.eos_token_id] * (-len(ids) % block)])
        xt = x0.clone()
        first = -(-start // block) * block
        xt[0, first:len(ids)] = dlm.mask_id
        for b in range(first, len(ids), block):
            xt[0, b:b + known] = x0[0, b:b + known]
        with torch.no_grad():
            logits = dlm.training_logits(xt, x0)[0]
        logits[:, dlm.mask_id] = float("-inf")
        right = logits.argmax(-1) == x0[0]
        for b in range(first, len(ids) - block + 1, block):
            ok = right[b:b + block]
            hit += ok.float()
            blocks += 1
            run = 0
            while max(known, 1) + run < block and ok[max(known, 1) + run]:
                run += 1
            chain += run
    return {"acc_by_offset": [round(float(x), 3) for x in hit / max(blocks, 1)],
            "mean_run": round(chain / max(blocks, 1), 3), "blocks": blocks}


def main() -> None:
    torch.set_num_threads(2)
    args = sys.argv[1:]
    known = 0
    if args[:1] == ["--known"]:
        known, args = int(args[1]), args[2:]
    adapter, heldout, checkpoints = args[0], args[1], args[2:]
    dlm = DiffusionLM.from_pretrained(adapter).eval()
    sets = {"train": answers(dlm.tokenizer, "runs/drafter/distill.jsonl"), "heldout": answers(dlm.tokenizer, heldout)}
    print("final", json.dumps({name: probe(dlm, recs, known) for name, recs in sets.items()}), flush=True)
    for ckpt in checkpoints:
        state = torch.load(Path(ckpt) / "pytorch_model.bin", map_location="cpu", weights_only=True)
        load_adapter_state(dlm.model, {k.removeprefix("model."): v for k, v in state.items()})
        print(ckpt, json.dumps({name: probe(dlm, recs, known) for name, recs in sets.items()}), flush=True)


if __name__ == "__main__":
    main()
