"""The console side of the CLI: where log records go, and the training progress bar."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

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


class Bars:
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
