"""One comparison harness: several systems decode the same prompts, interleaved batch by batch, into typed runs.

A *system* is anything that turns one batch of token-id prompts into a :class:`~edlm.sampling.DecodeOutput`: the AR
source at a dtype, a converted model in a mode at a threshold, the gated drafter over its source, llama.cpp. The
runner gives every system the same batches in a rotating order, so a slow spell of the machine costs every system
alike instead of landing on whichever one was running, and times each call by the wall clock around it.

With ``repeats`` the whole interleaved pass runs that many times and each system keeps its median run; with
``warmup`` every system first decodes the first batch untimed (first calls pay one-time costs: allocator, kernels),
or with ``warmup="pass"`` a whole untimed pass (a compiled engine compiles each new shape on first sight).

Users: ``edlm bench decode`` (:mod:`edlm.bench.decode`), ``edlm bench engine`` and llama.cpp's rows
(:mod:`edlm.bench.engine`, :func:`edlm.bench.llamacpp.system`), ``edlm headline`` and ``edlm demo``
(:func:`edlm.studies.analysis.decode_interleaved`), the study's answer accuracy
(:func:`edlm.studies.analysis.answer_accuracy`), the gated-drafter study and its demo
(:func:`edlm.studies.drafter.measure_drafter`), ``edlm eval``'s generation tasks and ``edlm sweep``
(:mod:`edlm.evals.run`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from edlm.api import decode_until_stop, drafted_until_stop
from edlm.ar import ar_generate
from edlm.sampling import DecodeOutput

System = Callable[[list[list[int]]], DecodeOutput]
"""One batch of token-id prompts -> their continuations and the decoder's stats (``forwards`` is what counts)."""


@dataclass
class Run:
    """One system decoding a prompt set at one batch size."""

    system: Hashable
    batch: int
    sequences: list[list[int]]
    """New token ids per prompt, in the prompts' order."""
    texts: list[str] = field(default_factory=list)
    """The sequences as text, when the runner was given a ``detokenize``."""
    tokens: int = 0
    forwards: int = 0
    """Forwards of all calls (a batched forward counts once)."""
    row_forwards: int = 0
    """Forwards times the rows each decoded (a batched forward counts once per row)."""
    seconds: float = 0.0
    """Wall-clock seconds of the system's calls."""
    chunks: list[tuple[int, int, float]] = field(default_factory=list)
    """(tokens, forwards, seconds) of each call, in the order the batches were decoded (at batch 1: per prompt)."""

    @property
    def tokens_per_forward(self) -> float:
        """Tokens per forward per row."""
        return self.tokens / max(self.row_forwards, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> dict[str, float]:
        """The numbers a benchmark row reports."""
        return {"tokens_per_s": self.tokens_per_s, "latency_s": self.seconds, "tokens": self.tokens,
                "forwards": self.forwards, "tokens_per_forward": self.tokens_per_forward}


def dlm_system(dlm, cfg) -> System:
    """A converted model decoding in ``cfg.mode`` (:func:`edlm.decode.generate`); with ``cfg.stop``, a row stops
    at the first block boundary after one of its stop strings (:func:`edlm.api.decode_until_stop`, which is
    :func:`edlm.decode.generate` when there are none)."""
    return lambda rows: decode_until_stop(dlm, rows, cfg)


def ar_system(model, cfg, eos_id: int | None, pad_id: int | None = None, banned: list[int] | None = None) -> System:
    """An AR model decoding with a KV cache, ``cfg``'s length and sampling (:func:`edlm.ar.ar_generate`)."""
    return lambda rows: ar_generate(model, rows, cfg, eos_id, pad_id=pad_id, banned=banned)


def drafter_system(source, drafter, tokenizer, cfg) -> System:
    """The unmodified ``source`` decoding with a block ``drafter`` (:func:`edlm.api.drafted_until_stop`): the
    source's own text; ``forwards`` counts the source's forwards."""
    return lambda rows: drafted_until_stop(source, drafter, tokenizer, rows, cfg)


def versus(ar: dict[str, dict[str, Any]], dlm: dict[str, dict[str, Any]], **dlm_fields: Any) -> dict[str, Any]:
    """The AR baseline and the dLM at one batch size, each measured at every weight dtype (``{dtype: numbers}``)
    and reported at its fastest: ``{"ar": {numbers, dtype, all_dtypes}, "dlm": {numbers, dtype, dlm_fields,
    all_dtypes}, "speedup"}``, the speed-up dividing the two fastest."""

    def fastest(by_dtype: dict[str, dict[str, Any]], **fields: Any) -> dict[str, Any]:
        best = max(by_dtype, key=lambda d: by_dtype[d]["tokens_per_s"])
        return {**by_dtype[best], "dtype": best, **fields, "all_dtypes": by_dtype}

    a, d = fastest(ar), fastest(dlm, **dlm_fields)
    return {"ar": a, "dlm": d, "speedup": d["tokens_per_s"] / a["tokens_per_s"]}


def cycled(prompts: list[list[int]], batch: int) -> list[list[int]]:
    """``prompts``, repeated from the start until there are at least ``batch`` of them (a batch size above the
    number of prompts still decodes full batches)."""
    return [prompts[i % len(prompts)] for i in range(max(batch, len(prompts)))]


def run_interleaved(systems: dict[Hashable, System], prompts: list[list[int]], batch: int,
                    order: list[int] | None = None, detokenize: Callable[[list[int]], str] | None = None,
                    progress: Callable[[int, int], None] | None = None, repeats: int = 1,
                    warmup: bool | str = False) -> dict[Hashable, Run]:
    """Decode ``prompts`` with every system, ``batch`` prompts at a time in ``order`` (default: as given); the
    systems take turns on each batch, the first one rotating from batch to batch.

    Args:
        systems: ``{name: system}``; the names key the result.
        detokenize: turns a sequence into the text stored in :attr:`Run.texts` (None: no texts).
        progress: called with (prompts done, prompts in all) after every batch.
        repeats: passes over the prompts; each system keeps the run of median seconds.
        warmup: every system decodes the first batch once, untimed, before the timed passes; ``"pass"``: a whole
            untimed pass.
    """
    order = list(range(len(prompts))) if order is None else list(order)
    if warmup == "pass":
        _one_pass(systems, prompts, batch, order)
    elif warmup:
        for system in systems.values():
            system([prompts[j] for j in order[:batch]])
    passes = [_one_pass(systems, prompts, batch, order, progress) for _ in range(max(repeats, 1))]
    runs = {name: sorted((p[name] for p in passes), key=lambda r: r.seconds)[len(passes) // 2] for name in systems}
    if detokenize is not None:
        for r in runs.values():
            r.texts = [detokenize(s) for s in r.sequences]
    return runs


def _one_pass(systems: dict[Hashable, System], prompts: list[list[int]], batch: int, order: list[int],
              progress: Callable[[int, int], None] | None = None) -> dict[Hashable, Run]:
    names = list(systems)
    runs = {name: Run(name, batch, [[] for _ in prompts]) for name in names}
    for k, start in enumerate(range(0, len(order), batch)):
        chunk = order[start:start + batch]
        rows = [prompts[j] for j in chunk]
        turn = k % len(names)
        for name in names[turn:] + names[:turn]:
            t0 = time.perf_counter()
            out = systems[name](rows)
            seconds = time.perf_counter() - t0
            r = runs[name]
            tokens = sum(len(s) for s in out.sequences)
            r.tokens += tokens
            r.forwards += out.stats.forwards
            r.row_forwards += out.stats.forwards * len(chunk)
            r.seconds += seconds
            r.chunks.append((tokens, out.stats.forwards, seconds))
            for j, seq in zip(chunk, out.sequences):
                r.sequences[j] = list(seq)
        if progress is not None:
            progress(min(start + batch, len(order)), len(order))
    return runs
