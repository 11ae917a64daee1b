"""Gated LoRA: adapters that act only on the noisy (drafted) columns of a forward, over a frozen source.

Every adapted linear computes, per token column ``t``::

    y_t = W x_t + g_t * (B A x_t) * alpha / r        g_t = 1 on the columns being drafted, 0 elsewhere

and the mask token's input embedding gets a trainable offset; nothing else of the source is trained. With every
gate at 0 (the default: no column is open) the model *is* the source, bit for bit: the prompt, the clean copy in
training and every committed token run the source's own weights, so in all decoding modes the KV cache holds the
source's keys and values. In a forward over ``[context | block]`` only the block's columns are opened::

    columns    0 ... s-1 (context, committed)   s ... s+B-1 (the block being drafted)
    gate       0 0 0 0 0 0 0 0 0 0 0 0 0 0 0    1 1 1 1 1 1 1 1
    weights    W                                W + B A alpha / r

The gate is a small object shared by every adapted layer and set by :meth:`Gate.open` around one forward (the
decoding and training code open it through ``DiffusionLM.run(..., noisy=...)``); a slice of columns computes the
adapter on those columns only. A gate tensor of ones everywhere is an ordinary (ungated) LoRA.

Kinds of "lossless" in the field, and where this one stands: a frozen target that verifies (DFlash, DiffuSpec),
gated LoRA (I-DLM), and a model's own causal pass verifying (Nemotron LinearSpec, edlm's speculative mode of a
fully converted model). Speculative decoding of a gated model is of the first two kinds at once: the verifier is
the unmodified source, so greedy output equals the source's.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edlm.errors import EdlmError

Columns = slice | torch.Tensor | None
"""Where the adapters act: None (nowhere: the source), a slice of the sequence dimension with explicit start and
stop, or a (B, T) tensor of gate values (1 = adapter on)."""


class Gate:
    """The columns of the running forward that the adapters act on (shared by every :class:`GatedLoRALinear`)."""

    def __init__(self) -> None:
        self.columns: Columns = None

    @contextlib.contextmanager
    def open(self, columns: Columns) -> Iterator[None]:
        """Let the adapters act on ``columns`` for the duration of the block (one forward)."""
        if isinstance(columns, slice) and (columns.start is None or columns.stop is None or columns.step):
            raise ValueError(f"a gate slice needs an explicit start and stop and no step, got {columns}")
        previous, self.columns = self.columns, columns
        try:
            yield
        finally:
            self.columns = previous


class GatedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank update applied only where the gate is open.

    Args:
        base: the source's linear layer (kept, frozen).
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        gate: the shared :class:`Gate`.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, gate: Gate, generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.scaling = alpha / r
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        # As peft and the LoRA paper: A random, B = 0, so the update starts at 0.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.gate = gate  # a plain attribute: not a submodule, not in the state dict

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's update for inputs ``x`` (..., in) -> (..., out)."""
        return F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (B, T, out)
        cols = self.gate.columns
        if cols is None:
            return y
        if isinstance(cols, slice):  # the adapter runs on the open columns only
            return torch.cat([y[:, :cols.start], y[:, cols] + self.delta(x[:, cols]), y[:, cols.stop:]], dim=1)
        return y + cols[..., None].to(y.dtype) * self.delta(x)

    def extra_repr(self) -> str:
        return f"r={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class MaskEmbedding(nn.Module):
    """The source's input embedding (frozen) with a trainable offset added where the input is the mask token.

    An offset rather than a replacement row keeps whatever the source's embedding does (Gemma scales it) and starts
    from the mask row that conversion initialised (the mean embedding)."""

    def __init__(self, base: nn.Embedding, mask_id: int):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.mask_id = mask_id
        self.mask_delta = nn.Parameter(torch.zeros(base.weight.shape[1], dtype=base.weight.dtype,
                                                   device=base.weight.device))

    @property
    def weight(self) -> torch.Tensor:  # what callers of get_input_embeddings() read: dtype, device, rows
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        emb = self.base(input_ids)  # (B, T, D)
        is_mask = (input_ids == self.mask_id)[..., None]
        return emb + is_mask.to(emb.dtype) * self.mask_delta.to(emb.dtype)


def _matches(name: str, targets: str | list[str]) -> bool:
    """Does module ``name`` (a linear inside the decoder layers) get an adapter?"""
    if targets == "all-linear":
        return True
    suffix = name.rsplit(".", 1)[-1]
    return suffix in targets


def _layer_index(name: str) -> int | None:
    found = re.search(r"\.layers\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def attach(model: nn.Module, mask_id: int, r: int, alpha: float, targets: str | list[str] = "all-linear",
           layers: list[int] | None = None, seed: int = 0) -> Gate:
    """Freeze ``model`` and give it gated adapters (in place); returns their shared gate.

    Args:
        model: a ``transformers`` causal LM whose decoder layers are ``...layers.N...``.
        mask_id: the mask token's id (its embedding gets the trainable offset).
        r, alpha: adapter rank and scaling numerator.
        targets: ``all-linear`` (every linear inside the decoder layers) or module names such as ``q_proj``.
        layers: decoder layer indices to adapt (None: all). Negative indices count from the top.
        seed: seeds the adapters' random initialisation.
    """
    model.requires_grad_(False)
    gate = Gate()
    n_layers = getattr(model.config, "num_hidden_layers", None)
    wanted = None
    if layers is not None:
        if n_layers is None:
            raise EdlmError("lora.layers needs a model config with num_hidden_layers")
        wanted = {i % n_layers for i in layers}
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)
             and _layer_index(name) is not None and _matches(name, targets)
             and (wanted is None or _layer_index(name) in wanted)]
    if not found:
        raise EdlmError(f"no linear layer of the model matches lora.target_modules {targets!r} and lora.layers "
                        f"{layers!r}; name modules such as q_proj, v_proj, down_proj, or use all-linear")
    generator = torch.Generator().manual_seed(seed)
    for name, mod in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, GatedLoRALinear(mod, r, alpha, gate, generator))
    model.set_input_embeddings(MaskEmbedding(model.get_input_embeddings(), mask_id))
    return gate


def find_gate(model: nn.Module) -> Gate | None:
    """The gate of a model with gated adapters, else None."""
    for mod in model.modules():
        if isinstance(mod, GatedLoRALinear):
            return mod.gate
    return None


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors of a gated model: every adapter's A and B and the mask embedding's offset."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith(("lora_A", "lora_B", "mask_delta"))}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load :func:`adapter_state` tensors into a model given the same adapters; errors name what does not fit."""
    own = dict(model.named_parameters())
    expected = {n for n in own if n.endswith(("lora_A", "lora_B", "mask_delta"))}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise EdlmError(f"the adapter does not fit the model: {len(missing)} tensors missing (e.g. "
                        f"{missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained with "
                        "other lora.target_modules / lora.layers or on another source?")
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:
                raise EdlmError(f"adapter tensor {name} has shape {tuple(value.shape)}, the model expects "
                                f"{tuple(own[name].shape)}: the adapter was trained on another source")
            own[name].copy_(value)
