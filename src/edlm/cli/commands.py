"""The commands of ``edlm``: each maps its flags to a typed library function and prints the result."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edlm.cli.console import Bars, TrainingBar
from edlm.errors import EdlmError, require

# How to install what some commands need beyond the core dependencies (pyproject.toml's extras).
PLOTS = "pip install matplotlib"
SERVE = "pip install fastapi uvicorn sse-starlette openai httpx"
REASONING_GYM = "pip install reasoning-gym"
LM_EVAL = "pip install 'lm-eval>=0.4.13,<0.5'"


def _require_task(task: str) -> None:
    """Fail before any work when an evaluation task needs a package that is not installed."""
    from edlm.evals.tasks import default_max_new_tokens

    if task.startswith("rg:"):
        require("reasoning_gym", install=REASONING_GYM)
    elif not task.startswith("ppl:") and default_max_new_tokens(task) is None:  # a choice task: run by lm-eval
        require("lm_eval", install=LM_EVAL)


def decode_given(args: argparse.Namespace) -> dict[str, object]:
    """The decoding flags given on the command line (see :func:`edlm.cli.parser.decode_flags`), by field name."""
    import dataclasses

    from edlm.config import DecodeConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeConfig)
            if getattr(args, f.name, None) is not None}


def decode_config(args: argparse.Namespace, **fields: object):
    """The :class:`edlm.config.DecodeConfig` of the decoding flags given, then ``fields``."""
    from edlm.config import DecodeConfig

    return DecodeConfig(**{**decode_given(args), **{k: v for k, v in fields.items() if v is not None}})


def _set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (CPU threads for torch) when given."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_convert(args: argparse.Namespace) -> int:
    from edlm.config import load_train_config
    from edlm.train import convert

    cfg = load_train_config(args.config, args.set, model=args.model, output_dir=args.output_dir,
                            max_steps=args.max_steps)
    args.logs.to_folder(cfg.output_dir)
    bar = TrainingBar()
    out = convert(cfg, resume=args.resume, progress=bar)
    bar.close()
    print(f"converted model saved to {out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from edlm.checkpoints import resolve_model
    from edlm.distill import DistillConfig, distill, distilled_tokens

    _set_threads(args)
    cfg = DistillConfig(prompts=args.prompts, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                        batch_size=args.batch_size, temperature=args.temperature, seed=args.seed,
                        chat=not args.no_chat)
    from tqdm import tqdm

    model, tok = resolve_model(args.model)
    bar = tqdm(desc="distill", unit="prompt", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()

    out = distill(model, tok, cfg, args.output, progress=progress)
    bar.close()
    records, tokens = distilled_tokens(out)
    print(f"{records} answers, {tokens} generated tokens in {out}")
    return 0


def cmd_drafter(args: argparse.Namespace) -> int:
    from edlm.studies.drafter import load_drafter_config, run_drafter

    cfg = load_drafter_config(args.config, args.set, output_dir=args.output_dir)
    args.logs.to_folder(cfg.output_dir)
    _set_threads(args)
    bar = TrainingBar("convert")
    result = run_drafter(cfg, progress=bar, say=lambda msg: print(msg, flush=True))
    bar.close()
    print(drafter_table(result))
    if args.ship:
        from edlm.demo import drafter_dir
        from edlm.studies.drafter import ship_drafter

        print(f"shipped the adapter to {ship_drafter(result['adapter'], drafter_dir(), args.config)}")
    return 0


def drafter_table(result: dict) -> str:
    """The drafter's results as the CLI prints them: one row per system and batch size."""
    lines = [f"{'batch':>5} {'system':<12} {'dtype':<5} {'tok/fwd':>7} {'tokens/s':>9} {'speed-up':>8}  identical"]
    for batch, row in result["by_batch"].items():
        for name in ("ar", "speculative", "diffusion"):
            r = row[name]
            same = f"{100 * row['identical']:.0f}%" if name == "speculative" else ""
            lines.append(f"{batch:>5} {name:<12} {r['dtype']:<5} {r['tokens_per_forward']:7.2f} "
                         f"{r['tokens_per_s']:9.1f} {r['speedup']:7.2f}x  {same}")
    if result.get("budget_curve"):
        lines.append("budget curve (speculative tokens/forward, held-out chat, batch 1): " + ", ".join(
            f"{100 * p['fraction']:.0f}% {p['tokens_per_forward']:.2f}" for p in result["budget_curve"]))
    exact = result.get("exact_answers")
    if exact:
        for family, row in exact["families"].items():
            lines.append(f"exact answers, {family} (n={exact['n_per_family']}): source AR {100 * row['ar']:.1f}%, "
                         f"diffusion {100 * row['diffusion']:.1f}%")
    return "\n".join(lines)


def _auto_dtype(args: argparse.Namespace, mode: str, block: int | None) -> None:
    """``--dtype auto``: replace it by the dtype whose decoding step is fastest here (measured once, cached)."""
    if getattr(args, "dtype", None) != "auto":
        return
    from edlm.bench.engine import choose_dtype
    from edlm.model import read_diffusion_config

    width = 1 if mode == "ar" else block or read_diffusion_config(args.model).block_size
    args.dtype, record = choose_dtype(args.model, width, compile=getattr(args, "compile", False))
    times = ", ".join(f"{d} {ms:.1f}" for d, ms in record["forward_ms"].items())
    print(f"[dtype auto: {args.dtype} (forward of {width} new columns, ms: {times}; "
          f"{'cached' if record['cached'] else 'measured now'})]", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    _set_threads(args)
    cfg = decode_config(args)
    prompts = args.prompt or []
    if not prompts:
        raise EdlmError("give at least one --prompt TEXT")
    from edlm.checkpoints import best_device
    from edlm.loading import load

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


def cmd_bench_train(args: argparse.Namespace) -> int:
    from edlm.bench.train import train_throughput
    from edlm.config import load_train_config
    from edlm.results import write_json

    cfg = load_train_config(args.config, args.set, model=args.model)
    result = train_throughput(cfg, steps=args.steps, warmup=args.warmup)
    write_json(result, args.json)
    ar, dl = result["ar_finetune"], result["dlm_convert"]
    print(f"AR fine-tune : {ar['tokens_per_s']:8.1f} tokens/s  peak {ar['peak_mem_mb']:.0f} MB")
    print(f"dLM convert  : {dl['tokens_per_s']:8.1f} tokens/s  peak {dl['peak_mem_mb']:.0f} MB")
    if "dlm_convert_joint" in result:
        jo = result["dlm_convert_joint"]
        print(f"dLM + AR loss: {jo['tokens_per_s']:8.1f} tokens/s  peak {jo['peak_mem_mb']:.0f} MB  "
              f"(step time {result['joint_over_dlm_step_time']:.2f}x the diffusion-only step)")
    print(f"dLM step time / AR step time: {result['dlm_over_ar_step_time']:.2f}  -> {args.json}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    require("matplotlib", install=PLOTS)
    from edlm.bench.decode import decode_benchmark, plot_ceiling, plot_sweep
    from edlm.quant import parse_dtypes
    from edlm.results import write_json

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
    print(f"threshold {cfg.threshold}:")
    print(f"{'batch':>5} {'AR tok/s':>9} {'dLM tok/s':>10} {'tok/fwd':>8} {'speedup':>8}")
    for n, row in result["by_batch"].items():
        print(f"{n:>5} {row['ar']['tokens_per_s']:9.1f} {row['dlm']['tokens_per_s']:10.1f} "
              f"{row['dlm']['tokens_per_forward']:8.2f} {row['speedup']:8.2f}")
    if "ceiling" in result:
        ceiling_plot = plot.with_name(plot.stem + "-ceiling.png")
        plot_ceiling(result, ceiling_plot)
        plots.append(str(ceiling_plot))
        print(f"forced tokens per forward (fixed policy, block {result['ceiling']['block']}, EOS ignored):")
        print(f"{'batch':>5} {'system':<10} {'tok/fwd':>8} {'tok/s':>8} {'roofline':>8} {'reached':>8} {'vs AR':>6}")
        for n, c in result["ceiling"]["by_batch"].items():
            ar_best = c["ar"]["best"]
            for d, r in c["ar"]["by_dtype"].items():
                name = f"AR {d}" + ("*" if d == ar_best else "")
                print(f"{n:>5} {name:<10} {1.0:8.2f} {r['tokens_per_s']:8.1f} {r['roofline_tokens_per_s']:8.1f} "
                      f"{100 * r['fraction_of_roofline']:7.0f}% {'':>6}")
            for r in c["dlm"]:
                print(f"{n:>5} {'dLM ' + r['dtype']:<10} {r['tokens_per_forward']:8.2f} {r['tokens_per_s']:8.1f} "
                      f"{r['roofline_tokens_per_s']:8.1f} {100 * r['fraction_of_roofline']:7.0f}% "
                      f"{r['speedup_vs_best_ar']:5.2f}x")
    lc = result.get("llama_cpp")
    if lc and "skipped" in lc:
        print(lc["skipped"])
    elif lc:
        best = max(lc.get("ceiling_speedups", {}).items(), key=lambda kv: kv[1], default=None)
        print(f"llama.cpp AR (batch 1, {Path(lc['gguf']).name}, {lc['threads']} threads): {lc['tokens_per_s']:.1f} "
              f"tokens/s; dLM {lc.get('dlm_speedup', float('nan')):.2f}x of it"
              + (f", best forced TPF {best[0]} {best[1]:.2f}x" if best else "")
              + f"; agreement with the PyTorch AR ({lc['ar_reference_dtype']}) {lc['agreement_with_ar']:.2f}")
    if "engine" in result:
        print(engine_table(result["engine"]))
    ov = result["overhead"]
    print(f"decoder overhead per forward: {100 * ov['overhead_fraction']:.0f}% "
          f"({ov['decoder_s_per_forward'] * 1e3:.1f} ms vs bare {ov['bare_forward_s'] * 1e3:.1f} ms)")
    print(f"-> {args.json}, {', '.join(plots)}")
    return 0


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def engine_table(e: dict) -> str:
    """The printout of :func:`edlm.bench.engine.engine_benchmark`'s result."""
    s = e["settings"]
    lines = [f"batch-1 AR, {s['max_new_tokens']} tokens x {s['prompts']} prompts, {s['threads']} threads; memory "
             f"bandwidth {e['memory_bandwidth_gb_s']:.1f} GB/s",
             f"{'backend':<10} {'dtype':<6} {'tokens/s':>9} {'bw bound':>9} {'compile s':>9}"]
    for r in e["ar"]:
        lines.append(f"{r['backend']:<10} {r['dtype']:<6} {r['tokens_per_s']:9.1f} "
                     f"{_num(r.get('bandwidth_bound_tokens_per_s'), '9.0f'):>9} {_num(r.get('compile_s'), '9.0f'):>9}")
    if "skipped" in e["llamacpp"]:
        lines.append(e["llamacpp"]["skipped"])
    lines.append(f"compiled forward ms, {e['forward_cache_len']}-token cache, by new columns:")
    for d, f in e["forward_ms"].items():
        lines.append(f"  {d:<5} " + "  ".join(f"{w:>2}: {ms:6.1f}" for w, ms in f.items()))
    for r in e["dlm"]:
        lines.append(f"dLM on the engine ({r['dtype']}), forced TPF {r['tpf_forced']}: {r['tokens_per_s']:.1f} "
                     f"tokens/s, {r['tokens_per_forward']:.2f} tokens/forward, {r['speedup_vs_best_ar']:.2f}x the "
                     "best AR")
    t = e["targets"]
    q8 = t["best_ar_over_llamacpp_q8"]
    lines.append(f"best AR: {e['ar_best'][0]} {e['ar_best'][1]}, {e['ar_best_tokens_per_s']:.1f} tokens/s; "
                 f"llama.cpp Q8_0 / best AR {_num(None if q8 is None else 1 / q8, '.2f')}; width-8 step / AR step "
                 f"{_num(t['width8_over_ar_step'], '.2f')}; forced TPF 4 / best AR "
                 f"{_num(t['tpf4_over_best_ar'], '.2f')}")
    return "\n".join(lines)


def profile_table(p: dict) -> str:
    """The printout of :func:`edlm.bench.engine.profile_engine`'s result: ms per forward by category."""
    cats = sorted({c for path in ("eager", "compiled", "engine") for d in p.get(path, {}).values()
                   for w in d.values() for c in w["by_category_ms"]})
    short = {c: c.split(" ")[0][:9] for c in cats}
    lines = [f"ms per forward on a {p['settings']['cache_len']}-token cache ({p['settings']['threads']} threads)",
             f"{'path':<9} {'dtype':<5} {'width':>5} {'wall':>7} " + " ".join(f"{short[c]:>9}" for c in cats)
             + f" {'outside':>8}"]
    for path in ("eager", "compiled", "engine"):
        for d, by_width in p.get(path, {}).items():
            for w, r in by_width.items():
                lines.append(f"{path:<9} {d:<5} {w:>5} {r['wall_ms']:7.1f} "
                             + " ".join(f"{r['by_category_ms'].get(c, 0.0):9.1f}" for c in cats)
                             + f" {r['outside_ops_ms']:8.1f}")
    lines.append("categories: " + "; ".join(f"{short[c]} = {c}" for c in cats) + "; outside = wall - profiled ops")
    return "\n".join(lines)


def cmd_bench_engine(args: argparse.Namespace) -> int:
    from edlm.assets import default_chat_prompts
    from edlm.bench.engine import engine_benchmark
    from edlm.loading import load
    from edlm.results import machine_info, write_json

    _set_threads(args)
    if args.profile:
        from edlm.bench.engine import profile_engine

        result = profile_engine(args.model, dtypes=tuple(args.dtypes.split(",")),
                                eager_dtypes=tuple(args.eager_dtypes.split(",")),
                                widths=(1, args.block, 2 * args.block))
        result["machine"] = machine_info()
        write_json(result, args.json)
        print(profile_table(result))
        print(f"-> {args.json}")
        return 0
    texts = args.prompt or default_chat_prompts()
    tokenizer = load(args.model, "fp32")
    ids = [tokenizer.encode(t, not args.no_chat) for t in texts]
    result = engine_benchmark(args.model, ids, args.max_new_tokens, dtypes=tuple(args.dtypes.split(",")),
                              eager_dtypes=tuple(args.eager_dtypes.split(",")), repeats=args.repeats,
                              block=args.block, tpfs=tuple(args.tpf), gguf=args.gguf,
                              llama_cpp=not args.no_llama_cpp)
    result["settings"].update(model=str(args.model), prompts_text=texts, chat_template=not args.no_chat)
    result["machine"] = machine_info()
    write_json(result, args.json)
    print(engine_table(result))
    print(f"-> {args.json}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    require("fastapi", "uvicorn", "sse_starlette", "openai", install=SERVE)
    from edlm.serve import load_serve_settings, serve

    _set_threads(args)
    given = decode_given(args)
    _auto_dtype(args, given.get("mode", "diffusion"), given.get("block_size"))
    settings = load_serve_settings(args.model, args.set, host=args.host, port=args.port, api_key=args.api_key,
                                   model_id=args.model_id, max_batch=args.max_batch, max_queue=args.max_queue,
                                   dtype=args.dtype, compile=args.compile or None)
    settings = dataclasses.replace(settings, decode=dataclasses.replace(settings.decode, **decode_given(args)))
    serve(args.model, settings)
    return 0


def cmd_serve_bench(args: argparse.Namespace) -> int:
    require("fastapi", "uvicorn", "sse_starlette", "openai", "httpx", install=SERVE)
    from edlm.bench.load import serve_bench
    from edlm.results import write_json
    from edlm.serve import load_serve_settings

    _set_threads(args)
    settings = load_serve_settings(args.model, args.set)
    result = serve_bench(args.model, n_requests=args.requests, concurrency=args.concurrency,
                         max_tokens=args.max_tokens, disconnect=args.disconnect, max_batch=args.max_batch,
                         settings=settings)
    write_json(result, args.json)
    print(f"{'run':<14} {'max_batch':>9} {'ok':>4} {'req/s':>7} {'tok/s':>8} {'p50 s':>6} {'rows/cohort':>11} "
          f"{'left':>4} {'cancelled':>9} {'mismatched':>10}")
    for name, run in result["runs"].items():
        server = run["server"]
        print(f"{name:<14} {run['max_batch']:>9} {run['succeeded']:>4} {run['requests_per_s']:7.2f} "
              f"{run['tokens_per_s']:8.1f} {run['latency_s'].get('p50', 0):6.2f} "
              f"{server['mean_rows_per_cohort']:11.1f} {run['disconnect']:>4} {server['cancelled']:>9} "
              f"{len(run.get('mismatched', [])):>10}")
    speedup = result["speedup"]
    print(f"batched / one at a time: {speedup['requests_per_s']:.2f}x requests/s, {speedup['tokens_per_s']:.2f}x "
          f"tokens/s  -> {args.json}")
    return 0


def cmd_bench_masks(args: argparse.Namespace) -> int:
    from edlm.bench.train import mask_memory
    from edlm.results import write_json

    result = mask_memory(tuple(args.lengths), block=args.block, device=args.device)
    if args.training_model:  # GPU: peak memory of a real training forward + backward, SDPA vs flex
        from edlm.bench.train import training_memory

        result["training"] = training_memory(args.training_model, tuple(args.lengths), block=args.block)
        for row in result["training"]["rows"]:
            print(f"training {row['attn_implementation']:>14} L={row['seq_len']:6d} "
                  f"{row.get('peak_mb', float('nan')):10.1f} MB {row.get('error', '')}")
    write_json(result, args.json)
    print(f"{'seq_len':>8} {'dense MB':>10} {'flex MB':>9} {'flex build s':>12}")
    for row in result["rows"]:
        flex = f"{row['flex_bytes'] / 2**20:9.3f}" if "flex_bytes" in row else f"{'n/a':>9}"
        build = f"{row['flex_build_s']:12.3f}" if "flex_build_s" in row else f"{'n/a':>12}"
        print(f"{row['seq_len']:8d} {row['dense_bytes'] / 2**20:10.1f} {flex} {build}")
    print(f"-> {args.json}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _require_task(args.task)
    from edlm.evals.run import evaluate
    from edlm.results import write_json

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
    from edlm.evals.run import plot_pareto, sweep
    from edlm.results import write_json

    _set_threads(args)
    result = sweep(args.model, args.task, thresholds=tuple(args.thresholds),
                   block_sizes=tuple(args.block_sizes) if args.block_sizes else (None,), limit=args.limit,
                   max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                   allow_unsandboxed_code=args.allow_unsandboxed_code)
    write_json(result, args.json)
    plot = Path(args.plot) if args.plot else Path(args.json).with_suffix(".png")
    plot_pareto(result, plot)
    print(f"{'block':>5} {'thr':>5} {'acc':>6} {'tok/s':>8} {'tok/fwd':>8}")
    for p in result["points"]:
        print(f"{p['block_size']:5d} {p['threshold']:5.2f} {p['acc']:6.3f} {p['tokens_per_s']:8.1f} "
              f"{p['tokens_per_forward']:8.2f}")
    print(f"   AR       {result['ar']['acc']:6.3f} {result['ar']['tokens_per_s']:8.1f}   -> {args.json}, {plot}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    import json

    from edlm.evals.run import results_table

    results = [json.loads(Path(f).read_text()) for f in args.results]
    text = results_table(results)
    if args.output:
        Path(args.output).write_text(text)
    print(text, end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.model == "embedded":
        return _embedded_demo(args)
    if args.adapter or args.prompt:
        raise EdlmError("--adapter and --prompt belong to the embedded demo (edlm demo); the miniature decodes its "
                        "held-out problems")
    from edlm.config import DecodeConfig
    from edlm.demo import run_miniature_demo
    from edlm.results import write_json

    out = args.output_dir or "runs/demo-miniature"
    args.logs.to_folder(out)
    _set_threads(args)
    bar = TrainingBar("convert")
    result = run_miniature_demo(out, per_family=args.problems, convert=args.convert, steps=args.steps,
                                decode=None if args.threshold is None else DecodeConfig(threshold=args.threshold),
                                progress=bar,
                                say=lambda msg: print(msg, flush=True))
    bar.close()
    one = result["by_batch"]["1"]
    fams = list(one["ar"]["per_family"])
    print(f"\nAR source vs its dLM on {result['n_problems']} held-out problems ({', '.join(fams)}), greedy, "
          f"dLM threshold {result['threshold']}, block {result['dlm_block_size']}:\n")
    spec = result.get("modes", {}).get("speculative", {})
    head = f"{'batch':>5} {'system':<8} {'dtype':<5} {'accuracy':>8} " + " ".join(f"{f:>7}" for f in fams)
    print(head + f" {'tok/fwd':>7} {'tokens/s':>9} {'speed-up':>8}")
    for batch, b in result["by_batch"].items():
        rows = [("AR", b["ar"], 1.0), ("dLM", b["dlm"], b["speedup"])]
        if batch in spec:
            rows.append(("dLM spec", spec[batch], spec[batch]["speedup"]))
        for name, r, speed in rows:
            print(f"{batch:>5} {name:<8} {r['dtype']:<5} {100 * r['accuracy']:7.1f}% "
                  + " ".join(f"{100 * r['per_family'][f]:6.1f}%" for f in fams)
                  + f" {r['tokens_per_forward']:7.2f} {r['tokens_per_s']:9.1f} {speed:7.2f}x")
    if spec:
        print("(dLM: diffusion decoding at the threshold; dLM spec: the same weights decoded speculatively, the "
              "diffusion head drafting and a causal pass verifying: the answers of their AR mode, by construction)")
    print("\ncurve (batch 1): " + ", ".join(
        f"thr {p['threshold']:g}: {100 * p['accuracy']:.1f}% at {p['tokens_per_forward']:.1f} tok/fwd, "
        f"{p['speedup']:.2f}x" for p in result["curve"]))
    print("\nsamples:")
    for rows in result["samples"].values():
        for s in rows[:1]:
            print(f"  {s['question']}\n    expected {s['answer']}\n    AR       {s['ar']}\n    dLM      {s['dlm']}")
    print(f"\nplot: {result['plot']}   dLM: {result['dlm_dir']}   (the whole experiment: edlm headline; "
          "the real SmolLM2-135M: edlm demo)")
    if args.json:
        out = {k: result[k] for k in ("ar", "dlm", "speedup", "n_problems", "machine", "by_batch", "curve",
                                      "threshold", "dlm_block_size")}
        if "1" in spec:
            out["speculative"] = {k: spec["1"][k] for k in ("accuracy", "tokens_per_s", "tokens_per_forward",
                                                            "speedup")}
        write_json(out, args.json)
    return 0


def _embedded_demo(args: argparse.Namespace) -> int:
    import textwrap

    from edlm.demo import run_drafter_demo
    from edlm.results import write_json

    if args.convert or args.steps:
        raise EdlmError("--convert and --steps belong to the miniature demo (edlm demo --model miniature); the "
                        "embedded demo uses a trained adapter: --adapter FOLDER (edlm drafter trains one)")
    _set_threads(args)
    prompts = [("prompt", p) for p in args.prompt] if args.prompt else None
    result = run_drafter_demo(args.adapter, prompts, max_new_tokens=args.max_new_tokens or 64, dtype=args.dtype,
                              threshold=args.threshold or 0.9)
    print(f"\n{result['model']}, {args.dtype}, greedy, at most {result['settings']['max_new_tokens']} new tokens, "
          "batch 1\n")
    for row in result["prompts"]:
        print(f"[{row['domain']}] {row['prompt']}")
        ar = row["ar"]
        print(f"  {'AR (source)':<12} {ar['tokens_per_s']:6.1f} tok/s {'':>12} {'':>6}  "
              + textwrap.shorten(ar["text"], 70, placeholder=" ..."))
        for name in ("speculative", "diffusion"):
            r = row[name]
            text = ("identical to the source" if r["identical"] else "DIFFERS from the source") \
                if name == "speculative" else textwrap.shorten(r["text"], 70, placeholder=" ...")
            print(f"  {name:<12} {r['tokens_per_s']:6.1f} tok/s {r['tokens_per_forward']:5.2f} tok/fwd "
                  f"{r['speedup']:5.2f}x  {text}")
        print()
    spec, diff = result["speculative"], result["diffusion"]
    print(f"all prompts: AR {result['ar']['tokens_per_s']:.1f} tok/s; speculative {spec['tokens_per_s']:.1f} tok/s "
          f"({spec['tokens_per_forward']:.2f} tok/fwd, {spec['speedup']:.2f}x, identical on "
          f"{100 * spec['identical']:.0f}% of prompts); diffusion {diff['tokens_per_s']:.1f} tok/s "
          f"({diff['tokens_per_forward']:.2f} tok/fwd, {diff['speedup']:.2f}x)")
    print("(speculative: the adapter drafts a block, the unmodified source verifies it, so its text is the "
          "source's; diffusion: the paper's threshold decoder, its text may differ)")
    if args.json:
        write_json(result, args.json)
    return 0


def _study_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.report_dir:
        overrides.append(f"report_dir={args.report_dir}")
    return overrides


def cmd_study(args: argparse.Namespace) -> int:
    import shlex

    require("matplotlib", install=PLOTS)
    from edlm.studies import collect, load_study_config, run_study, write_report

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
    from edlm.studies.headline import load_headline_config, run_headline

    cfg = load_headline_config(args.config, _study_overrides(args))
    args.logs.to_folder(cfg.study.output_dir)
    _set_threads(args)
    bars = Bars()
    result = run_headline(cfg, progress=lambda msg: print(msg, flush=True), new_bar=bars, config_path=args.config)
    bars.close()
    if args.ship:
        from edlm.studies.headline import ship_miniature

        print(f"shipped the source and the dLM into {ship_miniature(cfg, args.config)}")
    print()
    for system, targets in (("diffusion", result["targets"]), ("speculative", result.get("speculative_targets"))):
        for name, t in (targets or {}).items():
            value = t.get("value", t.get("value_points"))
            bar = t.get("bar", t.get("bar_points"))
            print(f"{system:<12} {name:<20} {value:8.2f}  (bar {bar:g})  {'met' if t['met'] else 'NOT met'}")
    print(f"report: {Path(cfg.study.report_dir) / 'report.md'}")
    return 0
