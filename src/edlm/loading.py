"""One way to load a model for decoding, at a dtype, eager or on the compiled engine: a converted folder
(:func:`load`), an AR model by spec (:func:`load_ar`), a folder's AR source (:func:`load_source`), or both of a
folder (:func:`load_pair`, what evaluation compares). Where the weights come from is :mod:`edlm.checkpoints`;
quantization is :mod:`edlm.quant`; compilation is :mod:`edlm.engine`."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from edlm.checkpoints import best_device, resolve_model
from edlm.engine import compile_dlm, compile_model
from edlm.model import DiffusionLM, source_spec
from edlm.quant import cast_model, check_dtype, load_dtype, quantize_int8

logger = logging.getLogger(__name__)


def load(path: str | os.PathLike, dtype: str = "fp32", device: str | torch.device = "cpu",
         attn_implementation: str = "sdpa", compile: bool = False) -> Any:
    """Load a converted model folder as a ``DiffusionLM`` with weights in ``dtype`` (eval mode); with ``compile``
    its forwards run on the compiled engine (:mod:`edlm.engine`, CPU, Llama-family models)."""
    if compile:
        check_dtype(dtype, compiled=True)
        return compile_dlm(DiffusionLM.from_pretrained(path, dtype=torch.float32, device="cpu").eval(), dtype)
    dlm = DiffusionLM.from_pretrained(path, dtype=load_dtype(dtype), device=device,
                                      attn_implementation=attn_implementation)
    if dtype == "int8":
        dlm.model = quantize_int8(dlm.model)
        logger.info("quantized the Linear layers of %s to int8", path)
    return dlm.eval()


def load_ar(spec: str | None, dtype: str = "fp32", device: str | torch.device = "cpu",
            compile: bool = False, attn_implementation: str = "sdpa") -> tuple[nn.Module, Any]:
    """(AR model in ``dtype``, tokenizer) for a model spec as :func:`edlm.checkpoints.resolve_model` reads it; with
    ``compile`` the model is the compiled engine over the fp32 weights (:mod:`edlm.engine`)."""
    if compile:
        check_dtype(dtype, compiled=True)
        model, tokenizer = resolve_model(spec, dtype=torch.float32)
        return compile_model(model.eval(), dtype), tokenizer
    model, tokenizer = resolve_model(spec, dtype=load_dtype(dtype), attn_implementation=attn_implementation)
    return cast_model(model.to(device), dtype).eval(), tokenizer


def load_source(model_dir: str | os.PathLike, dtype: str = "fp32", device: str | torch.device = "cpu",
                compile: bool = False, attn_implementation: str = "sdpa") -> nn.Module:
    """The AR model a converted folder was trained from (its ``train_config.yaml`` names it:
    :func:`edlm.model.source_spec`) in ``dtype``, eval mode. A folder that records no source has its converted
    weights used as a causal LM."""
    spec = source_spec(model_dir)
    if spec is None:
        logger.warning("%s records no AR source (no train_config.yaml); the converted weights are used as a causal "
                       "LM", model_dir)
        spec = str(model_dir)
    else:
        logger.info("AR source of %s: %s", model_dir, spec)
    return load_ar(spec, dtype, device, compile, attn_implementation)[0]


def load_pair(model_dir: str | os.PathLike, ar: bool = False, dtype: str = "fp32", compile: bool = False,
              device: str | torch.device | None = None) -> tuple[Any, nn.Module | None]:
    """(DiffusionLM, its AR source or None) of a converted folder, both in ``dtype``, on ``device`` (default: the
    best one here); with ``compile`` both run on the compiled engine."""
    device = device or best_device()
    dlm = load(model_dir, dtype, device=device, compile=compile)
    return dlm, load_source(model_dir, dtype, device, compile) if ar else None
