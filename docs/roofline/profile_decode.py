"""Where a forced-TPF decode's time goes: every model forward timed with its width, next to the decoder's total.

Usage: python docs/roofline/profile_decode.py CONVERTED_DIR DTYPE BATCH TPF [THREADS [REPEATS]]
(e.g. runs/smol1 int8 4 4 2: SmolLM2's converted folder, row-scaled int8, 4 rows, 4 tokens per forward, 2 threads)

Decodes 32 new tokens per row (block 8, ``fixed`` policy, EOS ignored) from the chat-formatted default prompts, once
to warm up and REPEATS times (default 1) measured, the times of all repetitions pooled. Prints, per forward width
(new tokens per row), how many forwards and their mean ms; the decoder's time outside the forwards; and what the
time would be if every forward cost a block-wide one (the roofline of ``edlm bench``: TPF x t(1) / t(block) in
tokens/s), so the gap splits into the finished-block re-encode (wider forwards) and the decoder's own work.
"""

import sys
import time
from collections import defaultdict

import torch

from edlm.assets import default_chat_prompts
from edlm.config import DecodeConfig
from edlm.decode import generate
from edlm.model import DiffusionLM
from edlm.quant import cast


def main() -> None:
    folder, dtype, batch, tpf = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1)
    repeats = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    dlm = cast(DiffusionLM.from_pretrained(folder).eval(), dtype)
    prompts = [dlm.encode(p) for p in (default_chat_prompts() * batch)[:batch]]
    cfg = DecodeConfig(max_new_tokens=32, block_size=8, policy="fixed", tokens_per_step=tpf, ignore_eos=True)
    times: dict[int, list[float]] = defaultdict(list)
    run = dlm.run

    def timed(input_ids, *args, **kwargs):
        t0 = time.perf_counter()
        out = run(input_ids, *args, **kwargs)
        times[input_ids.shape[1]].append(time.perf_counter() - t0)
        return out

    with torch.no_grad():
        generate(dlm, prompts, cfg)  # warm-up
        dlm.run = timed
        times.clear()
        total = tokens = forwards = 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = generate(dlm, prompts, cfg)
            total += time.perf_counter() - t0
            tokens, forwards = tokens + out.stats.tokens, forwards + out.stats.forwards
    inside = sum(sum(v) for v in times.values())
    print(f"{folder} {dtype} batch {batch} forced TPF {tpf}, {repeats} run(s): {tokens} tokens in {total * 1e3:.0f} ms "
          f"({tokens / total:.1f} tok/s), {forwards} forwards, tokens/forward/row "
          f"{out.stats.tokens_per_forward:.2f}")
    for width in sorted(times):
        v = times[width]
        print(f"  width {width:4d}: {len(v):3d} forwards, mean {1e3 * sum(v) / len(v):7.1f} ms, "
              f"total {1e3 * sum(v):7.0f} ms")
    block_ms = [t for w, v in times.items() if w == 8 for t in v]
    print(f"  outside the forwards (decoder work): {1e3 * (total - inside):.0f} ms ({(total - inside) / total:.1%})")
    if block_ms:
        all_block = forwards * sorted(block_ms)[len(block_ms) // 2]
        print(f"  if every forward cost a median block-wide one: {1e3 * all_block:.0f} ms "
              f"({tokens / all_block:.1f} tok/s); measured / that = {all_block / total:.1%}")


if __name__ == "__main__":
    main()
