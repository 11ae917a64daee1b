"""The study's AR source model, trained from scratch by edlm's one training loop (:func:`edlm.train.train` with
the ``ar`` objective): the same data pipeline, seeded data order, learning-rate schedule and checkpoints as a
conversion run, so the source model and its conversions see their data the same way.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from edlm.config import TrainConfig
from edlm.train import AR_DONE_FILE, ProgressFn, latest_checkpoint, train


def is_trained(out: str | os.PathLike) -> bool:
    """Whether ``out`` holds a finished source model (its done-file is written last)."""
    return (Path(out) / AR_DONE_FILE).is_file()


def pretrain_ar(cfg: TrainConfig, out: str | os.PathLike, progress: ProgressFn | None = None) -> Path:
    """Train ``cfg.model`` autoregressively on ``cfg.data`` into ``out``, a Hugging Face folder (``cfg.output_dir``
    is replaced by ``out``).

    A finished folder is left alone; an interrupted run resumes from its latest checkpoint in ``out`` (an error if
    its settings differ).
    """
    out = Path(out)
    if is_trained(out):
        return out
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    return train(cfg, "ar", resume=latest_checkpoint(out) is not None, progress=progress)
