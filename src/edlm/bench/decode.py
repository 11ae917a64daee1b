"""Decoding benchmarks: AR vs dLM decoding of the same prompts in one process, the forced-TPF ceiling and its
roofline, the decoder's overhead per forward; each returns a JSON-ready dict with settings and machine."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from edlm.assets import default_chat_prompts
from edlm.bench.engine import HEADLINE, engine_benchmark, engine_report
from edlm.bench.llamacpp import llamacpp_row
from edlm.bench.timing import agreement, forward_times
from edlm.checkpoints import best_device
from edlm.config import DecodeConfig, to_dict
from edlm.decode import generate
from edlm.harness import ar_system, cycled, dlm_system, run_interleaved, versus
from edlm.loading import load, load_ar
from edlm.model import source_spec
from edlm.quant import cast, cast_model, parse_dtypes
from edlm.results import machine_info, new_figure, save_figure
from edlm.table import Table, pct


def roofline(forward_s: dict[int, float], tokens_per_forward: float, block: int, batch: int = 1) -> dict[str, float]:
    """What bare forwards allow: AR makes ``batch`` tokens per 1-token forward (``t(1)``); the dLM makes
    ``batch x tokens_per_forward`` per block-wide forward (``t(block)``). Their ratio, ``TPF x t(1) / t(block)``, is
    the most a decoder at that TPF can gain over AR decoding at the same dtype.

    Args:
        forward_s: seconds of a forward of ``w`` new tokens, by ``w`` (see :func:`forward_times`); needs 1 and block.
        tokens_per_forward: tokens committed per forward per row.
        block: decoding block size (the width of every dLM step).
        batch: rows per forward.
    """
    t1, tb = forward_s[1], forward_s[block]
    return {"ar_tokens_per_s": batch / t1, "dlm_tokens_per_s": batch * tokens_per_forward / tb,
            "speedup": tokens_per_forward * t1 / tb}


def forward_overhead(dlm, prompt_len: int, block: int, repeats: int = 10) -> dict[str, float]:
    """Decoder time per forward (one token per forward, 4 blocks) vs a bare model forward of ``block`` tokens on a
    prompt-sized cache.

    The difference is the decoder's Python and bookkeeping work (mask building, commit policy, cache crop) plus its
    wider forwards: the prompt's prefill fused with the first step, and each finished block re-encoded in the
    next block's first forward (``docs/roofline/profile_decode.py`` splits the two).
    """
    prompt = [int(t) for t in torch.randint(10, 1000, (prompt_len,), generator=torch.Generator().manual_seed(0))]
    prompt = [t % (dlm.mask_id or 1) for t in prompt]
    cfg = DecodeConfig(max_new_tokens=4 * block, block_size=block, policy="fixed", tokens_per_step=1)
    generate(dlm, [prompt], cfg)  # warm-up; then the median of three runs
    dec = sorted((generate(dlm, [prompt], cfg) for _ in range(3)), key=lambda o: o.stats.seconds)[1]
    per_forward_decoder = dec.stats.seconds / dec.stats.forwards
    bare = forward_times(dlm.model, prompt_len, (block,), repeats=repeats, token=dlm.mask_id)[block]
    return {"decoder_s_per_forward": per_forward_decoder, "bare_forward_s": bare,
            "overhead_fraction": per_forward_decoder / bare - 1.0, "prompt_len": prompt_len, "block": block}


MODE_VARIANTS: dict[str, dict[str, Any]] = {
    "ar": {"mode": "ar"}, "speculative": {"mode": "speculative"},
    "speculative_separate_draft": {"mode": "speculative", "fused_draft": False}}
"""The converted model's non-diffusion decoding modes as :class:`~edlm.config.DecodeConfig` fields (speculative
with its draft fused into the verifying forward, and separate)."""


def decoding_modes(dlm, ids: list[list[int]], decode: DecodeConfig, repeats: int, ar_reference: list[list[int]],
                   ar_tokens_per_s: float) -> dict[str, Any]:
    """The converted model in each decoding mode (``DecodeConfig.mode``; speculative with its draft fused into the
    verifying forward and separate), batch 1: tokens/s, tokens per forward, agreement with the AR baseline's output
    and with the converted model's own ``ar`` mode (1.0 for greedy speculative by construction), and the speed-up
    over the AR baseline's ``ar_tokens_per_s``. ``decode`` holds every other setting (the diffusion mode is
    ``decode`` itself)."""
    systems = {name: dlm_system(dlm, dataclasses.replace(decode, **fields))
               for name, fields in {"diffusion": {"mode": "diffusion"}, **MODE_VARIANTS}.items()}
    runs = run_interleaved(systems, ids, 1, repeats=repeats, warmup=True)
    return {name: {**run.summary(), "speedup": run.tokens_per_s / ar_tokens_per_s,
                   "agreement_with_ar": agreement(run.sequences, ar_reference),
                   "agreement_with_ar_mode": agreement(run.sequences, runs["ar"].sequences)}
            for name, run in runs.items()}


def decode_benchmark(model_dir: str | os.PathLike, prompts: list[str] | None = None,
                     decode: DecodeConfig | None = None, batch_sizes: tuple[int, ...] = (1, 4),
                     sweep: tuple[float, ...] = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5, 0.3),
                     dtypes: tuple[str, ...] = ("fp32", "bf16", "int8"), repeats: int = 1, chat: bool = True,
                     ar_source: str | None = "auto", ceiling_tpf: tuple[int, ...] = (1, 2, 4, 8),
                     ceiling_block: int = 8, llama_cpp: bool = True,
                     gguf: str | os.PathLike | None = None, compile: bool = False,
                     engine_dtypes: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")) -> dict[str, Any]:
    """AR decoding vs dLM decoding of the same prompts, same process, after warm-up; what is compared is decoded
    interleaved, batch by batch, through :func:`edlm.harness.run_interleaved` (with ``repeats``, each system's
    median pass counts).

    At batch size n every prompt is decoded, n at a time (prompts are cycled when n exceeds their number), and the
    stats are summed over the calls; tokens per forward is per row. ``decode`` (None: ``DecodeConfig()``) is how
    the dLM decodes and how many tokens both systems make (``max_new_tokens``); the AR runs use it too (greedy
    unless it sets a temperature).

    AR runs the source model the converted folder was trained from (``ar_source='auto'``; ``None`` uses the
    converted weights causally), at each weight dtype in ``dtypes`` (``fp32``, ``bf16``, ``int8``: see
    :mod:`edlm.quant`), and its fastest dtype is the baseline; the dLM is likewise measured at each dtype and
    reported at its fastest. The threshold sweep runs at batch 1 with the dLM's best dtype and scores agreement
    with the AR output (greedy both).

    The ceiling (``result["ceiling"]``, skipped when ``ceiling_tpf`` is empty): at every batch size and dtype, AR and
    the dLM with the ``fixed`` policy forced to commit k tokens per forward (block ``ceiling_block``, EOS ignored so
    every run makes ``max_new_tokens`` per prompt), next to the roofline from bare forward times
    (:func:`roofline`): how fast a converted model would be here if it reached TPF k, and how much of that the
    decoder delivers.

    ``result["llama_cpp"]`` (with ``llama_cpp``): llama.cpp's greedy AR on the source's GGUF (``gguf``, else found
    from the source: :func:`edlm.bench.llamacpp.source_gguf`) at batch 1, the AR a CPU user would pick first, and the
    dLM's speed-up over it; ``{"skipped": reason}`` when llama-cpp-python or the GGUF is missing.

    ``result["engine"]`` (with ``compile``): :func:`edlm.bench.engine.engine_benchmark` at ``engine_dtypes``, whose
    headline fields (``ar_best_tokens_per_s``, ``ar_best``, ``llamacpp_tokens_per_s``,
    ``bandwidth_bound_tokens_per_s``) are also copied to the top level.
    """
    decode = decode or DecodeConfig()
    max_new_tokens = decode.max_new_tokens
    dtypes = parse_dtypes(",".join(dtypes))
    texts = prompts or default_chat_prompts()
    device = best_device()
    dlm32 = load(model_dir, "fp32", device=device)
    ids = [dlm32.encode(t, chat) for t in texts]
    spec = source_spec(model_dir) if ar_source == "auto" else ar_source
    # "embedded" resolves like None in load_ar; None here means the converted weights, decoded causally
    ar_model, ar_tok = load_ar(spec, "fp32", device=device) if spec is not None else (dlm32.model, dlm32.tokenizer)
    eos = dlm32.tokenizer.eos_token_id

    def generate_ar(model, ignore_eos=False):
        return ar_system(model, decode, None if ignore_eos else eos, ar_tok.pad_token_id)

    results: dict[str, Any] = {"by_batch": {}}
    models = {d: cast(dlm32, d) for d in dtypes}
    ar_models = {d: (ar_model if d == "fp32" else cast_model(ar_model, d, copy=True)) for d in dtypes}
    for n in batch_sizes:
        systems = {("ar", d): generate_ar(m) for d, m in ar_models.items()}
        systems.update({("dlm", d): dlm_system(m, decode) for d, m in models.items()})
        got = run_interleaved(systems, cycled(ids, n), n, repeats=repeats, warmup=True)
        results["by_batch"][str(n)] = versus({d: got[("ar", d)].summary() for d in ar_models},
                                             {d: got[("dlm", d)].summary() for d in models},
                                             threshold=decode.threshold)
    first = results["by_batch"][str(batch_sizes[0])]
    results.update(ar=first["ar"], dlm=first["dlm"], speedup=first["speedup"])

    best = models[first["dlm"]["dtype"]]

    def once(system) -> Any:  # an untimed reference decode, batch 1
        return run_interleaved({"run": system}, ids, 1)["run"]

    ar_ref = once(generate_ar(ar_models[first["ar"]["dtype"]]))
    outputs = run_interleaved({thr: dlm_system(best, dataclasses.replace(decode, threshold=thr)) for thr in sweep},
                              ids, 1, repeats=repeats, warmup=True)
    results["sweep"] = [{"threshold": thr, **out.summary(),
                         "agreement_with_ar": agreement(out.sequences, ar_ref.sequences)}
                        for thr, out in outputs.items()]
    results["modes"] = decoding_modes(best, ids, decode, repeats, ar_ref.sequences, results["ar"]["tokens_per_s"])
    if ceiling_tpf:
        cache_len = sorted(len(i) for i in ids)[len(ids) // 2] + max_new_tokens // 2  # a typical step's cache
        results["ceiling"] = ceiling(
            models, ar_models, ids, batch_sizes, ceiling_tpf, ceiling_block, max_new_tokens, cache_len, repeats,
            run_ar=lambda m: generate_ar(m, ignore_eos=True))
    if llama_cpp:
        one = results["by_batch"].get("1")  # the comparison is at batch 1 (llama.cpp decodes one row at a time)
        # agreement against the unquantized AR where measured: int8 AR greedy output drifts from fp32's by itself
        ref_dtype = "fp32" if "fp32" in ar_models else first["ar"]["dtype"]
        ref = ar_ref if ref_dtype == first["ar"]["dtype"] else once(generate_ar(ar_models[ref_dtype]))
        results["llama_cpp"] = llamacpp_row(model_dir, ids, max_new_tokens, repeats, ref.sequences,
                                            one["dlm"]["tokens_per_s"] if one else None, results.get("ceiling"), gguf)
        if "skipped" not in results["llama_cpp"]:
            results["llama_cpp"]["ar_reference_dtype"] = ref_dtype
    if compile:
        results["engine"] = engine_benchmark(model_dir, ids, max_new_tokens, dtypes=engine_dtypes, repeats=repeats,
                                             block=ceiling_block, ar_source=spec, gguf=gguf, llama_cpp=llama_cpp)
        results.update({k: results["engine"][k] for k in HEADLINE})
    results["overhead"] = forward_overhead(best, prompt_len=max(len(i) for i in ids), block=best.config.block_size)
    samples = outputs.get(decode.threshold) or once(dlm_system(best, decode))
    results["samples"] = [{"prompt": t, "dlm": dlm32.tokenizer.decode(s, skip_special_tokens=True),
                           "ar": ar_tok.decode(a, skip_special_tokens=True)}
                          for t, s, a in zip(texts, samples.sequences, ar_ref.sequences)]
    results["settings"] = {"model": str(model_dir), "ar_source": spec or "converted weights (causal)",
                           "prompts": texts, "max_new_tokens": max_new_tokens, "batch_sizes": list(batch_sizes),
                           "threshold": decode.threshold, "block_size": decode.block_size or dlm32.config.block_size,
                           "dtypes": list(dtypes), "repeats": repeats, "chat_template": chat,
                           "greedy": decode.temperature == 0, "decode": to_dict(decode),
                           "ceiling_tpf": list(ceiling_tpf), "ceiling_block": ceiling_block,
                           "llama_cpp": llama_cpp, "gguf": None if gguf is None else str(gguf),
                           "compile": compile, "engine_dtypes": list(engine_dtypes)}
    results["machine"] = machine_info()
    return results


def ceiling(models: dict[str, Any], ar_models: dict[str, Any], ids: list[list[int]], batch_sizes: tuple[int, ...],
            tpfs: tuple[int, ...], block: int, max_new_tokens: int, cache_len: int, repeats: int,
            run_ar) -> dict[str, Any]:
    """The forced-TPF ceiling of :func:`decode_benchmark` (see there): per batch size, ``forward_ms`` (bare forward
    of w new tokens per dtype), ``ar`` (per dtype, with ``best``), ``dlm`` (one row per dtype and forced TPF).
    ``run_ar(model)`` is the AR system (:func:`edlm.harness.ar_system`) of a model of ``ar_models``."""
    widths = tuple(sorted({1, block, 2 * block}))
    out: dict[str, Any] = {"block": block, "cache_len": cache_len, "by_batch": {}}
    for n in batch_sizes:
        fwd = {d: forward_times(m.model, cache_len, widths, batch=n, token=m.mask_id) for d, m in models.items()}
        systems = {("ar", d): run_ar(m) for d, m in ar_models.items()}
        for d, m in models.items():
            for k in tpfs:
                cfg = DecodeConfig(max_new_tokens=max_new_tokens, block_size=block, policy="fixed", tokens_per_step=k,
                                   ignore_eos=True)
                systems[("dlm", d, k)] = dlm_system(m, cfg)
        got = run_interleaved(systems, cycled(ids, n), n, repeats=repeats, warmup=True)
        ar = {}
        for d in ar_models:
            s = got[("ar", d)].summary()
            ar[d] = {**s, "roofline_tokens_per_s": n / fwd[d][1],
                     "fraction_of_roofline": s["tokens_per_s"] * fwd[d][1] / n}
        ar_best = max(ar, key=lambda d: ar[d]["tokens_per_s"])
        rows = []
        for d in models:
            for k in tpfs:
                s = got[("dlm", d, k)].summary()
                roof = roofline(fwd[d], s["tokens_per_forward"], block, n)
                rows.append({"dtype": d, "tpf_forced": k, **s, "roofline_tokens_per_s": roof["dlm_tokens_per_s"],
                             "fraction_of_roofline": s["tokens_per_s"] / roof["dlm_tokens_per_s"],
                             "roofline_speedup_vs_same_dtype_ar": roof["speedup"],
                             "speedup_vs_best_ar": s["tokens_per_s"] / ar[ar_best]["tokens_per_s"]})
        out["by_batch"][str(n)] = {
            "forward_ms": {d: {str(w): 1e3 * t for w, t in f.items()} for d, f in fwd.items()},
            "ar": {"best": ar_best, "by_dtype": ar}, "dlm": rows}
    return out


def plot_sweep(result: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG: dLM tokens/s vs agreement with AR across thresholds, and the AR point."""
    sweep = result["sweep"]
    fig, ax = new_figure()
    ax.plot([s["tokens_per_s"] for s in sweep], [s["agreement_with_ar"] for s in sweep], "o-", label="dLM")
    for s in sweep:
        ax.annotate(f"{s['threshold']:g} ({s['tokens_per_forward']:.1f} tok/fwd)",
                    (s["tokens_per_s"], s["agreement_with_ar"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.plot([result["ar"]["tokens_per_s"]], [1.0], "s", color="black", label=f"AR ({result['ar']['dtype']})")
    ax.set_xlabel("tokens/s (batch 1)")
    ax.set_ylabel("agreement with AR greedy output")
    ax.set_title(f"threshold sweep: {Path(result['settings']['model']).name}")
    save_figure(fig, ax, path)


def plot_ceiling(result: dict[str, Any], path: str | os.PathLike) -> None:
    """PNG, one panel per batch size: dLM tokens/s at each forced TPF per dtype (solid) and its roofline (dashed),
    with the best AR as a horizontal line."""
    by_batch = result["ceiling"]["by_batch"]
    fig, axes = new_figure(ncols=len(by_batch), figsize=(5.5 * len(by_batch), 4), squeeze=False)
    for ax, (n, c) in zip(axes[0], by_batch.items()):
        for i, d in enumerate(dict.fromkeys(r["dtype"] for r in c["dlm"])):
            rows = [r for r in c["dlm"] if r["dtype"] == d]
            color = f"C{i}"
            ax.plot([r["tpf_forced"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", color=color,
                    label=f"dLM {d}")
            ax.plot([r["tpf_forced"] for r in rows], [r["roofline_tokens_per_s"] for r in rows], "--", color=color,
                    alpha=0.6, label=f"roofline {d}")
        best = c["ar"]["best"]
        ax.axhline(c["ar"]["by_dtype"][best]["tokens_per_s"], color="black", label=f"AR {best} (best)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"forced tokens per forward (block {result['ceiling']['block']})")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"batch {n}")
    save_figure(fig, axes, path, fontsize=7)


def decode_report(result: dict[str, Any]) -> str:
    """What ``edlm bench decode`` prints: AR vs dLM by batch size, the ceiling, llama.cpp, the engine, overhead."""
    t = Table("batch", "AR tok/s", "dLM tok/s", "tok/fwd", "speedup")
    for n, row in result["by_batch"].items():
        t.add(n, f"{row['ar']['tokens_per_s']:.1f}", f"{row['dlm']['tokens_per_s']:.1f}",
              f"{row['dlm']['tokens_per_forward']:.2f}", f"{row['speedup']:.2f}")
    parts = [f"threshold {result['settings']['threshold']}:", t.text()]
    if "ceiling" in result:
        t = Table("batch", "<system", "forced", "tok/fwd", "tok/s", "roofline", "reached", "vs AR")
        for n, c in result["ceiling"]["by_batch"].items():
            for d, r in c["ar"]["by_dtype"].items():
                t.add(n, f"AR {d}" + ("*" if d == c["ar"]["best"] else ""), "", "1.00", f"{r['tokens_per_s']:.1f}",
                      f"{r['roofline_tokens_per_s']:.1f}", pct(r["fraction_of_roofline"], ".0f"), "")
            for r in c["dlm"]:
                t.add(n, f"dLM {r['dtype']}", r["tpf_forced"], f"{r['tokens_per_forward']:.2f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['roofline_tokens_per_s']:.1f}",
                      pct(r["fraction_of_roofline"], ".0f"), f"{r['speedup_vs_best_ar']:.2f}x")
        parts += [f"forced tokens per forward (fixed policy, block {result['ceiling']['block']}, EOS ignored; "
                  "* best AR):", t.text()]
    lc = result.get("llama_cpp")
    if lc and "skipped" in lc:
        parts.append(lc["skipped"])
    elif lc:
        best = max(lc.get("ceiling_speedups", {}).items(), key=lambda kv: kv[1], default=None)
        parts.append(f"llama.cpp AR (batch 1, {Path(lc['gguf']).name}, {lc['threads']} threads): "
                     f"{lc['tokens_per_s']:.1f} tokens/s; dLM {lc.get('dlm_speedup', float('nan')):.2f}x of it"
                     + (f", best forced TPF {best[0]} {best[1]:.2f}x" if best else "")
                     + f"; agreement with the PyTorch AR ({lc['ar_reference_dtype']}) {lc['agreement_with_ar']:.2f}")
    if "engine" in result:
        parts.append(engine_report(result["engine"]))
    ov = result["overhead"]
    parts.append(f"decoder overhead per forward: {100 * ov['overhead_fraction']:.0f}% "
                 f"({ov['decoder_s_per_forward'] * 1e3:.1f} ms vs bare {ov['bare_forward_s'] * 1e3:.1f} ms)")
    return "\n".join(parts)
