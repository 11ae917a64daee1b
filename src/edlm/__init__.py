"""edlm: turn a pretrained autoregressive LM into an efficient block-diffusion LM."""

from edlm.config import DataConfig, DecodeConfig, DiffusionConfig, LoraConfig, TrainConfig
from edlm.errors import ConfigError, EdlmError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataConfig", "DecodeConfig", "DiffusionConfig", "EdlmError", "LoraConfig", "TrainConfig",
           "__version__"]
