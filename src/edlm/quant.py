"""Inference weight dtypes by name: ``fp32``, ``bf16`` and ``int8``, for converted models and AR sources alike.

``int8`` stores the weights of every ``nn.Linear`` (attention, MLP and LM head; embeddings and norms stay fp32) in
int8 with one scale per output channel, and quantizes activations at run time with **one scale per token**: each
token's input row is divided by its own absolute maximum before fbgemm's dynamic int8 GEMM (which quantizes its
whole input with one scale) and the output row multiplied back (:class:`RowScaledInt8Linear`). Without that row
scaling, one token with large activations (small Llama-family models have them at the first token and in the MLP
``down_proj`` inputs) sets the scale for every other token in the call: on SmolLM2-135M plain dynamic int8 cost
1.24 nats per token of held-out likelihood, row-scaled int8 0.12 (docs/roofline.md, section 1).

fbgemm still takes its scale and zero point from the whole call's normalised range, which a row alone need not
span: on its own a row's range might be [-0.6, 1], beside others [-1, 1], and its result changed with the other
rows of its call (on random rows: by 0.33 against outputs of ~0.8). So every normalised row carries the guard
``[1, -1, 0, 0]`` in four extra input features whose weights are zero (:data:`INT8_GUARD`): every call's range is
then exactly [-1, 1], and a row's int8 product is bit for bit the same alone, in a batch, or in a wider verify as
in a one-column AR step. A whole forward is width-free only if the fp32 ops around the products are too: the
next layer's activation rounding turns any last-bit difference into a different quantum, and the layers after
amplify it. The compiled engine's attention is written for that at int8 and int4 (``edlm.engine.Engine._attend``),
so there drafted decoding gives the int8 AR's text; the eager Hugging Face model at int8 (this module's Linear under
its own attention) does not promise it.

Which kernel does it was chosen by measurement (docs/roofline.md, section 1, SmolLM2-135M, AVX2 CPU; re-measured
at 2 threads with torchao 0.18 for issue 36): on CPU fbgemm's int8 GEMM (``torch.ops.quantized.linear_dynamic``)
beat torchao's ``quantize_`` (int8 weight-only: 1.7x slower at 1 column, 3.1x at 8; int8 dynamic-activation: 4-14x),
which has no fast eager CPU kernel for them, and ``torch._int_mm`` (100x slower than fp32 here). So it stays on
``torch.ao``'s deprecated dynamic quantization, whose notice is silenced at its one call. On CUDA, where fbgemm has
no kernels, torchao's int8 weight-only config is used (``pip install torchao``).

Which dtype is fastest depends on the machine (bf16 is fast only with native bf16 math, e.g. AVX-512 BF16 or AMX):
measure with ``edlm bench --dtypes fp32,bf16,int8``.
"""

from __future__ import annotations

import copy as copy_
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

from edlm.errors import EdlmError
from edlm.model import DiffusionLM

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.qint8}
"""Weight dtype names accepted by ``--dtype`` / ``--dtypes``, with the torch dtype each stores weights in."""

TORCHAO = "pip install torchao"


ENGINE_ONLY = ("int4",)
"""Weight dtypes only the compiled engine runs (:mod:`edlm.engine`): ``--compile`` is needed for them."""


def check_dtype(name: str, compiled: bool = False) -> str:
    """``name`` if it is a known weight dtype (``int4`` only with ``compiled``), else a clear error."""
    if name in ENGINE_ONLY and not compiled:
        raise EdlmError(f"weight dtype {name!r} runs on the compiled engine only: add --compile")
    if name not in DTYPES and name not in ENGINE_ONLY:
        raise EdlmError(f"unknown weight dtype {name!r}; choose one of {', '.join((*DTYPES, *ENGINE_ONLY))}")
    return name


def parse_dtypes(names: str) -> tuple[str, ...]:
    """``"fp32,bf16,int8"`` -> ``("fp32", "bf16", "int8")``, each checked."""
    out = tuple(check_dtype(n.strip()) for n in names.split(",") if n.strip())
    if not out:
        raise EdlmError("give at least one weight dtype, e.g. fp32,bf16,int8")
    return out


INT8_GUARD = (1.0, -1.0, 0.0, 0.0)
"""Input features appended to every row-normalised int8 activation row, their weight columns zero: they pin
fbgemm's per-call range to [-1, 1], so a row's result does not depend on the other rows of its call."""


def int8_guard_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float (N, K) weight with :data:`INT8_GUARD`'s zero columns appended: (N, K + 4)."""
    return F.pad(weight.detach().float(), (0, len(INT8_GUARD)))


def int8_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What fbgemm's int8 GEMM takes for activations ``x`` (..., K): each row divided by its absolute maximum, with
    :data:`INT8_GUARD` appended (..., K + 4); and those maxima (..., 1), to multiply the output rows back by."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min(1e-12)
    guard = torch.tensor(INT8_GUARD, dtype=x.dtype, device=x.device)
    return torch.cat([x / scale, guard.expand(*x.shape[:-1], len(INT8_GUARD))], dim=-1), scale


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class RowScaledInt8Linear(DynamicInt8Linear):
    """fbgemm's dynamic int8 Linear with per-output-channel weight scales and one activation scale per token.

    fbgemm quantizes a call's whole input with one scale; dividing each row by its absolute maximum first makes
    that one scale right for every row (per-token quantization), and the output row is multiplied back. The
    guard features (:data:`INT8_GUARD`) fix the call's range, so a row's result does not depend on its neighbours.
    The bias is added after rescaling (it is kept out of the packed weights).
    """

    @classmethod
    def from_float(cls, mod: nn.Module, use_precomputed_fake_quant: bool = False) -> RowScaledInt8Linear:
        bare = nn.Linear(mod.in_features + len(INT8_GUARD), mod.out_features, bias=False)
        bare.weight, bare.qconfig = nn.Parameter(int8_guard_weight(mod.weight), requires_grad=False), mod.qconfig
        q = super().from_float(bare)
        q.register_buffer("row_bias", None if mod.bias is None else mod.bias.detach().float().clone())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        guarded, scale = int8_input(x)
        y = torch.ops.quantized.linear_dynamic(guarded, self._packed_params._packed_params, reduce_range=True)
        y.mul_(scale)
        if self.row_bias is not None:
            y.add_(self.row_bias)
        return y.to(x.dtype)

    def _get_name(self) -> str:
        return "RowScaledInt8Linear"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize ``model``'s Linear layers to int8 (in place where the backend allows; use the returned module).

    CPU: :class:`RowScaledInt8Linear` (int8 weights, one scale per output channel; activations quantized per token
    at run time). CUDA: torchao int8 weight-only.
    """
    device = _device(model)
    if device.type == "cpu":
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise EdlmError(f"int8 needs torch's fbgemm kernels, which this torch build lacks "
                            f"(engines: {torch.backends.quantized.supported_engines}); use fp32 or bf16")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():  # torch.ao is deprecated, but still the fastest int8 on CPU (see above)
            warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
            warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
            return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig},
                                    mapping={nn.Linear: RowScaledInt8Linear}, inplace=True)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise EdlmError(f"int8 weights on {device.type} need torchao: {TORCHAO}") from None
    quantize_(model, Int8WeightOnlyConfig())
    return model


def cast_model(model: nn.Module, dtype: str, copy: bool = False) -> nn.Module:
    """``model`` with its weights in ``dtype`` (``fp32``, ``bf16`` or ``int8``); a deep copy first when ``copy``.

    int8 quantizes from float weights (fp32 is converted to first, so int8 from bf16 loses no more than from fp32
    would have). The original module is changed in place unless ``copy``.
    """
    check_dtype(dtype)
    if copy:
        model = copy_.deepcopy(model)
    if dtype == "int8":
        return quantize_int8(model.float())
    return model.to(DTYPES[dtype])


def cast(dlm: Any, dtype: str) -> Any:
    """A new ``DiffusionLM`` sharing ``dlm``'s tokenizer and settings, with a copy of its weights in ``dtype``;
    ``dlm`` itself when it already is (fp32 and bf16 only)."""
    if dtype != "int8" and weight_dtype(dlm.model) == dtype:
        return dlm
    return DiffusionLM(cast_model(dlm.model, dtype, copy=True), dlm.tokenizer, dlm.config).eval()


def weight_dtype(model: nn.Module) -> str:
    """The dtype name of a model's weights: ``int8`` when any Linear layer is quantized, else its float dtype (the
    compiled engine's own dtype for an :class:`edlm.engine.Engine`)."""
    if hasattr(model, "dtype_name"):
        return model.dtype_name
    for module in model.modules():
        if isinstance(module, DynamicInt8Linear):
            return "int8"
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and type(weight).__module__.startswith("torchao"):  # tensor subclass
            return "int8"
    float_dtype = model.get_input_embeddings().weight.dtype
    return next((name for name, d in DTYPES.items() if d == float_dtype), str(float_dtype))


def load_dtype(dtype: str) -> torch.dtype:
    """The float dtype weights are loaded in for ``dtype``: int8 is quantized from fp32 weights after loading."""
    check_dtype(dtype)
    return torch.float32 if dtype == "int8" else DTYPES[dtype]
