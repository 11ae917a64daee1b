"""What isolation costs per program: ``python docs/sandbox/overhead.py [--runs 40] [--parent-mb 0] [--json OUT]``.

Runs one trivial program (``pass``) through ``edlm.evals.sandbox.run_program`` under every isolation that works here
and under "none", the unisolated path (the code that ran every program before isolation existed), interleaved in
a shuffled order each round, so that load from other processes and the kernel's deferred clean-up of the previous
run's namespaces hit all alike. Prints and writes the median and 90th percentile wall time per run and
the median overhead over "none". ``--parent-mb`` first fills this process with that much touched memory, as a loaded
model would: the namespaces backend forks twice more than "none", and a fork copies the parent's page tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

from edlm.evals import isolation
from edlm.evals.sandbox import run_program


def measure(runs: int, parent_mb: int) -> dict:
    ballast = bytearray(parent_mb * 2**20)
    for i in range(0, len(ballast), 4096):  # touch every page, so that a fork has page tables to copy
        ballast[i] = 1
    kinds = [k for k in ("namespaces", "bwrap") if not isolation.try_isolation(k)] + ["none"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    order = random.Random(0)
    for _ in range(runs):
        for kind in order.sample(kinds, len(kinds)):
            start = time.perf_counter()
            result = run_program("pass\n", sandbox=kind)
            times[kind].append(time.perf_counter() - start)
            assert result.passed, (kind, result.detail)
    base = statistics.median(times["none"])
    rows = {k: {"median_s": statistics.median(t), "p90_s": statistics.quantiles(t, n=10)[-1],
                "overhead_s": statistics.median(t) - base} for k, t in times.items()}
    return {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
            "settings": {"runs": runs, "parent_mb": parent_mb, "program": "pass"},
            "machine": {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
                        "root": os.geteuid() == 0, "load_1min": os.getloadavg()[0]},
            "per_run": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--parent-mb", type=int, default=0)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    result = measure(args.runs, args.parent_mb)
    for kind, row in result["per_run"].items():
        print(f"{kind:11s} median {row['median_s'] * 1e3:6.1f} ms  p90 {row['p90_s'] * 1e3:6.1f} ms  "
              f"overhead {row['overhead_s'] * 1e3:+6.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
