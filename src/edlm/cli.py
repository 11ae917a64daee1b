"""Command line: each command is a thin mapping from flags to a typed library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from edlm.errors import EdlmError

logger = logging.getLogger("edlm")


def encode_prompt(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids of a user prompt, through the tokenizer's chat template when it has one and ``chat`` is on."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------- commands


def cmd_convert(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from edlm.config import load_train_config
    from edlm.train import convert

    cfg = load_train_config(args.config, args.set, model=args.model, output_dir=args.output_dir,
                            max_steps=args.max_steps)
    bar = None

    def progress(step: int, total: int, info: dict) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, initial=step - 1, desc="convert", unit="step", dynamic_ncols=True)
        bar.update(1)
        if info:
            bar.set_postfix(loss=f"{info['loss']:.4f}", tok_s=f"{info['tokens_per_s']:.0f}")

    out = convert(cfg, resume=args.resume, progress=progress)
    if bar is not None:
        bar.close()
    print(f"converted model saved to {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from edlm.config import DecodeConfig
    from edlm.decode import generate
    from edlm.model import DiffusionLM

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, block_size=args.block_size, threshold=args.threshold,
                       policy=args.policy, tokens_per_step=args.tokens_per_step, temperature=args.temperature,
                       top_p=args.top_p, seed=args.seed)
    dlm = DiffusionLM.from_pretrained(args.model).eval()
    prompts = args.prompt or []
    if not prompts:
        raise EdlmError("give at least one --prompt TEXT")
    ids = [encode_prompt(dlm.tokenizer, p, chat=not args.no_chat) for p in prompts]
    out = generate(dlm, ids, cfg)
    for prompt, seq in zip(prompts, out.sequences):
        text = dlm.tokenizer.decode(seq, skip_special_tokens=True)
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)
    if args.stats:
        s = out.stats
        print(f"[{s.tokens} tokens, {s.forwards} forwards, {s.tokens_per_forward:.2f} tokens/forward, "
              f"{s.tokens_per_s:.1f} tokens/s, {s.seconds:.2f} s]", file=sys.stderr)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from edlm.bench import train_throughput, write_json
    from edlm.config import load_train_config

    cfg = load_train_config(args.config, args.set, model=args.model)
    result = train_throughput(cfg, steps=args.steps, warmup=args.warmup)
    write_json(result, args.json)
    ar, dl = result["ar_finetune"], result["dlm_convert"]
    print(f"AR fine-tune : {ar['tokens_per_s']:8.1f} tokens/s  peak {ar['peak_mem_mb']:.0f} MB")
    print(f"dLM convert  : {dl['tokens_per_s']:8.1f} tokens/s  peak {dl['peak_mem_mb']:.0f} MB")
    print(f"dLM step time / AR step time: {result['dlm_over_ar_step_time']:.2f}  -> {args.json}")
    return 0


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edlm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an AR model into a block-diffusion LM (continued pretraining)")
    p.add_argument("--config", help="YAML preset (configs/*.yaml); flags below override it")
    p.add_argument("--model", help="source model folder, 'tiny[:family]'; default: embedded SmolLM2-135M")
    p.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and the final model go")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set diffusion.block_size=8 --set lr=1e-4")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text with a converted model")
    p.add_argument("--model", required=True, help="converted model folder (output of edlm convert)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="decoding block (default: the training block)")
    p.add_argument("--policy", default="threshold", help="commit policy: threshold or fixed")
    p.add_argument("--threshold", type=float, default=0.9, help="confidence needed to commit a token")
    p.add_argument("--tokens-per-step", type=int, default=1, help="tokens committed per step (policy fixed)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--stats", action="store_true", help="print tokens/s and tokens per forward")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench-train", help="conversion vs AR fine-tuning throughput (JSON)")
    p.add_argument("--config", help="YAML preset; model, batch, seq_len and block come from it")
    p.add_argument("--model", help="source model (default: the config's, else embedded SmolLM2-135M)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per phase")
    p.add_argument("--json", required=True, help="output JSON file")
    p.set_defaults(func=cmd_bench_train)
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": cmd_convert, "generate": cmd_generate, "bench-train": cmd_bench_train}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except EdlmError as e:
        print(f"edlm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
