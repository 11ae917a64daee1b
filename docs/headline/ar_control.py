"""The AR control of a conversion: the same data, steps, batch and learning rate, the AR next-token loss only.

Usage: python docs/headline/ar_control.py TRAIN_CONFIG.yaml OUT_DIR [KEY=VALUE ...]
(e.g. runs/headline/exp/G/train_config.yaml runs/headline/exp/ARC num_threads=1; score it with
scripts/ar_probe.py OUT_DIR). Resumes an interrupted run. Written for docs/headline_joint/analysis.md (issue 14).
"""

import sys
from pathlib import Path

from edlm.config import load_train_config
from edlm.train import latest_checkpoint, train


def main() -> None:
    config, out, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cfg = load_train_config(config, [f"output_dir={out}", *overrides])
    print("saved", train(cfg, "ar", resume=latest_checkpoint(out) is not None))


if __name__ == "__main__":
    main()
