"""One way to load a model for decoding: a converted folder (:func:`load`) or an AR source (:func:`load_ar`), each
at a dtype, eager or on the compiled engine. Where the weights come from is :mod:`edlm.assets`; quantization is
:mod:`edlm.quant`; compilation is :mod:`edlm.engine`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from edlm.quant import cast_model, check_dtype, load_dtype, quantize_int8

logger = logging.getLogger(__name__)


def load(path: str | os.PathLike, dtype: str = "fp32", device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa", compile: bool = False) -> Any:
    """Load a converted model folder as a ``DiffusionLM`` with weights in ``dtype`` (eval mode); with ``compile``
    its forwards run on the compiled engine (:mod:`edlm.engine`, CPU, Llama-family models)."""
    from edlm.model import DiffusionLM

    if compile:
        from edlm.engine import compile_dlm

        check_dtype(dtype, compiled=True)
        return compile_dlm(DiffusionLM.from_pretrained(path, dtype=torch.float32, device="cpu").eval(), dtype)
    dlm = DiffusionLM.from_pretrained(path, dtype=load_dtype(dtype), device=device,
                                      attn_implementation=attn_implementation)
    if dtype == "int8":
        dlm.model = quantize_int8(dlm.model)
        logger.info("quantized the Linear layers of %s to int8", path)
    return dlm.eval()


def load_ar(spec: str | None, dtype: str = "fp32", device: str | torch.device = "cpu",
            compile: bool = False) -> tuple[nn.Module, Any]:
    """(AR model in ``dtype``, tokenizer) for a model spec as :func:`edlm.assets.resolve_model` reads it; with
    ``compile`` the model is the compiled engine over the fp32 weights (:mod:`edlm.engine`)."""
    from edlm.assets import resolve_model

    if compile:
        from edlm.engine import compile_model

        check_dtype(dtype, compiled=True)
        model, tokenizer = resolve_model(spec, dtype=torch.float32)
        return compile_model(model.eval(), dtype), tokenizer
    model, tokenizer = resolve_model(spec, dtype=load_dtype(dtype))
    return cast_model(model.to(device), dtype).eval(), tokenizer
