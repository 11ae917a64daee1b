"""What differs between transformers versions, in one place: how a KV cache is made and passed to ``forward``."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that passes a KV cache to ``model``'s forward: ``cache`` (transformers >= 5.24, which warns on
    ``past_key_values``) or ``past_key_values`` (earlier versions)."""
    return {_cache_keyword(type(model)): cache}


def new_cache(model: nn.Module, rows: int) -> Any:
    """An empty KV cache for ``rows`` rows of ``model``: the compiled engine's static cache for an
    :class:`edlm.engine.Engine`, else a ``DynamicCache``."""
    if hasattr(model, "new_cache"):
        return model.new_cache(rows)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@functools.cache
def _cache_keyword(cls: type) -> str:
    forward = inspect.unwrap(cls.forward)
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"
