"""Benchmarks that write JSON: settings, machine and the baseline measured in the same process.

:mod:`edlm.bench.decode` times decoding (AR vs dLM, the forced-TPF ceiling, decoder overhead);
:mod:`edlm.bench.train` times training steps and measures the memory of masks and training forwards.
"""

from edlm.bench.decode import (
    ceiling,
    decode_benchmark,
    decoding_modes,
    forward_overhead,
    forward_times,
    plot_ceiling,
    plot_sweep,
    roofline,
)
from edlm.bench.train import mask_memory, train_throughput, training_memory

__all__ = ["ceiling", "decode_benchmark", "decoding_modes", "forward_overhead", "forward_times", "mask_memory",
           "plot_ceiling", "plot_sweep", "roofline", "train_throughput", "training_memory"]
