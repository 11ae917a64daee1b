"""The compiled decode path: a Llama-family decoder stack as one function of fixed shapes over a static KV cache.

Eager PyTorch spends most of a small model's CPU forward outside arithmetic: Python, Hugging Face module calls, op
dispatch, ~10 small kernels per layer. :class:`Engine` takes the source's weights once, keeps keys/values in
preallocated per-layer tensors, and runs a forward of ``w`` new columns as one ``torch.compile``-d graph per
width (gpt-fast's recipe): the graph is traced once per width and batch, and every later step of that width is one
call. Widths are padded up to a few buckets (1, 2, 4, 8, 16, 24, 32, ...) so the speculative decoder's varying
widths and short prefills reuse a handful of graphs; the padding columns write keys/values to slots past the
cached ones and attend only to themselves, so they change nothing.

The engine is a drop-in for the Hugging Face model inside the decoders: it takes the same keywords
(``input_ids``, ``position_ids``, a 2D padding or 4D bool/additive mask, a cache, ``logits_to_keep``) and its
cache has the two methods the decoders use (``crop``, ``get_seq_length``). So every mode (AR, diffusion,
speculative) runs on it unchanged, and the eager Hugging Face path stays the reference it is tested against.

Weights (docs/roofline.md, section 7, has the measurements behind each choice):

- ``fp32``, ``bf16``: ``F.linear`` (MKL / oneDNN);
- ``int8``: edlm's int8 (:mod:`edlm.quant`): fbgemm's int8 GEMM with one weight scale per output channel, one
  activation scale per token and the guard features that make a column's result independent of its neighbours.
  fbgemm's packed weights are an object the compiler cannot trace, so the graph calls them through an opaque op
  (``edlm::int8_linear``); on this CPU it beat ``aten._weight_int8pack_mm`` (weight-only int8) by 2x at one column
  and 3.5x at eight;
- ``int4``: weight-only, groups of 32 with scale and zero point, ``aten._weight_int4pack_mm_for_cpu``, bf16
  activations.

The embedding table stays fp32 (a gather, not a GEMM).
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edlm.errors import EdlmError
from edlm.model import DiffusionLM
from edlm.quant import int8_input, quantize_int8

logger = logging.getLogger(__name__)

ENGINE_DTYPES = ("fp32", "bf16", "int8", "int4")
SUPPORTED = ("llama", "mistral", "qwen2")
"""``config.model_type`` values the engine runs: pre-norm RMSNorm, rotary, grouped-query attention, SwiGLU. A
sliding attention window (Mistral) is not applied: contexts must fit in the window."""
INT4_GROUP = 32
WIDTH_FREE = ("int8", "int4")
"""Dtypes whose forward of a column does not depend on the forward's width (see :meth:`Engine._attend`)."""
WIDTH_FREE_UP_TO = 64
"""Forwards of up to this many columns (AR steps, verifies, diffusion blocks) use the width-free attention; wider
ones (long prefills, which both sides of any comparison run at the same width) keep the faster matmuls."""


def check_supported(model: nn.Module) -> None:
    """Raise a clear error when ``model`` is not one the engine can run."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED:
        raise EdlmError(f"the compiled engine runs {', '.join(SUPPORTED)} models, not {kind!r}; "
                        "decode without --compile (the eager path runs every model)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise EdlmError(f"the compiled engine needs a SiLU MLP, this model uses {cfg.hidden_act!r}; "
                        "decode without --compile")
    for module in model.modules():
        if type(module).__name__.startswith(("Lora", "Gated")) or hasattr(module, "lora_A"):
            raise EdlmError("the compiled engine runs plain weights, not adapters: merge the adapter first or "
                            "decode without --compile")


def _bucket(width: int, exact: int = 0) -> int:
    """The padded width a forward of ``width`` columns runs at: ``width`` itself up to ``exact``, else 1, 2, 4, 8,
    then multiples of 8 up to 64, then of 64."""
    if width <= exact:
        return width
    if width <= 8:
        return 1 << (width - 1).bit_length()
    step = 8 if width <= 64 else 64
    return -(-width // step) * step


# ------------------------------------------------------------------------------------------------ weights


class Linear:
    """One weight matrix in an engine dtype, applied as ``y = x W^T (+ b)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: str):
        self.dtype, self.out_features = dtype, weight.shape[0]
        self.scale: torch.Tensor | None = None
        weight = weight.detach().float()
        self.bias = None if bias is None else bias.detach().float()
        if dtype == "fp32":
            self.weight = weight.contiguous()
        elif dtype == "bf16":
            self.weight = weight.bfloat16().contiguous()
            self.bias = None if self.bias is None else self.bias.bfloat16()
        elif dtype == "int8":  # fbgemm's packed int8 weights, kept in a registry the custom op reads
            self.weight = torch.tensor(_pack_int8(weight))  # a handle: a tensor, so chunks share one graph
            weakref.finalize(self, _INT8.pop, int(self.weight), None)  # the packed weights go with this Linear
        elif dtype == "int4":
            n, k = weight.shape
            if k % INT4_GROUP:
                raise EdlmError(f"int4 needs input sizes divisible by {INT4_GROUP}, got {k}; use --dtype int8")
            pad = -n % 16  # the packing kernel wants whole tiles of 16 output rows
            weight = F.pad(weight, (0, 0, 0, pad))
            n += pad
            groups = weight.reshape(n, k // INT4_GROUP, INT4_GROUP)
            low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
            scale = (high - low).clamp_min(1e-8) / 15
            q = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
            zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            self.scale = torch.stack([scale.reshape(n, -1), zero.reshape(n, -1)], dim=-1).transpose(0, 1)
            self.scale = self.scale.bfloat16().contiguous()
        else:
            raise EdlmError(f"unknown engine dtype {dtype!r}; choose one of {', '.join(ENGINE_DTYPES)}")
        # the bytes a forward reads; int8's: its int8 weights and one fp32 scale per output channel (not the handle)
        if dtype == "int8":
            self.nbytes = weight.numel() + 4 * weight.shape[0]
        else:
            self.nbytes = sum(t.numel() * t.element_size() for t in (self.weight, self.scale) if t is not None)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(weight, scale or None, bias or None): what :func:`linear` takes."""
        return self.weight, self.scale, self.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.dtype, self.out_features, x, *self.tensors())


def linear(dtype: str, out_features: int, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
           bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ b)`` for a weight stored as :class:`Linear` stores it in ``dtype``."""
    if dtype in ("fp32", "bf16"):
        return F.linear(x, weight, bias)
    if dtype == "int8":  # one activation scale per token (see edlm.quant.RowScaledInt8Linear)
        guarded, row = int8_input(x)
        y = torch.ops.edlm.int8_linear(guarded, weight, out_features) * row
        return y if bias is None else y + bias
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # the kernel's fast path takes bf16 activations
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, INT4_GROUP, scale)
    if y.shape[-1] != out_features:
        y = y[:, :out_features]
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*shape[:-1], out_features)


_INT8: dict[int, Any] = {}
"""fbgemm packed int8 weights by handle: a torchbind object dynamo cannot trace, so the compiled graph calls
:func:`_int8_linear`, an opaque custom op that looks its weight up here."""


_HANDLES = itertools.count()


def _pack_int8(weight: torch.Tensor) -> int:
    """Pack a float (N, K) weight for fbgemm as ``edlm.quant`` int8 does (per-channel scales, the guard's zero
    columns appended: the input it takes is :func:`edlm.quant.int8_input`'s); returns its handle."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    handle = next(_HANDLES)
    _INT8[handle] = quantize_int8(nn.Sequential(lin))[0]._packed_params._packed_params
    return handle


_LIB = torch.library.Library("edlm", "DEF")
_LIB.define("int8_linear(Tensor x, Tensor handle, int out_features) -> Tensor")


def _int8_linear(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    """fbgemm's dynamic int8 GEMM of ``x`` (..., K) with packed weight ``handle``: (..., out_features) fp32.

    Registered as a plain CPU kernel of ``edlm::int8_linear`` (``torch.library.custom_op``'s wrapper cost ~150 us a
    call here, a fifth of a SmolLM2 forward)."""
    return torch.ops.quantized.linear_dynamic.default(x, _INT8[int(handle)], True)


def _int8_linear_fake(x: torch.Tensor, handle: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


_LIB.impl("int8_linear", _int8_linear, "CPU")
torch.library.register_fake("edlm::int8_linear", _int8_linear_fake, lib=_LIB)


@dataclass
class Layer:
    qkv: Linear
    o: Linear
    gate_up: Linear
    down: Linear
    norm1: torch.Tensor
    norm2: torch.Tensor

    def tensors(self) -> tuple:
        """Every tensor of the layer, flat, in the order :meth:`Engine._layer` takes them."""
        return (self.norm1, *self.qkv.tensors(), *self.o.tensors(), self.norm2, *self.gate_up.tensors(),
                *self.down.tensors())


def _fused(linears: list[nn.Module], dtype: str) -> Linear:
    """One Linear for several that read the same input (q, k, v; gate, up): one GEMM instead of three."""
    weight = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b if b is not None else torch.zeros(m.weight.shape[0]) for b, m in zip(biases, linears)])
    return Linear(weight, bias, dtype)


# ------------------------------------------------------------------------------------------------ the cache


@dataclass
class StaticCache:
    """Preallocated keys/values (R, kv_heads, capacity, head_dim) per layer; ``length`` columns are valid.

    The decoders use it as they use a ``DynamicCache``: ``crop(-n)`` drops the last ``n`` columns, ``crop(n)``
    keeps the first ``n``. Nothing is freed: dropped slots are overwritten by the next forward and never attended.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0
    rows: int = field(init=False)

    def __post_init__(self):
        self.rows = self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.length

    def crop(self, n: int) -> None:
        self.length = self.length + n if n < 0 else min(n, self.length)
        if self.length < 0:
            raise ValueError("crop below zero columns")

    def grow(self, capacity: int) -> None:
        """Reallocate with room for ``capacity`` columns, keeping the valid ones."""
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
                new[:, :, :self.length] = old[:, :, :self.length]
                store[i] = new


# ------------------------------------------------------------------------------------------------ the engine


class Engine(nn.Module):
    """A Hugging Face Llama-family causal LM's weights run as compiled chunks of layers, one graph per forward
    width.

    Args:
        model: the source (``AutoModelForCausalLM``; fp32 weights preferred, other float dtypes are upcast first).
        dtype: ``fp32``, ``bf16``, ``int8`` or ``int4`` (see the module docstring).
        compile: compile the forward with ``torch.compile`` (inductor); False runs the same function eagerly (the
            engine's own reference, and what tests compare against the Hugging Face path).
        capacity: initial KV slots per cache (it grows by doubling when a forward needs more).
        chunk: layers per compiled graph. Every chunk of this size runs one graph (weights are its inputs), so
            compile time follows the chunk, not the depth; each chunk call costs ~0.3 ms of dispatch and guards.
            SmolLM2 (30 layers): the whole stack took 60-85 s to compile per width, chunks of 6 take 15-25 s.
        exact_widths: forwards of up to this many columns run at their own width (one graph each) instead of being
            padded to a power of two: a verify of 5 columns then costs 5 columns, not 8, for a few more compiles.

    A cache that grows to a new capacity changes the graphs' shapes: they compile again at the new size.
    """

    def __init__(self, model: nn.Module, dtype: str = "fp32", compile: bool = True, capacity: int = 256,
                 chunk: int = 6, exact_widths: int = 0):
        super().__init__()
        check_supported(model)
        if dtype not in ENGINE_DTYPES:
            raise EdlmError(f"unknown engine dtype {dtype!r}; choose one of {', '.join(ENGINE_DTYPES)}")
        self.inner = model  # for config, embeddings, tokenizer-facing attributes
        cfg = model.config
        self.dtype_name, self.capacity, self.exact_widths = dtype, capacity, exact_widths
        self.width_free_up_to = WIDTH_FREE_UP_TO if dtype in WIDTH_FREE else 0
        """Forwards of up to this many columns use the width-free attention (:meth:`_attend`); 0: never."""
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.eps = cfg.rms_norm_eps
        self.act_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        base = model.model
        with torch.no_grad():
            self.embed = base.embed_tokens.weight.detach().float()
            self.layers = []
            for layer in base.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.layers.append(Layer(
                    qkv=_fused([attn.q_proj, attn.k_proj, attn.v_proj], dtype), o=Linear(attn.o_proj.weight,
                                                                                          attn.o_proj.bias, dtype),
                    gate_up=_fused([mlp.gate_proj, mlp.up_proj], dtype),
                    down=Linear(mlp.down_proj.weight, mlp.down_proj.bias, dtype),
                    norm1=layer.input_layernorm.weight.detach().to(self.act_dtype),
                    norm2=layer.post_attention_layernorm.weight.detach().to(self.act_dtype)))
            self.norm = base.norm.weight.detach().to(self.act_dtype)
            head = model.get_output_embeddings()
            self.lm_head = Linear(head.weight, getattr(head, "bias", None), dtype)
            self._rope_module = base.rotary_emb
            self.cos = self.sin = torch.empty(0)
            self._rope(capacity)
        self.intermediate = cfg.intermediate_size
        flat = [layer.tensors() for layer in self.layers]
        self.chunk = max(1, min(chunk, len(flat)))
        self._chunks = [tuple(flat[i:i + self.chunk]) for i in range(0, len(flat), self.chunk)]
        self.compiled = compile
        self._run_chunk = torch.compile(self._chunk, dynamic=False, fullgraph=True) if compile else self._chunk
        self.compile_s: dict[tuple[int, int], float] = {}
        """Seconds of the first (tracing and compiling) call of each (rows, bucket width)."""
        self.widths: set[tuple[int, int]] = set()
        if compile:
            import torch._dynamo as dynamo

            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 64)

    # ------------------------------------------------------------------------------------ delegation

    @property
    def config(self):
        return self.inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def weight_bytes(self) -> int:
        """Bytes of weights a one-column forward reads (the layers and the LM head; the embedding row is one
        gather)."""
        return self.lm_head.nbytes + sum(
            lin.nbytes for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))

    def _rope(self, length: int) -> None:
        """cos/sin tables for positions [0, length), from the source's own rotary module (any RoPE scaling)."""
        if self.cos.shape[0] >= length:
            return
        length = max(length, 2 * self.cos.shape[0])
        pos = torch.arange(length)[None]
        probe = torch.zeros(1, dtype=torch.float32)
        cos, sin = self._rope_module(probe, pos)
        self.cos, self.sin = cos[0].to(self.act_dtype), sin[0].to(self.act_dtype)

    def new_cache(self, rows: int, capacity: int | None = None) -> StaticCache:
        shape = (rows, self.kv_heads, capacity or self.capacity, self.head_dim)
        n = len(self.layers)
        return StaticCache([torch.zeros(shape, dtype=self.act_dtype) for _ in range(n)],
                           [torch.zeros(shape, dtype=self.act_dtype) for _ in range(n)])

    # ------------------------------------------------------------------------------------ the function

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * weight

    def _forward(self, ids, cos, sin, slots, mask, keys: list[torch.Tensor], values: list[torch.Tensor],
                 layers: tuple[int, ...] = ()):
        """Hidden states (R, Q, D) after the final norm, and the outputs (R, Q, D) of the decoder layers numbered
        in ``layers`` (0-based; Hugging Face's ``hidden_states[i + 1]``); writes the Q columns' keys/values at
        ``slots``.

        ids (R, Q); cos/sin (R, Q, head_dim); slots (Q,) cache columns; mask (R, 1, Q, capacity) bool. Every
        layer runs the same compiled function (one graph per shape, whatever the depth: compiling the whole
        stack took ~60 s per width on SmolLM2, one layer a few seconds).
        """
        x = F.embedding(ids, self.embed).to(self.act_dtype)
        cos, sin = cos[:, None], sin[:, None]  # (R, 1, Q, hd)
        outputs: list[torch.Tensor] = []
        for i, chunk in enumerate(self._chunks):
            at = slice(i * self.chunk, (i + 1) * self.chunk)
            x, per_layer = self._run_chunk(x, cos, sin, slots, mask, tuple(keys[at]), tuple(values[at]), chunk)
            outputs.extend(per_layer)
        return self._norm(x, self.norm), [outputs[i] for i in layers]

    def _attend(self, q, k, v, mask):
        """Attention of q (R, H, Q, hd) over the whole cache k, v (R, KV, C, hd) under mask (R, 1, Q, C), written
        out for inductor to fuse (the CPU flash-attention kernel cost ~140 us a call for one query here). Query
        heads are grouped by the key/value head they share.

        At int8 and int4 the two products are written as multiply-and-sum reductions, not matmuls: a matmul's
        summation order depends on how many query rows it has, so a column's attention differed in its last bits
        between a one-column AR step and a wide verify, and the next layer's activation rounding turned that into a
        different int8 quantum, which the layers after amplified (a 3-logit difference on SmolLM2 by the 8th
        token). A reduction sums each (query, key) pair in the same order whatever the width, so a column's
        forward is bit for bit the same in an AR step and in a verify (with :func:`edlm.quant.int8_input`), and
        drafted decoding gives the AR's text. It cost 0-24% of an 8-column int8 forward here, by run, and -8% to +6%
        at one column (docs/roofline.md, section 9.1). Forwards wider than :data:`WIDTH_FREE_UP_TO` (long
        prefills) and fp32 / bf16 keep the matmuls: a prefill runs at the same width on both sides of a comparison,
        and fp32 / bf16 linears are not width-free anyway."""
        rows, heads, q_len, hd = q.shape
        group = heads // self.kv_heads
        q = q.reshape(rows, self.kv_heads, group * q_len, hd)
        width_free = q_len <= self.width_free_up_to  # q_len: fixed per graph
        if width_free:
            scores = (q.unsqueeze(-2).float() * k.unsqueeze(-3).float()).sum(-1) * hd ** -0.5
        else:
            scores = (q @ k.transpose(-1, -2)).float() * hd ** -0.5  # (R, KV, G*Q, C)
        scores = scores.view(rows, self.kv_heads, group, q_len, -1).masked_fill(~mask[:, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype).view(rows, self.kv_heads, group * q_len, -1)
        if width_free:
            return (probs.unsqueeze(-1) * v.unsqueeze(-3)).sum(-2).view(rows, heads, q_len, hd)
        return (probs @ v).view(rows, heads, q_len, hd)

    def _chunk(self, x, cos, sin, slots, mask, keys: tuple, values: tuple, layers: tuple):
        """``len(layers)`` consecutive layers: the unit that is compiled (every chunk of the same size runs the same
        graph, its weights being inputs). Returns the last layer's output and every layer's (a drafter reads some:
        returning them costs a few small copies)."""
        outputs = []
        for tensors, k_cache, v_cache in zip(layers, keys, values):
            x = self._layer(x, cos, sin, slots, mask, k_cache, v_cache, *tensors)
            outputs.append(x)
        return x, tuple(outputs)

    def _layer(self, x, cos, sin, slots, mask, k_cache, v_cache, norm1, qkv_w, qkv_s, qkv_b, o_w, o_s, o_b,
               norm2, gu_w, gu_s, gu_b, down_w, down_s, down_b):
        """One decoder layer on (R, Q, D): attention over the cache (after writing this step's keys/values at
        ``slots``), then the SwiGLU MLP, each with its residual."""
        rows, q_len, _ = x.shape
        hd, dtype = self.head_dim, self.dtype_name
        q_size, kv_size = self.heads * hd, self.kv_heads * hd
        h = self._norm(x, norm1)
        qkv = linear(dtype, q_size + 2 * kv_size, h, qkv_w, qkv_s, qkv_b)
        q = qkv[..., :q_size].view(rows, q_len, self.heads, hd).transpose(1, 2)
        k = qkv[..., q_size:q_size + kv_size].view(rows, q_len, self.kv_heads, hd).transpose(1, 2)
        v = qkv[..., q_size + kv_size:].view(rows, q_len, self.kv_heads, hd).transpose(1, 2)
        half = hd // 2
        q = q * cos + torch.cat([-q[..., half:], q[..., :half]], dim=-1) * sin
        k = k * cos + torch.cat([-k[..., half:], k[..., :half]], dim=-1) * sin
        k_cache.index_copy_(2, slots, k)
        v_cache.index_copy_(2, slots, v)
        a = self._attend(q, k_cache, v_cache, mask)
        x = x + linear(dtype, x.shape[-1], a.transpose(1, 2).reshape(rows, q_len, q_size), o_w, o_s, o_b)
        h = self._norm(x, norm2)
        gate, up = linear(dtype, 2 * self.intermediate, h, gu_w, gu_s, gu_b).chunk(2, dim=-1)
        return x + linear(dtype, x.shape[-1], F.silu(gate) * up, down_w, down_s, down_b)

    # ------------------------------------------------------------------------------------ the HF-style call

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values: StaticCache | None = None,
                use_cache: bool = False, logits_to_keep: int | torch.Tensor | None = None,
                cache: StaticCache | None = None, feature_layers: tuple[int, ...] = (), **unused: Any):
        """One forward of ``input_ids`` (R, Q) after the cache's columns, as a Hugging Face causal LM does it.

        ``attention_mask``: None (causal), (R, K) padding over all K = cached + Q columns (causal within), or a
        (R|1, 1, Q, K) bool or additive mask. Returns ``.logits`` (R, kept, V) in fp32 and, with
        ``feature_layers``, ``.features`` (R, Q, len(feature_layers), D) fp32: those decoder layers' outputs at
        every column (what a drafter reads; Hugging Face's ``hidden_states[i + 1]``).
        """
        store = cache if cache is not None else past_key_values
        rows, q_len = input_ids.shape
        if store is None:
            store = self.new_cache(rows)
        if not isinstance(store, StaticCache):
            raise EdlmError("the compiled engine needs its own cache: create it with engine.new_cache(rows) "
                            "(edlm.model.new_cache does this for any model)")
        start = store.length
        width = _bucket(q_len, self.exact_widths)
        end = start + width
        if end > store.capacity:
            store.grow(max(end, 2 * store.capacity))
        self._rope(end)
        cap = store.capacity
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(start, start + q_len, device=device)[None].expand(rows, -1)
        mask = self._mask(attention_mask, rows, q_len, start, width, cap, device)
        if width > q_len:  # padding columns: token 0 at position 0, writing past the real columns
            input_ids = F.pad(input_ids, (0, width - q_len))
            position_ids = F.pad(position_ids, (0, width - q_len))
        slots = torch.arange(start, end, device=device)
        cos, sin = self.cos[position_ids], self.sin[position_ids]
        key = (rows, width)
        t0 = time.perf_counter() if key not in self.widths else None
        hidden, features = self._forward(input_ids, cos, sin, slots, mask, store.keys, store.values,
                                         tuple(feature_layers))
        hidden = hidden[:, :q_len]
        if t0 is not None:
            self.widths.add(key)
            self.compile_s[key] = time.perf_counter() - t0
        store.length = start + q_len
        if logits_to_keep is None or (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            kept = hidden
        elif isinstance(logits_to_keep, int):
            kept = hidden[:, -logits_to_keep:]
        else:
            kept = hidden[:, logits_to_keep]
        out = SimpleNamespace(logits=self.lm_head(kept).float())
        if feature_layers:
            out.features = torch.stack(features, dim=2)[:, :q_len].float()  # (R, Q, n, D)
        return out

    @staticmethod
    def _mask(attention_mask, rows: int, q_len: int, start: int, width: int, cap: int, device) -> torch.Tensor:
        """(R, 1, width, capacity) bool: the given rule over the real columns, and every query its own column."""
        keys = start + q_len
        if attention_mask is None or attention_mask.dim() == 2:
            k = torch.arange(keys, device=device)
            q = torch.arange(start, keys, device=device)
            rule = (k[None, :] <= q[:, None])[None, None]  # (1, 1, Q, K)
            if attention_mask is not None:
                rule = rule & attention_mask.bool()[:, None, None, :keys]
        else:
            rule = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        full = torch.zeros((rows, 1, width, cap), dtype=torch.bool, device=device)
        full[:, :, :q_len, :keys] = rule
        # Every query sees its own column: what padding queries (bucket padding, left pads) need to have a
        # softmax at all, and what every decoding rule already allows a real query.
        j = torch.arange(width, device=device)
        full[:, :, j, start + j] = True
        return full


def compile_model(model: nn.Module, dtype: str = "fp32", compile: bool = True, exact_widths: int = 0) -> Engine:
    """The engine for a Hugging Face causal LM (see :class:`Engine`)."""
    return Engine(model, dtype=dtype, compile=compile, exact_widths=exact_widths).eval()


def compile_dlm(dlm, dtype: str = "fp32", compile: bool = True):
    """A ``DiffusionLM`` sharing ``dlm``'s tokenizer and settings whose forwards run on the engine."""
    engine = compile_model(dlm.model, dtype, compile)
    out = DiffusionLM(dlm.model, dlm.tokenizer, dlm.config).eval()
    out.model = engine
    out._accepts_logits_to_keep = True
    return out
