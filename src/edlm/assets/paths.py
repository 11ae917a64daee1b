"""Where edlm's files are: the package's own data, other packages' folders, the cache. Imports nothing heavy."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from edlm.errors import EdlmError

ASSETS_DIR = Path(__file__).resolve().parent
"""The data files shipped in the package: the bundled corpus and the headline miniature."""


def package_dir(module: str) -> Path | None:
    """The folder of an installed package, located without importing it; None when it is not installed.

    Data that edlm reads from other packages (benchmarks, corpora, the embedded GGUF) is found this way, so a
    package that would pull in heavy imports (or has broken ones) is never executed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that fails to import, or a bad name
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def require_package_dir(module: str, message: str) -> Path:
    """:func:`package_dir`, raising ``EdlmError(message)`` (which should say what to install) when it is missing."""
    folder = package_dir(module)
    if folder is None:
        raise EdlmError(message)
    return folder


def miniature_dir() -> Path:
    """The shipped miniature: ``source/`` (AR), ``dlm/`` (converted) and ``headline.yaml`` (how both were made)."""
    return ASSETS_DIR / "miniature"


def cache_dir() -> Path:
    """$EDLM_CACHE, else $XDG_CACHE_HOME/edlm, else ~/.cache/edlm."""
    if os.environ.get("EDLM_CACHE"):
        return Path(os.environ["EDLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "edlm"
