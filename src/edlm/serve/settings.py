"""What ``edlm serve`` can be told: :class:`ServeSettings` and how ``--set key=value`` builds it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edlm.config import DecodeConfig, apply_overrides, from_dict
from edlm.errors import ConfigError, EdlmError
from edlm.quant import check_dtype

# Flat keys of the old settings, still accepted by ``--set`` and load_serve_settings (``threshold=0.8`` is
# ``decode.threshold=0.8``).
DECODE_ALIASES = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "mode": "mode",
                  "threshold": "threshold", "block_size": "block_size", "policy": "policy",
                  "tokens_per_step": "tokens_per_step"}


@dataclass
class ServeSettings:
    """Everything ``edlm serve`` can be told; ``--set key=value`` reaches any field (``--set decode.X=...`` a
    decoding default)."""

    model_id: str = "edlm"
    """Name listed by ``/v1/models`` and expected in a request's ``model`` field (the CLI uses the folder name)."""
    host: str = "127.0.0.1"
    """Interface to listen on; the default serves this machine only."""
    port: int = 8000
    """TCP port to listen on."""
    api_key: str | None = None
    """Bearer token required on ``/v1/*`` (``Authorization: Bearer KEY``); None serves without authentication. The
    CLI also reads ``$EDLM_API_KEY``."""
    max_queue: int = 64
    """Requests that may wait for a decoding slot; one more is refused with HTTP 429."""
    max_batch: int = 16
    """Most rows in one cohort (one batched ``iter_steps`` call); 1 decodes every request on its own."""
    max_active: int = 64
    """Most requests decoding at once over all cohorts; further requests wait in the queue."""
    batch_window_ms: float = 100.0
    """Longest a request waits for others to join its cohort; 0 admits every request at the next block boundary.
    Waiting ends early once max_batch requests wait or no request arrived for ``batch_gap_ms``."""
    batch_gap_ms: float = 20.0
    """A burst of arrivals is over when no request came for this long; its requests are admitted together."""
    max_prompt_tokens: int = 1024
    """Longest prompt accepted, in tokens (longer: HTTP 400)."""
    max_tokens_limit: int = 512
    """Largest ``max_tokens`` a request may ask for (larger: HTTP 400)."""
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    """Server-wide decoding defaults. A request may replace ``max_new_tokens`` (its ``max_tokens``),
    ``temperature``, ``top_p``, ``mode``, ``threshold``, ``block_size`` and the stop strings; the rest (policy,
    tokens_per_step, ...) holds for every request. ``decode.seed`` is not used: see ``seed``."""
    seed: int | None = None
    """Seed of a sampled request that gives none; None draws a fresh one per request (as OpenAI does)."""
    dtype: str = "fp32"
    """Weights of the served model: ``fp32``, ``bf16`` or ``int8`` (see :mod:`edlm.quant`; measure which is fastest
    here with ``edlm bench``); ``int4`` with ``compile``."""
    compile: bool = False
    """Run the model's forwards on the compiled engine (:mod:`edlm.engine`: CPU, Llama-family models)."""

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        check(bool(self.model_id), "model_id must be a non-empty name")
        check(0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}")
        for name in ("max_queue", "max_batch", "max_active", "max_prompt_tokens", "max_tokens_limit"):
            check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                  f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        check(self.max_batch <= self.max_active, f"max_batch ({self.max_batch}) cannot exceed max_active "
                                                 f"({self.max_active})")
        check(self.decode.max_new_tokens <= self.max_tokens_limit,
              f"the default max_tokens (decode.max_new_tokens={self.decode.max_new_tokens}) exceeds "
              f"max_tokens_limit ({self.max_tokens_limit})")
        check(self.batch_window_ms >= 0 and self.batch_gap_ms >= 0,
              f"batch_window_ms and batch_gap_ms must be >= 0, got {self.batch_window_ms}, {self.batch_gap_ms}")
        try:
            check_dtype(self.dtype, compiled=self.compile)
        except EdlmError as e:
            raise ConfigError(str(e)) from None

    def decode_config(self, **fields: Any) -> DecodeConfig:
        """The server's decoding defaults with ``fields`` (None values ignored) replacing them."""
        return dataclasses.replace(self.decode, **{k: v for k, v in fields.items() if v is not None})


def _aliased(item: str) -> str:
    """``threshold=0.8`` -> ``decode.threshold=0.8``, ``max_tokens=N`` -> ``decode.max_new_tokens=N``."""
    key, sep, value = item.partition("=")
    return f"decode.{DECODE_ALIASES[key.strip()]}={value}" if sep and key.strip() in DECODE_ALIASES else item


def load_serve_settings(model_dir: str | Path | None = None, overrides: list[str] | None = None,
                        env: dict[str, str] | None = None, **fields: Any) -> ServeSettings:
    """Build :class:`ServeSettings` from ``key=value`` overrides, then explicit fields (None ignored).

    Keys may be dotted (``decode.threshold=0.8``); the flat decoding keys of earlier versions (``threshold``,
    ``max_tokens``, ``temperature``, ...: ``DECODE_ALIASES``) name their ``decode`` field, in overrides and fields
    alike. ``model_id`` defaults to the model folder's name and ``api_key`` to ``$EDLM_API_KEY`` (read from
    ``env``, default ``os.environ``).
    """
    env = os.environ if env is None else env
    data = apply_overrides({}, [_aliased(item) for item in overrides or []])
    for key, value in fields.items():
        if value is not None and key in DECODE_ALIASES:
            data.setdefault("decode", {})[DECODE_ALIASES[key]] = value
        elif value is not None:
            data[key] = value
    if "model_id" not in data and model_dir is not None:
        data["model_id"] = Path(model_dir).resolve().name
    if "api_key" not in data and env.get("EDLM_API_KEY"):
        data["api_key"] = env["EDLM_API_KEY"]
    return from_dict(ServeSettings, data, where="serve settings: ")
