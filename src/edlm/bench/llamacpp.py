"""The AR baseline a CPU user would pick first: llama.cpp (through ``llama-cpp-python``) on the source's GGUF.

An optional row of ``edlm bench decode``: skipped with a one-line reason when ``llama_cpp`` is not installed or the
source has no GGUF. It decodes the same prompt token ids greedily, one row at a time, for exactly
``max_new_tokens`` tokens (EOS ignored, as the forced-TPF ceiling rows do), and times the whole call (prompt
evaluation included, as the PyTorch AR baseline is timed).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from edlm.assets import cache_dir
from edlm.assets.embedded import smollm2_gguf_path
from edlm.bench.timing import agreement
from edlm.harness import run_interleaved
from edlm.model import source_spec
from edlm.sampling import DecodeOutput, DecodeStats

logger = logging.getLogger(__name__)

INSTALL = "pip install llama-cpp-python (builds llama.cpp from source, a few minutes)"


def source_gguf(model_dir: str | os.PathLike, gguf: str | os.PathLike | None = None) -> Path | None:
    """The GGUF of a converted folder's AR source: ``gguf`` when given, the embedded SmolLM2's file when the
    source is the embedded default, a single ``*.gguf`` in the source folder, else None."""
    if gguf is not None:
        return Path(gguf)
    spec = source_spec(model_dir)
    if spec == "embedded":
        try:
            return smollm2_gguf_path()
        except FileNotFoundError:
            return None
    if spec and Path(spec).is_dir():
        found = sorted(Path(spec).glob("*.gguf"))
        return found[0] if len(found) == 1 else None
    return None


def skip_reason(gguf: Path | None) -> str | None:
    """Why the llama.cpp row cannot run here (None when it can)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama.cpp row skipped: llama-cpp-python is not installed ({INSTALL})"
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError) as e:  # installed without its dependencies, or its shared library does not load
        return f"llama.cpp row skipped: llama-cpp-python does not import ({e}); reinstall it: {INSTALL}"
    if gguf is None:
        return "llama.cpp row skipped: the AR source has no GGUF file (give one with --gguf PATH)"
    if not gguf.is_file():
        return f"llama.cpp row skipped: GGUF file {str(gguf)!r} does not exist"
    return None


def q8_0_gguf(gguf: Path) -> Path:
    """``gguf`` requantized to Q8_0 (8.5 bits per weight, int8's bytes) by llama.cpp's own quantizer, cached beside
    the edlm cache under the source file's name; written atomically (a temporary file, then a rename)."""
    import llama_cpp

    out = cache_dir() / "gguf" / f"{gguf.stem}.Q8_0.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True  # the embedded source ships as Q4_1
    params.nthread = max(1, os.cpu_count() or 1)
    saved = os.dup(2)  # llama.cpp prints a line per tensor on the C stderr: keep it off the terminal
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            failed = llama_cpp.llama_model_quantize(str(gguf).encode(), str(tmp).encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    if failed:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not requantize {gguf} to Q8_0")
    os.replace(tmp, out)
    return out


def load(gguf: Path, threads: int, n_ctx: int = 2048):
    """A quiet ``llama_cpp.Llama`` on ``threads`` CPU threads."""
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)


def greedy(llm, prompt: list[int], max_new_tokens: int) -> list[int]:
    """``max_new_tokens`` greedy tokens after ``prompt`` (EOS ignored), from an empty llama.cpp cache."""
    llm.reset()
    tokens = llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
    return [int(t) for t in islice(tokens, max_new_tokens)]


def system(llm, max_new_tokens: int):
    """llama.cpp's greedy AR as a system of the comparison harness (:mod:`edlm.harness`): each prompt decoded
    from an empty cache, one forward per token. It decodes the rows of a batch one after another, so give it
    batches of one."""

    def run(rows: list[list[int]]) -> DecodeOutput:
        sequences = [greedy(llm, p, max_new_tokens) for p in rows]
        tokens = sum(len(s) for s in sequences)
        return DecodeOutput(sequences=sequences, stats=DecodeStats(forwards=tokens, tokens=tokens, rows=len(rows)))

    return run


def llamacpp_ar(gguf: Path, ids: list[list[int]], max_new_tokens: int, threads: int, repeats: int = 1,
                n_ctx: int = 2048) -> dict[str, Any]:
    """Tokens/s of llama.cpp greedy AR decoding of ``ids`` one prompt at a time (batch 1), median of ``repeats``,
    through the comparison harness after one untimed prompt.

    Returns:
        ``tokens_per_s``, ``seconds``, ``tokens``, ``sequences`` (the new token ids of the median repeat),
        ``gguf``, ``threads``, ``llama_cpp`` (the package version).
    """
    import llama_cpp

    llm = load(gguf, threads, n_ctx)
    run = run_interleaved({"llama.cpp": system(llm, max_new_tokens)}, ids, 1, repeats=repeats,
                          warmup=True)["llama.cpp"]
    return {"tokens_per_s": run.tokens_per_s, "seconds": run.seconds, "tokens": run.tokens,
            "sequences": run.sequences, "gguf": str(gguf), "threads": threads,
            "llama_cpp": getattr(llama_cpp, "__version__", None)}


def llamacpp_row(model_dir: str | os.PathLike, ids: list[list[int]], max_new_tokens: int, repeats: int,
                 ar_reference: list[list[int]], dlm_tokens_per_s: float | None, ceiling: dict[str, Any] | None = None,
                 gguf: str | os.PathLike | None = None) -> dict[str, Any]:
    """``edlm bench decode``'s llama.cpp row: its batch-1 tokens/s on the source's GGUF, how often its greedy tokens
    agree with the PyTorch AR's (up to where that one stopped), and the dLM's speed-up over it (at the benchmark's
    threshold, and at each forced tokens-per-forward of the batch-1 ceiling). ``{"skipped": reason}`` when it
    cannot run here."""
    path = source_gguf(model_dir, gguf)
    reason = skip_reason(path)
    if reason is not None:
        logger.info(reason)
        return {"skipped": reason}
    run = llamacpp_ar(path, ids, max_new_tokens, threads=torch.get_num_threads(), repeats=repeats)
    sequences = run.pop("sequences")
    row = {**run, "agreement_with_ar": agreement([s[:len(r)] for s, r in zip(sequences, ar_reference)],
                                                  ar_reference)}
    if dlm_tokens_per_s is not None:
        row["dlm_speedup"] = dlm_tokens_per_s / run["tokens_per_s"]
    if ceiling is not None and "1" in ceiling["by_batch"]:
        row["ceiling_speedups"] = {f"{r['dtype']}@tpf{r['tpf_forced']}": r["tokens_per_s"] /
                                   run["tokens_per_s"] for r in ceiling["by_batch"]["1"]["dlm"]}
    return row
