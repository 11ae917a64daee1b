"""Writing results: atomic JSON, the machine and package versions a number was measured with, PNG figures."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch


def machine_info() -> dict[str, Any]:
    """CPU model and flags that decide kernel speed, thread count, torch version, GPU if any."""
    cpu, flags = platform.processor() or "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile",
                          "amx_bf16", "amx_int8")
                flags = sorted(f for f in wanted if f in have)
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "cpu_kernels": _cpu_kernels()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_kernels() -> str | None:
    """The vector kernels ATen dispatches to (``AVX512``, ``AVX2``, ...; ``ATEN_CPU_CAPABILITY`` overrides it).
    Training on two CPUs whose kernels differ gives different models from the same seed (docs/headline/analysis.md,
    "Reproducibility"): a report names them so that its numbers can be re-made under the same kernels."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


PROVENANCE_PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "datasets", "numpy", "peft",
                       "reasoning-gym")


def provenance() -> dict[str, Any]:
    """:func:`machine_info` plus the git commit of the working tree (``+dirty`` when it has changes) and the
    versions of the packages that decide the numbers: what a report needs to be re-run and compared."""
    info = machine_info()
    packages = {}
    for name in PROVENANCE_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["commit"] = (commit + ("+dirty" if dirty else "")) if commit else None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def write_json(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``result`` as indented JSON, atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def replace_dir(tmp: Path, dest: Path) -> Path:
    """Swap the finished folder ``tmp`` in as ``dest``, by renames: an interrupted call leaves the old ``dest`` (or
    ``dest.old``) and ``tmp`` whole, never half a folder. Returns ``dest``."""
    old = dest.with_name(dest.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def new_figure(**subplots: Any):
    """(figure, axes) for a PNG plot, on the non-interactive backend (``subplots``: ``plt.subplots`` arguments)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**{"figsize": (6, 4), **subplots})


def save_figure(fig, ax, path: str | os.PathLike, **legend: Any) -> None:
    """Grid and legend (``legend``: its arguments) on ``ax`` (every panel of ``axes.flat``), tight layout, write the
    PNG, free the figure."""
    import matplotlib.pyplot as plt

    for a in getattr(ax, "flat", [ax]):
        a.grid(alpha=0.3)
        a.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
