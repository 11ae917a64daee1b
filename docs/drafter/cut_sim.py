"""Which draft cut pays: the block drafter's guesses on held-out distilled answers (teacher-forced, which is what greedy
decoding sees, the answers being the source's own), replayed against the measured verify cost V(b).

    python docs/drafter/cut_sim.py --drafter runs/block-drafter/drafter --curve docs/drafter/verify_curve.json \
        [--data docs/drafter/block/distill.jsonl --heldout 48] [--out docs/drafter/cut_sim.json]

For each cut (none, running-confidence thresholds, and the cost-aware rule that keeps the length maximising expected
tokens per unit of verify cost), per block: the accepted drafts (the longest right prefix within the cut), tokens per
cycle (accepted + 1), the verify width (kept drafts + 1), and the estimated speed-up over AR, sum(tokens) /
sum(V(width) + drafter cost), V in units of the cheapest one-column step. The drafter's cost comes from the curve
JSON's ``drafter_ms`` when present, else from a timing here.
"""

from __future__ import annotations

import argparse
import json

import torch

from edlm.bench.curve import draft_seconds
from edlm.checkpoints import resolve_model
from edlm.drafter import Drafter
from edlm.drafter_train import block_guesses, load_answers


def cost_aware_lengths(conf: torch.Tensor, costs: list[float]) -> torch.Tensor:
    """Per block, the number of drafts n (0..B-1) maximising (1 + sum_{j<=n} prod_{i<=j} conf_i) / costs[n], the
    expected tokens of a cycle per unit of its verify cost (costs[n]: V(n + 1) plus the drafter's cost)."""
    p = torch.cumprod(conf, -1)
    expected = torch.cat([torch.ones(conf.shape[0], 1), 1 + torch.cumsum(p, -1)], -1)  # (N, B)
    value = expected / torch.tensor(costs[:conf.shape[1] + 1])
    return value.argmax(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--curve", required=True, help="edlm bench verify JSON")
    ap.add_argument("--dtype", default=None, help="the curve's row to use (default: the cheapest forward per width)")
    ap.add_argument("--data", default="docs/drafter/block/distill.jsonl")
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--anchors", type=int, default=64)
    ap.add_argument("--out", default="docs/drafter/cut_sim.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    source, _ = resolve_model("embedded", dtype=torch.float32)
    drafter = Drafter.load(args.drafter, source.eval())
    answers = load_answers(args.data)[-args.heldout:]
    right, conf, real = block_guesses(drafter, answers, args.anchors)
    keep = real[:, 0]
    right, conf, real = right[keep], conf[keep], real[keep]
    b = drafter.cfg.block_size

    curve = json.load(open(args.curve))
    if args.dtype:
        rows = {r["width"]: r["ms"] for r in curve["rows"] if r["dtype"] == args.dtype and r["path"] == "compiled"}
    else:
        rows = {int(w): ms for w, ms in curve["verify_ms"].items()}
    one = rows[1]
    drafter_ms = curve.get("drafter_ms")
    if drafter_ms is None:
        drafter_ms = 1e3 * draft_seconds(drafter, repeats=20)
    costs = [rows[w] / one + drafter_ms / one for w in range(1, b + 1)]

    run = (right & real).long().cumprod(-1)  # 1 while every guess so far is right
    results = []
    cuts: list[tuple[str, torch.Tensor]] = [("none", torch.full((len(conf),), b - 1))]
    for t in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6):
        cuts.append((f"confidence {t}", (torch.cumprod(conf, -1) >= t).sum(-1)))
    cuts.append(("cost-aware", cost_aware_lengths(conf, costs)))
    for name, n in cuts:
        accepted = torch.minimum(run.sum(-1), n).float()
        cost = torch.tensor(costs)[n]
        results.append({"cut": name, "accepted_per_verify": float(accepted.mean()),
                        "tokens_per_cycle": float(accepted.mean() + 1), "mean_width": float(n.float().mean() + 1),
                        "est_speedup": float((accepted + 1).sum() / cost.sum())})
    out = {"drafter": args.drafter, "curve": args.curve, "blocks": len(conf), "drafter_ms": drafter_ms,
           "v": costs, "one_column_ms": one, "cuts": results,
           "accuracy_by_offset": [float(right[:, k][real[:, k]].float().mean()) for k in range(b - 1)]}
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"{len(conf)} held-out blocks; V(b) + drafter (AR steps): " + " ".join(f"{c:.2f}" for c in costs))
    print(f"{'cut':<18}{'accepted':>9}{'tokens':>8}{'width':>7}{'est. x':>8}")
    for r in results:
        print(f"{r['cut']:<18}{r['accepted_per_verify']:9.2f}{r['tokens_per_cycle']:8.2f}{r['mean_width']:7.2f}"
              f"{r['est_speedup']:8.2f}")


if __name__ == "__main__":
    main()
