"""Command line: each command is a thin mapping from flags to a typed library function."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from edlm.errors import EdlmError, require

logger = logging.getLogger("edlm")

LOG_FILE = "edlm.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Logs:
    """Where the log records of one CLI call go.

    The console (stderr) shows INFO and up, until a command with an output folder calls :meth:`to_folder`: from then
    on the records (INFO and up) go to ``FOLDER/edlm.log`` and the console keeps warnings and errors only, so that
    it shows the command's own output (progress bar, results). ``--verbose`` shows everything on the console.
    """

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.console = logging.StreamHandler()
        self.console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
        self.handlers: list[logging.Handler] = [self.console]
        root = logging.getLogger()
        root.setLevel(logging.DEBUG if verbose else logging.INFO)
        root.addHandler(self.console)
        for noisy in ("httpx", "urllib3", "datasets", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        if not verbose:  # the libraries' own bars: "Loading weights", "Writing model shards", "Generating split"
            import datasets
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            datasets.disable_progress_bars()

    def to_folder(self, folder: str | Path) -> None:
        """Send the log records to ``folder/edlm.log`` (appended) instead of the console."""
        path = Path(folder) / LOG_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        self.handlers.append(handler)
        if not self.verbose:
            self.console.setLevel(logging.WARNING)

    def close(self) -> None:
        for handler in self.handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()


class TrainingBar:
    """A tqdm bar fed by the ``progress(step, total, info)`` callback of :func:`edlm.train.convert`; prints one
    line per checkpoint."""

    def __init__(self, desc: str = "convert") -> None:
        self.bar = None
        self.desc = desc

    def __call__(self, step: int, total: int, info: dict) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, initial=step - 1, desc=self.desc, unit="step", dynamic_ncols=True)
        self.bar.update(1)
        if "loss" in info:
            self.bar.set_postfix(loss=f"{info['loss']:.4f}", tok_s=f"{info['tokens_per_s']:.0f}")
        if "checkpoint" in info:
            self.bar.write(f"{Path(info['checkpoint']).name} saved", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------- commands


DTYPE_NAMES = ["fp32", "bf16", "int8"]  # edlm.quant.DTYPES, named here so building the parser imports no torch

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


def _decode_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                  **defaults: object) -> None:
    """One flag per :class:`edlm.config.DecodeConfig` field (``--threshold``, ``--block-size``, ``--mode`` ...), its
    help taken from the field's docstring. A flag not given stays None, so the defaults are DecodeConfig's, except
    for the few a command sets in ``defaults`` (e.g. a benchmark's shorter ``max_new_tokens``). ``only`` / ``skip``
    choose the fields."""
    import dataclasses
    import types
    import typing

    from edlm.config import DECODE_MODES, DecodeConfig, field_docs

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


def _decode_given(args: argparse.Namespace) -> dict[str, object]:
    """The decoding flags given on the command line (:func:`_decode_flags`), by DecodeConfig field name."""
    import dataclasses

    from edlm.config import DecodeConfig

    return {f.name: getattr(args, f.name) for f in dataclasses.fields(DecodeConfig)
            if getattr(args, f.name, None) is not None}


def _decode_config(args: argparse.Namespace, **fields: object):
    """The :class:`edlm.config.DecodeConfig` of the decoding flags given (:func:`_decode_flags`), then ``fields``."""
    from edlm.config import DecodeConfig

    return DecodeConfig(**{**_decode_given(args), **{k: v for k, v in fields.items() if v is not None}})


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


def cmd_generate(args: argparse.Namespace) -> int:
    _set_threads(args)
    cfg = _decode_config(args)
    prompts = args.prompt or []
    if not prompts:
        raise EdlmError("give at least one --prompt TEXT")
    from edlm.assets import best_device
    from edlm.quant import load

    dlm = load(args.model, args.dtype, device=best_device())
    texts, stats = dlm.generate(prompts, cfg, chat=not args.no_chat)
    for prompt, text in zip(prompts, texts):
        if len(prompts) > 1:
            print(f"### {prompt}")
        print(text)
    if args.stats:
        print(f"[{stats.tokens} tokens, {stats.forwards} forwards, {stats.tokens_per_forward:.2f} tokens/forward, "
              f"{stats.tokens_per_s:.1f} tokens/s, {stats.seconds:.2f} s]", file=sys.stderr)
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
    cfg = _decode_config(args)
    result = decode_benchmark(args.model, prompts=args.prompt, decode=cfg, batch_sizes=tuple(args.batch_sizes),
                              sweep=tuple(args.sweep), dtypes=parse_dtypes(args.dtypes), repeats=args.repeats,
                              chat=not args.no_chat, ar_source=None if args.ar_model == "self" else args.ar_model,
                              ceiling_tpf=tuple(args.ceiling_tpf), ceiling_block=args.ceiling_block,
                              llama_cpp=not args.no_llama_cpp, gguf=args.gguf)
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
              + f"; agreement with the PyTorch AR {lc['agreement_with_ar']:.2f}")
    ov = result["overhead"]
    print(f"decoder overhead per forward: {100 * ov['overhead_fraction']:.0f}% "
          f"({ov['decoder_s_per_forward'] * 1e3:.1f} ms vs bare {ov['bare_forward_s'] * 1e3:.1f} ms)")
    print(f"-> {args.json}, {', '.join(plots)}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    require("fastapi", "uvicorn", "sse_starlette", "openai", install=SERVE)
    from edlm.serve import load_serve_settings, serve

    _set_threads(args)
    settings = load_serve_settings(args.model, args.set, host=args.host, port=args.port, api_key=args.api_key,
                                   model_id=args.model_id, max_batch=args.max_batch, max_queue=args.max_queue,
                                   dtype=args.dtype)
    settings = dataclasses.replace(settings, decode=dataclasses.replace(settings.decode, **_decode_given(args)))
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
    result = evaluate(args.model, args.task, limit=args.limit, ar=args.ar, n_samples=args.samples,
                      decode=_decode_config(args), max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                      dtype=args.dtype)
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
                   max_new_tokens=args.max_new_tokens, chat=not args.no_chat)
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
    head = f"{'batch':>5} {'system':<6} {'dtype':<5} {'accuracy':>8} " + " ".join(f"{f:>7}" for f in fams)
    print(head + f" {'tok/fwd':>7} {'tokens/s':>9} {'speed-up':>8}")
    for batch, b in result["by_batch"].items():
        for system in ("ar", "dlm"):
            r = b[system]
            speed = f"{b['speedup']:7.2f}x" if system == "dlm" else f"{1:7.2f}x"
            print(f"{batch:>5} {system.upper() if system == 'ar' else 'dLM':<6} {r['dtype']:<5} "
                  f"{100 * r['accuracy']:7.1f}% " + " ".join(f"{100 * r['per_family'][f]:6.1f}%" for f in fams)
                  + f" {r['tokens_per_forward']:7.2f} {r['tokens_per_s']:9.1f} {speed}")
    print("\ncurve (batch 1): " + ", ".join(
        f"thr {p['threshold']:g}: {100 * p['accuracy']:.1f}% at {p['tokens_per_forward']:.1f} tok/fwd, "
        f"{p['tokens_per_s'] / one['ar']['tokens_per_s']:.2f}x" for p in result["curve"]))
    print("\nsamples:")
    for rows in result["samples"].values():
        for s in rows[:1]:
            print(f"  {s['question']}\n    expected {s['answer']}\n    AR       {s['ar']}\n    dLM      {s['dlm']}")
    print(f"\nplot: {result['plot']}   dLM: {result['dlm_dir']}   (the whole experiment: edlm headline; "
          "the embedded SmolLM2-135M: edlm demo --model embedded)")
    if args.json:
        write_json({k: result[k] for k in ("ar", "dlm", "speedup", "n_problems", "machine", "by_batch", "curve",
                                            "threshold", "dlm_block_size")}, args.json)
    return 0


def _embedded_demo(args: argparse.Namespace) -> int:
    import textwrap

    from edlm.demo import run_embedded_demo

    if args.json or args.convert:
        raise EdlmError("--json and --convert belong to the miniature demo; drop them with --model embedded "
                        "(its conversion length is --steps)")
    out = args.output_dir or "runs/demo"
    args.logs.to_folder(out)
    bar = TrainingBar()
    result = run_embedded_demo(out, steps=args.steps or 30, prompts=args.prompt, decode=_decode_config(args),
                               progress=bar)
    bar.close()
    print(f"\n{'system':<10} {'tokens/s':>9} {'tok/fwd':>8}  text")
    for row in result["rows"]:
        text = " ".join(row["text"].split())[:70] or "(whitespace only)"
        print(f"{row['system']:<10} {row['tokens_per_s']:9.1f} {row['tokens_per_forward']:8.2f}  {text}")
    print()
    print(textwrap.fill(result["note"], width=110))
    print(f"\nconverted model: {result['output_dir']}  (try: edlm generate --model {result['output_dir']} "
          "--prompt ... --stats)")
    return 0


def _study_arguments(p: argparse.ArgumentParser, kind: str, example: str) -> None:
    """The flags of the study-style commands (``edlm study``, ``edlm headline``); see :func:`_study_overrides`."""
    p.add_argument("--config", default=f"configs/{kind}.yaml", help=f"{kind} YAML (default: configs/{kind}.yaml)")
    p.add_argument("--output-dir", help="runs folder (overrides output_dir)")
    p.add_argument("--report-dir", help="report folder (overrides report_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting, e.g. --set {example}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")


def _study_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.report_dir:
        overrides.append(f"report_dir={args.report_dir}")
    return overrides


class _Bars:
    """One training bar at a time: a new run's bar closes the previous one."""

    def __init__(self) -> None:
        self.bars: list[TrainingBar] = []

    def __call__(self, desc: str) -> TrainingBar:
        self.close()
        self.bars = [TrainingBar(desc)]
        return self.bars[0]

    def close(self) -> None:
        for bar in self.bars:
            bar.close()


def cmd_study(args: argparse.Namespace) -> int:
    import shlex

    require("matplotlib", install=PLOTS)
    from edlm.studies import collect, load_study_config, run_study, write_report

    cfg = load_study_config(args.config, _study_overrides(args))
    args.logs.to_folder(cfg.output_dir)
    _set_threads(args)
    bars = _Bars()
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
    bars = _Bars()
    result = run_headline(cfg, progress=lambda msg: print(msg, flush=True), new_bar=bars, config_path=args.config)
    bars.close()
    if args.ship:
        from edlm.studies.headline import ship_miniature

        print(f"shipped the source and the dLM into {ship_miniature(cfg, args.config)}")
    print()
    for name, t in result["targets"].items():
        value = t.get("value", t.get("value_points"))
        bar = t.get("bar", t.get("bar_points"))
        print(f"{name:<20} {value:8.2f}  (bar {bar:g})  {'met' if t['met'] else 'NOT met'}")
    print(f"report: {Path(cfg.study.report_dir) / 'report.md'}")
    return 0


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edlm", description=__doc__)
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

    p = sub.add_parser("generate", help="generate text with a converted model")
    p.add_argument("--model", required=True, help="converted model folder (output of edlm convert)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    _decode_flags(p)
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--stats", action="store_true", help="print tokens/s and tokens per forward")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                   help="weights: fp32, bf16 or int8 (quantized Linear layers); edlm bench measures which is fastest")

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
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: per task (16 arithmetic, 256 code)")
    _decode_flags(p, skip=("stop", "max_new_tokens"))
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the result here")

    p = sub.add_parser("sweep", help="accuracy vs tokens/s across thresholds and block sizes (JSON + Pareto PNG)")
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.95, 0.9, 0.8, 0.7, 0.5])
    p.add_argument("--block-sizes", type=int, nargs="+", default=None, help="default: the model's block size")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", required=True)
    p.add_argument("--plot", help="PNG path (default: JSON path with .png)")

    p = sub.add_parser("table", help="markdown table of edlm eval JSON results")
    p.add_argument("results", nargs="+", help="JSON files written by edlm eval --json")
    p.add_argument("--output", help="also write the table here")

    about = ("AR vs dLM side by side. Default (miniature): the headline miniature shipped in the package (an AR "
             "source pretrained here on three task families and its converted dLM) on held-out problems: accuracy, "
             "tokens per forward, tokens/s, speed-up. --model embedded: convert SmolLM2-135M briefly and compare.")
    p = sub.add_parser("demo", help=about, description=about)
    p.add_argument("--model", choices=["miniature", "embedded"], default="miniature")
    p.add_argument("--output-dir", default=None, help="default: runs/demo-miniature (miniature), runs/demo (embedded)")
    p.add_argument("--problems", type=int, default=50, help="miniature: held-out problems per task family")
    p.add_argument("--convert", action="store_true",
                   help="miniature: convert the shipped source again (the headline's settings) instead of using the "
                        "shipped dLM")
    p.add_argument("--steps", type=int, default=None,
                   help="conversion steps (embedded: default 30, about 10 s each; miniature --convert: default 600)")
    p.add_argument("--json", help="miniature: write the comparison as JSON to this file")
    p.add_argument("--prompt", action="append", help="embedded: prompt text (repeat); default: two built-in prompts")
    _decode_flags(p, only=("max_new_tokens", "threshold"), max_new_tokens=48)
    p.add_argument("--threads", type=int, default=None, help="CPU threads")

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
    p.add_argument("--model", required=True, help="converted model folder")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $EDLM_API_KEY)")
    p.add_argument("--model-id", help="name served by /v1/models (default: the folder's name)")
    p.add_argument("--max-batch", type=int, help="most requests decoded in one batched call (default 16)")
    p.add_argument("--max-queue", type=int, help="requests that may wait; more get HTTP 429 (default 64)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="weights: fp32 (default), bf16 or int8; same as --set dtype=...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any ServeSettings field, e.g. --set max_tokens_limit=1024 --set threshold=0.8")
    _decode_flags(p, skip=("seed",))  # the server's defaults for requests; a request's own fields win

    about = ("benchmarks that write JSON, each measured side by side with its baseline in one process: decode (the "
             "default: dLM vs AR decoding), train, masks, load (the server). Old names: bench-train, bench-masks, "
             "serve-bench.")
    p = sub.add_parser("bench", help=about, description=about)
    bench = p.add_subparsers(dest="bench_command", required=True, metavar="{decode,train,masks,load}")

    p = bench.add_parser("decode", help="dLM decoding vs AR decoding of the same prompts (JSON + PNG sweep)")
    p.add_argument("--model", required=True, help="converted model folder")
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--plot", help="sweep plot PNG (default: JSON path with .png)")
    p.add_argument("--prompt", action="append", help="prompt text (repeat); default: a few built-in prompts")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    _decode_flags(p, skip=("stop",), max_new_tokens=64)
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
    p.add_argument("--no-llama-cpp", action="store_true",
                   help="skip the llama.cpp AR row (it runs when llama-cpp-python is installed and a GGUF is found)")
    p.add_argument("--ar-model", default="auto",
                   help="AR baseline: 'auto' (the source in train_config.yaml), a folder, or 'self'")
    p.add_argument("--no-chat", action="store_true")
    p.add_argument("--threads", type=int, default=None)

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
    p.add_argument("--threads", type=int, default=None, help="CPU threads")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any ServeSettings field")
    return parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "convert": cmd_convert, "generate": cmd_generate, "eval": cmd_eval, "sweep": cmd_sweep, "table": cmd_table,
    "demo": cmd_demo, "study": cmd_study, "headline": cmd_headline, "serve": cmd_serve,
    "bench decode": cmd_bench, "bench train": cmd_bench_train, "bench masks": cmd_bench_masks,
    "bench load": cmd_serve_bench}

# Earlier command names, still accepted: the words they stand for now.
ALIASES = {"bench-train": ["bench", "train"], "bench-masks": ["bench", "masks"], "serve-bench": ["bench", "load"]}
BENCH_COMMANDS = ("decode", "train", "masks", "load")


def canonical_argv(argv: list[str]) -> list[str]:
    """``argv`` with old command names replaced (:data:`ALIASES`) and ``edlm bench`` without a benchmark name read
    as ``edlm bench decode`` (what ``edlm bench`` meant before it had sub-commands)."""
    argv = list(argv)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if at is None:
        return argv
    if argv[at] in ALIASES:
        argv[at:at + 1] = ALIASES[argv[at]]
    elif argv[at] == "bench" and (at + 1 == len(argv) or argv[at + 1] not in BENCH_COMMANDS + ("-h", "--help")):
        argv.insert(at + 1, "decode")
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(canonical_argv(sys.argv[1:] if argv is None else argv))
    command = f"bench {args.bench_command}" if args.command == "bench" else args.command
    args.logs = Logs(args.verbose)
    try:
        return COMMANDS[command](args)
    except EdlmError as e:
        print(f"edlm {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        args.logs.close()


if __name__ == "__main__":
    sys.exit(main())
