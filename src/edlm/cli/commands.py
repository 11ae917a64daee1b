"""The commands of ``edlm``: each maps its flags to a typed library function and prints the result."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from tqdm import tqdm

from edlm.api import drafted_until_stop, encode_prompt, stopped_text
from edlm.assets import default_chat_prompts
from edlm.assets.prompts import DEMO_PROMPTS, heldout_prompts
from edlm.bench.curve import curve_report, verify_curve
from edlm.bench.decode import decode_benchmark, decode_report, plot_ceiling, plot_sweep
from edlm.bench.engine import (
    choose_dtype,
    choose_source_dtype,
    engine_benchmark,
    engine_report,
    profile_engine,
    profile_report,
)
from edlm.bench.train import mask_memory, masks_report, train_report, train_throughput, training_memory
from edlm.checkpoints import best_device
from edlm.cli.console import Bars, TrainingBar
from edlm.config import DecodeConfig, load_train_config
from edlm.demo import (
    block_drafter_demo_report,
    block_drafter_dir,
    drafter_demo_report,
    drafter_dir,
    miniature_json,
    miniature_report,
    run_block_drafter_demo,
    run_drafter_demo,
    run_miniature_demo,
)
from edlm.distill import DistillConfig, distill, distilled_tokens
from edlm.drafter import Drafter, copy_drafter, drafter_source
from edlm.drafter_train import is_block_drafter_config, load_config, train_drafter
from edlm.engine import compile_model
from edlm.errors import EdlmError, require
from edlm.evals.run import evaluate, plot_pareto, results_table, sweep, sweep_report
from edlm.evals.tasks import default_max_new_tokens
from edlm.loading import load, load_ar
from edlm.model import read_diffusion_config
from edlm.quant import check_dtype, parse_dtypes
from edlm.results import machine_info, write_json
from edlm.studies import collect, load_study_config, run_study, write_report
from edlm.studies.drafter import drafter_report, load_drafter_config, run_drafter, ship_drafter
from edlm.studies.headline import load_headline_config, run_headline, ship_miniature, targets_table
from edlm.train import convert

# How to install what some commands need beyond the core dependencies (pyproject.toml's extras).
PLOTS = "pip install matplotlib"
SERVE = "pip install fastapi uvicorn sse-starlette openai httpx"
REASONING_GYM = "pip install reasoning-gym"
LM_EVAL = "pip install 'lm-eval>=0.4.13,<0.5'"


def _require_task(task: str) -> None:
    """Fail before any work when an evaluation task needs a package that is not installed."""
    if task.startswith("rg:"):
        require("reasoning_gym", install=REASONING_GYM)
    elif not task.startswith("ppl:") and default_max_new_tokens(task) is None:  # a choice task: run by lm-eval
        require("lm_eval", install=LM_EVAL)


def decode_given(args: argparse.Namespace) -> dict[str, object]:
    """The decoding flags given on the command line (see :func:`edlm.cli.parser.decode_flags`), by field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeConfig)
            if getattr(args, f.name, None) is not None}


def decode_config(args: argparse.Namespace, **fields: object):
    """The :class:`edlm.config.DecodeConfig` of the decoding flags given, then ``fields``."""
    return DecodeConfig(**{**decode_given(args), **{k: v for k, v in fields.items() if v is not None}})


def _written(result: dict, path: str, report: str) -> int:
    """Write ``result`` as JSON to ``path``, print ``report`` and where the JSON went; the command's exit code."""
    write_json(result, path)
    print(f"{report}\n-> {path}")
    return 0


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (CPU threads for torch) when given."""
    if args.threads:
        torch.set_num_threads(args.threads)


def cmd_convert(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.set, model=args.model, output_dir=args.output_dir,
                            max_steps=args.max_steps)
    args.logs.to_folder(cfg.output_dir)
    bar = TrainingBar()
    out = convert(cfg, resume=args.resume, progress=bar)
    bar.close()
    print(f"converted model saved to {out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    _set_threads(args)
    cfg = DistillConfig(prompts=args.prompts, num_prompts=args.num_prompts, limit=args.limit,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        temperature=args.temperature, seed=args.seed, chat=not args.no_chat,
                        feature_layers=_layer_list(args.features))

    model, tok = load_ar(args.model, "fp32", compile=args.compile)
    bar = tqdm(desc="distill", unit="prompt", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    out = distill(model, tok, cfg, args.output, progress=progress)
    bar.close()
    records, tokens = distilled_tokens(out)
    print(f"{records} answers, {tokens} generated tokens in {out}")
    return 0


def _layer_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise EdlmError(f"--features takes comma-separated layer numbers like 1,8,14,20,27, not {text!r}") from None


def cmd_drafter(args: argparse.Namespace) -> int:
    if is_block_drafter_config(args.config):
        return _block_drafter(args)
    cfg = load_drafter_config(args.config, args.set, output_dir=args.output_dir)
    args.logs.to_folder(cfg.output_dir)
    _set_threads(args)
    bar = TrainingBar("convert")
    result = run_drafter(cfg, progress=bar, say=lambda msg: print(msg, flush=True))
    bar.close()
    print(drafter_report(result))
    if args.ship:
        print(f"shipped the adapter to {ship_drafter(result['adapter'], drafter_dir(), args.config)}")
    return 0


def _block_drafter(args: argparse.Namespace) -> int:
    """``edlm drafter`` on a block-drafter recipe: distil, then train, resuming what is done."""
    cfg = load_config(args.config, args.set, output_dir=args.output_dir)
    args.logs.to_folder(cfg.output_dir)
    _set_threads(args)
    bar = TrainingBar("drafter")
    folder = train_drafter(cfg, progress=bar, say=lambda msg: print(msg, flush=True))
    bar.close()
    print(f"drafter: {folder}")
    if args.ship:
        print(f"shipped the drafter to {copy_drafter(folder, block_drafter_dir())}")
    return 0


def _auto_dtype(args: argparse.Namespace, mode: str, block: int | None) -> None:
    """``--dtype auto``: replace it by the dtype whose decoding step is fastest here (measured once, cached)."""
    if getattr(args, "dtype", None) != "auto":
        return
    width = 1 if mode == "ar" else block or read_diffusion_config(args.model).block_size
    args.dtype, record = choose_dtype(args.model, width, compile=getattr(args, "compile", False))
    _say_auto(args.dtype, width, record)


def _say_auto(dtype: str, width: int, record: dict) -> None:
    times = ", ".join(f"{d} {ms:.1f}" for d, ms in record["forward_ms"].items())
    print(f"[dtype auto: {dtype} (forward of {width} new columns, ms: {times}; "
          f"{'cached' if record['cached'] else 'measured now'})]", file=sys.stderr)


def _auto_drafted_dtype(args: argparse.Namespace, source, drafter: Drafter) -> None:
    """``--dtype auto`` with ``--drafter``: the engine dtype whose verify (a forward of the drafter's block) is
    fastest here; the engine compiles, as every candidate but eager fp32 needs it."""
    if args.dtype != "auto":
        return
    width = drafter.cfg.block_size
    args.dtype, record = choose_source_dtype(source, drafter.cfg.source_fingerprint, width, exact_widths=width)
    args.compile = True
    _say_auto(args.dtype, width, record)


def cmd_generate(args: argparse.Namespace) -> int:
    _set_threads(args)
    cfg = decode_config(args)
    prompts = args.prompt
    if not prompts:
        raise EdlmError("give at least one --prompt TEXT")
    if args.drafter:
        texts, stats, dlm = _generate_drafted(args, prompts, cfg)
    elif not args.model:
        raise EdlmError("give --model FOLDER (a converted model), or --drafter FOLDER (an AR source's drafter)")
    else:
        _auto_dtype(args, cfg.mode, cfg.block_size)
        dlm = load(args.model, args.dtype, device=best_device(), compile=args.compile)
        texts, stats = dlm.generate(prompts, cfg, chat=not args.no_chat)
    for prompt, text in zip(prompts, texts):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)
    if args.stats:
        print(f"[{stats.tokens} tokens, {stats.forwards} forwards, {stats.tokens_per_forward:.2f} tokens/forward, "
              f"{stats.tokens_per_s:.1f} tokens/s, {stats.seconds:.2f} s]", file=sys.stderr)
        compiled = getattr(dlm.model, "compile_s", None)
        if compiled:
            print(f"[of which compiling {len(compiled)} forward shapes: {sum(compiled.values()):.1f} s; later calls "
                  "of the same shapes reuse them]", file=sys.stderr)
    return 0


def _generate_drafted(args: argparse.Namespace, prompts: list[str], cfg: DecodeConfig):
    """``edlm generate --drafter``: the source (eager, or on the compiled engine) with its block drafter."""
    source, tokenizer = load_ar(args.model or drafter_source(args.drafter), "fp32")
    drafter = Drafter.load(args.drafter, source)
    _auto_drafted_dtype(args, source, drafter)
    model = compile_model(source, args.dtype, compile=args.compile, exact_widths=drafter.cfg.block_size) \
        if args.compile or args.dtype != "fp32" else source
    ids = [encode_prompt(tokenizer, p, not args.no_chat) for p in prompts]
    out = drafted_until_stop(model, drafter, tokenizer, ids, dataclasses.replace(cfg, mode="speculative"))
    return [stopped_text(tokenizer, s, cfg.stop) for s in out.sequences], out.stats, SimpleNamespace(model=model)


def cmd_bench_train(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.set, model=args.model)
    result = train_throughput(cfg, steps=args.steps, warmup=args.warmup)
    return _written(result, args.json, train_report(result))


def cmd_bench(args: argparse.Namespace) -> int:
    require("matplotlib", install=PLOTS)
    _set_threads(args)
    cfg = decode_config(args)
    result = decode_benchmark(args.model, prompts=args.prompt, decode=cfg, batch_sizes=tuple(args.batch_sizes),
                              sweep=tuple(args.sweep), dtypes=parse_dtypes(args.dtypes), repeats=args.repeats,
                              chat=not args.no_chat, ar_source=None if args.ar_model == "self" else args.ar_model,
                              ceiling_tpf=tuple(args.ceiling_tpf), ceiling_block=args.ceiling_block,
                              llama_cpp=not args.no_llama_cpp, gguf=args.gguf, compile=args.compile,
                              engine_dtypes=tuple(args.engine_dtypes.split(",")))
    write_json(result, args.json)
    plot = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png")
    plot_sweep(result, plot)
    plots = [str(plot)]
    if "ceiling" in result:
        plots.append(str(plot.with_name(plot.stem + "-ceiling.png")))
        plot_ceiling(result, plots[-1])
    print(decode_report(result))
    print(f"-> {args.json}, {', '.join(plots)}")
    return 0


def cmd_bench_engine(args: argparse.Namespace) -> int:
    _set_threads(args)
    dtypes, eager_dtypes = tuple(args.dtypes.split(",")), tuple(args.eager_dtypes.split(","))
    if args.profile:
        result = profile_engine(args.model, dtypes=dtypes, eager_dtypes=eager_dtypes,
                                widths=(1, args.block, 2 * args.block))
        result["machine"] = machine_info()
        return _written(result, args.json, profile_report(result))
    texts = args.prompt or default_chat_prompts()
    tokenizer = load(args.model, "fp32")
    ids = [tokenizer.encode(t, not args.no_chat) for t in texts]
    result = engine_benchmark(args.model, ids, args.max_new_tokens, dtypes=dtypes, eager_dtypes=eager_dtypes,
                              repeats=args.repeats, block=args.block, tpfs=tuple(args.tpf), gguf=args.gguf,
                              llama_cpp=not args.no_llama_cpp, exact_widths=args.exact_widths)
    result["settings"].update(model=str(args.model), prompts_text=texts, chat_template=not args.no_chat)
    result["machine"] = machine_info()
    return _written(result, args.json, engine_report(result))


def cmd_bench_verify(args: argparse.Namespace) -> int:
    _set_threads(args)
    a, dash, b = args.widths.partition("-")
    try:
        widths = tuple(range(int(a), int(b) + 1)) if dash else tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise EdlmError(f"--widths: give a range like 1-16 or a list like 1,4,8, not {args.widths!r}") from None
    if not widths or min(widths) < 1:
        raise EdlmError(f"--widths: every width must be >= 1, got {args.widths!r}")
    source, _ = load_ar(args.model, "fp32")
    dtypes = tuple(check_dtype(d.strip(), compiled=True) for d in args.dtypes.split(",") if d.strip())
    result = verify_curve(source.eval(), dtypes, widths, cache_len=args.cache_len,
                          repeats=args.repeats, eager=not args.no_eager, exact_widths=args.exact_widths)
    result["model"] = str(args.model)
    return _written(result, args.json, curve_report(result))


def cmd_serve(args: argparse.Namespace) -> int:
    require("fastapi", "uvicorn", "sse_starlette", "openai", install=SERVE)
    from edlm.serve import load_serve_settings, serve

    _set_threads(args)
    given = decode_given(args)
    if args.drafter:
        if args.dtype == "auto":
            source = load_ar(args.model or drafter_source(args.drafter), "fp32")[0]
            _auto_drafted_dtype(args, source, Drafter.load(args.drafter, source))
            del source
        if given.get("mode", "speculative") != "speculative":
            raise EdlmError("--drafter serves the source speculatively; drop --mode (or give --mode speculative)")
        given["mode"] = "speculative"
    elif not args.model:
        raise EdlmError("give --model FOLDER (a converted model), or --drafter FOLDER (an AR source's drafter)")
    else:
        _auto_dtype(args, given.get("mode", "diffusion"), given.get("block_size"))
    settings = load_serve_settings(args.drafter or args.model, args.set, host=args.host, port=args.port,
                                   api_key=args.api_key, model_id=args.model_id, max_batch=args.max_batch,
                                   max_queue=args.max_queue, dtype=args.dtype, compile=args.compile or None)
    settings = dataclasses.replace(settings, decode=dataclasses.replace(settings.decode, **given))
    serve(args.model, settings, drafter=args.drafter)
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    require("fastapi", "uvicorn", "sse_starlette", "openai", "httpx", install=SERVE)
    from edlm.bench.load import serve_bench, serve_bench_report
    from edlm.serve import load_serve_settings

    _set_threads(args)
    settings = load_serve_settings(args.model, args.set)
    result = serve_bench(args.model, n_requests=args.requests, concurrency=args.concurrency,
                         max_tokens=args.max_tokens, disconnect=args.disconnect, max_batch=args.max_batch,
                         settings=settings)
    return _written(result, args.json, serve_bench_report(result))


def cmd_bench_masks(args: argparse.Namespace) -> int:
    result = mask_memory(tuple(args.lengths), block=args.block, device=args.device)
    if args.training_model:  # GPU: peak memory of a real training forward + backward, SDPA vs flex
        result["training"] = training_memory(args.training_model, tuple(args.lengths), block=args.block)
    return _written(result, args.json, masks_report(result))


def cmd_eval(args: argparse.Namespace) -> int:
    _require_task(args.task)
    _set_threads(args)
    decode = decode_config(args)
    _auto_dtype(args, "ar" if args.ar else decode.mode, decode.block_size)
    result = evaluate(args.model, args.task, limit=args.limit, ar=args.ar, n_samples=args.samples,
                      decode=decode, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                      dtype=args.dtype, allow_unsandboxed_code=args.allow_unsandboxed_code, compile=args.compile)
    if args.json:
        write_json(result, args.json)
    shown = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k not in ("model",)}
    print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    require("matplotlib", install=PLOTS)
    _require_task(args.task)
    _set_threads(args)
    result = sweep(args.model, args.task, thresholds=tuple(args.thresholds),
                   block_sizes=tuple(args.block_sizes) if args.block_sizes else (None,), limit=args.limit,
                   max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                   allow_unsandboxed_code=args.allow_unsandboxed_code)
    write_json(result, args.json)
    plot = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png")
    plot_pareto(result, plot)
    print(f"{sweep_report(result)}\n-> {args.json}, {plot}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    results = [json.loads(Path(f).read_text()) for f in args.results]
    text = results_table(results)
    if args.output:
        Path(args.output).write_text(text)
    print(text, end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "embedded":
        return _embedded_demo(args)
    if args.adapter or args.prompt or args.drafter:
        raise EdlmError("--adapter and --prompt belong to the embedded demo (edlm demo); the miniature decodes its "
                        "held-out problems")

    out = args.output_dir or "runs/demo-miniature"
    args.logs.to_folder(out)
    _set_threads(args)
    bar = TrainingBar("convert")
    result = run_miniature_demo(out, per_family=args.problems, convert=args.convert, steps=args.steps,
                                decode=None if args.threshold is None else DecodeConfig(threshold=args.threshold),
                                progress=bar, say=lambda msg: print(msg, flush=True))
    bar.close()
    print(miniature_report(result))
    if args.json:
        write_json(miniature_json(result), args.json)
    return 0


def _embedded_demo(args: argparse.Namespace) -> int:
    if args.convert or args.steps:
        raise EdlmError("--convert and --steps belong to the miniature demo (edlm demo --model miniature); the "
                        "embedded demo uses a trained adapter: --adapter FOLDER (edlm drafter trains one)")
    _set_threads(args)
    prompts = [("prompt", p) for p in args.prompt] if args.prompt else None
    if args.heldout:
        prompts = (prompts or list(DEMO_PROMPTS)) + heldout_prompts()
    if args.adapter or not (args.drafter or (block_drafter_dir() / "drafter_config.json").is_file()):
        if args.dtype == "auto":
            raise EdlmError("--dtype auto chooses the block drafter's verify dtype; the gated adapter's demo takes "
                            "fp32, bf16 or int8")
        result = run_drafter_demo(args.adapter, prompts, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                  threshold=args.threshold)
        print(drafter_demo_report(result))
    else:
        result = run_block_drafter_demo(args.drafter, prompts, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                                        draft_cut=_draft_cut(args.draft_cut), llama_cpp=not args.no_llama_cpp,
                                        threads=args.threads, batch=args.batch)
        print(block_drafter_demo_report(result))
    if args.json:
        write_json(result, args.json)
    return 0


def _draft_cut(value: str | None) -> float | str | None:
    """``--draft-cut``: None, ``auto`` or a number in [0, 1)."""
    if value is None or value == "auto":
        return value
    try:
        cut = float(value)
    except ValueError:
        cut = -1.0
    if not 0.0 <= cut < 1.0:
        raise EdlmError(f"--draft-cut: give a number in [0, 1) or 'auto', not {value!r}")
    return cut


def _study_overrides(args: argparse.Namespace) -> list[str]:
    folders = {"output_dir": args.output_dir, "report_dir": args.report_dir}
    return [*args.set, *(f"{key}={value}" for key, value in folders.items() if value)]


def cmd_study(args: argparse.Namespace) -> int:
    require("matplotlib", install=PLOTS)
    cfg = load_study_config(args.config, _study_overrides(args))
    args.logs.to_folder(cfg.output_dir)
    _set_threads(args)
    bars = Bars()
    if args.report_only:
        results = collect(cfg)
    else:
        results = run_study(cfg, progress=lambda msg: print(msg, flush=True), new_bar=bars)
    bars.close()
    shown = [a for a in sys.argv[2:] if a != "--report-only"]  # the command that regenerates everything
    command = "edlm study " + " ".join(shlex.quote(a) for a in shown) if sys.argv[1:2] == ["study"] \
        else f"edlm study --config {args.config}"
    report = write_report(results, cfg.report_dir, command=command)
    if results["missing"]:
        print(f"{len(results['missing'])} runs not finished: {', '.join(results['missing'])}")
    print(f"report: {report}")
    return 0


def cmd_headline(args: argparse.Namespace) -> int:
    require("matplotlib", install=PLOTS)
    cfg = load_headline_config(args.config, _study_overrides(args))
    args.logs.to_folder(cfg.study.output_dir)
    _set_threads(args)
    bars = Bars()
    result = run_headline(cfg, progress=lambda msg: print(msg, flush=True), new_bar=bars, config_path=args.config)
    bars.close()
    if args.ship:
        print(f"shipped the source and the dLM into {ship_miniature(cfg, args.config)}")
    print(f"\n{targets_table(result).text()}")
    print(f"report: {Path(cfg.study.report_dir) / 'report.md'}")
    return 0
