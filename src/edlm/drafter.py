"""A block-diffusion drafter over a frozen source's features (DFlash's design, arXiv 2602.06036, made small for a CPU).

The source stays as it is and verifies; the drafter only guesses. After every verify the source has committed its
own next token ``t`` at position ``p``; the drafter then drafts positions ``p+1 .. p+B-1`` in one forward over the
block ``[t, mask, ..., mask]`` (bidirectional inside the block, no token shift: the state at position i predicts
token i). It reads the source through **KV injection**: the outputs of a few source layers at every verified
position are concatenated, projected to the source's width (``fc``, then RMSNorm) and become extra keys/values of
*every* drafter layer, through that layer's own k/v projections::

    queries:  block columns p .. p+B-1               keys:  context positions 0 .. p-1  |  block columns
              (t, then masks)                               (source features)               (bidirectional)

The embedding is the source's (frozen; the mask column has a learned embedding of its own), and the output layer
is the source's, sliced to a **draft vocabulary** (EAGLE-3's reduced vocabulary: the ``draft_vocab_size`` most
frequent tokens of the training answers, ``d2t`` maps a draft index to a token id). Verification keeps the full
vocabulary, so output stays the source's own, exactly.

A drafter folder holds ``drafter.safetensors`` (the trained tensors only: a few MB) and ``drafter_config.json``
(DFlash's keys where they fit: ``target_layer_ids``, ``block_size``, ``mask_token_id``; plus the source's name and a
fingerprint of its weights, so a drafter is refused on another source).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from edlm.compat import cache_kwargs
from edlm.errors import EdlmError

logger = logging.getLogger(__name__)

CONFIG_NAME = "drafter_config.json"
WEIGHTS_NAME = "drafter.safetensors"


# ------------------------------------------------------------------------------------------------ the source


def source_forward(model, ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   cache: Any, layers: tuple[int, ...], logits_to_keep: int = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached forward of the source: (logits (R, kept, V) fp32, features (R, Q, len(layers), D) fp32).

    ``features`` are the outputs of the decoder layers numbered in ``layers`` (0-based; Hugging Face's
    ``hidden_states[i + 1]``). Runs on the compiled engine (:class:`edlm.engine.Engine`) or any Hugging Face causal LM.
    """
    kwargs = dict(input_ids=ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=True,
                  logits_to_keep=logits_to_keep, **cache_kwargs(model, cache))
    if hasattr(model, "new_cache"):  # the engine returns the layers it is asked for
        out = model(feature_layers=tuple(layers), **kwargs)
        return out.logits.float(), out.features
    out = model(output_hidden_states=True, **kwargs)
    feats = torch.stack([out.hidden_states[i + 1] for i in layers], dim=2)
    return out.logits.float(), feats.float()


def fingerprint(model: nn.Module) -> str:
    """A short hash of a source's weights (a few values of every tensor: cheap, and any retrained or other model
    differs)."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float()
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(sample.numpy().round(5).tobytes())
    return h.hexdigest()[:16]


def default_target_layers(num_layers: int, n: int = 5) -> list[int]:
    """DFlash's choice: ``n`` layers spread evenly from the 2nd to the third-from-last."""
    lo, hi = 1, max(1, num_layers - 3)
    if n == 1:
        return [hi]
    return sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)})


# ------------------------------------------------------------------------------------------------ the config


@dataclass
class DrafterConfig:
    """The drafter's shape and what it reads (saved as ``drafter_config.json``)."""

    target_layer_ids: list[int]
    """Source decoder layers whose outputs are the drafter's context (0-based; DFlash's key)."""
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    """The source's vocabulary (the verify's)."""
    draft_vocab_size: int
    """Tokens the drafter can propose (the rest are never drafted; verification still sees them all)."""
    num_hidden_layers: int = 1
    """Drafter layers."""
    block_size: int = 8
    """Columns per draft: the verified token, then ``block_size - 1`` guesses."""
    mask_token_id: int | None = None
    """DFlash's key. None: the mask column has a learned embedding, no token id."""
    feature_norm: bool = True
    """RMS-normalise each source layer's features (learned scale per layer and channel) before they are fused.
    Without it a few channels carrying the source's massive activations (SmolLM2: ~25x the median channel, and
    ~25,000 at some tokens) and the deepest layer's scale dominate the fused state."""
    input_features: bool = True
    """Also add the context state of the position just before a block (the last one the source verified) to every
    column's input, through ``in_proj`` (the identity at the start): EAGLE's input fusion on top of DFlash's KV
    injection, so a shallow drafter starts from the source's state instead of a bare mask."""
    init: str = "source"
    """``source``: drafter layer i starts as a copy of source layer ``init_layers[i]``; ``random``: initialised at
    random (std 0.02). On SmolLM2 a random layer led for the first ~500 steps, then fell behind (docs/drafter.md)."""
    init_layers: list[int] = field(default_factory=list)
    """Source layers copied by ``init: source`` (default: the last ``num_hidden_layers`` layers)."""
    source: str = ""
    """The source's name (its spec)."""
    source_fingerprint: str = ""
    """:func:`fingerprint` of the source's weights."""

    def __post_init__(self) -> None:
        if self.num_hidden_layers < 1 or self.block_size < 2:
            raise EdlmError("drafter: num_hidden_layers must be >= 1 and block_size >= 2")
        if not self.target_layer_ids:
            raise EdlmError("drafter: target_layer_ids must name at least one source layer")
        if self.init not in ("source", "random"):
            raise EdlmError(f"drafter: init is 'source' or 'random', not {self.init!r}")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise EdlmError(f"drafter: draft_vocab_size must be in [1, {self.vocab_size}], got "
                            f"{self.draft_vocab_size}")

    @classmethod
    def for_source(cls, model: nn.Module, source: str = "", **settings: Any) -> DrafterConfig:
        """A config shaped like ``model`` (a Llama-family causal LM), with ``settings`` overriding the defaults."""
        c = model.config
        heads = c.num_attention_heads
        n_layers = c.num_hidden_layers
        settings.setdefault("target_layer_ids", default_target_layers(n_layers))
        bad = [i for i in settings["target_layer_ids"] if not 0 <= i < n_layers - 1]
        if bad:
            raise EdlmError(f"drafter: target layers {bad} out of range: the source has {n_layers} layers and the "
                            f"last one's output is not a feature (use 0..{n_layers - 2})")
        settings.setdefault("draft_vocab_size", c.vocab_size)
        return cls(hidden_size=c.hidden_size, num_attention_heads=heads,
                   num_key_value_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate_size=c.intermediate_size, rms_norm_eps=c.rms_norm_eps, vocab_size=c.vocab_size,
                   source=source, source_fingerprint=fingerprint(model), **settings)


# ------------------------------------------------------------------------------------------------ the model


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class DraftLayer(nn.Module):
    """A Llama decoder layer whose attention also reads injected context keys/values."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, d, bias=False)
        self.gate_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, d, bias=False)
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (R, KV, C, hd) of context states ctx (R, C, D) at rotary tables cos/sin (R, C, hd)."""
        r, c, _ = ctx.shape
        k = self.k_proj(ctx).view(r, c, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(ctx).view(r, c, self.kv_heads, self.head_dim).transpose(1, 2)
        return _rotate(k, cos[:, None], sin[:, None]), v

    def forward(self, x: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (R, Q, D) block columns at rotary tables cos/sin (R, Q, hd); ctx_k/ctx_v (R, KV, C, hd); mask
        (R, 1, Q, C + Q) bool over [context ; block] keys."""
        r, q_len, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(r, q_len, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(r, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(r, q_len, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos[:, None], sin[:, None]), _rotate(k, cos[:, None], sin[:, None])
        k, v = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)  # (R, KV, C + Q, hd)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        x = x + self.o_proj(a.transpose(1, 2).reshape(r, q_len, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Drafter(nn.Module):
    """The drafter over a frozen ``source`` (see the module docstring). Trained tensors: ``fc``, ``hidden_norm``,
    the layers, ``mask_embedding`` and the final ``norm``; the embedding, the rotary tables and the (sliced) output
    layer are read from the source and never saved."""

    def __init__(self, cfg: DrafterConfig, source: nn.Module, d2t: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        n = len(cfg.target_layer_ids)
        self.fc = nn.Linear(n * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.feature_norm = nn.Parameter(torch.ones(n, d)) if cfg.feature_norm else None
        self.in_proj = nn.Linear(d, d, bias=False) if cfg.input_features else None
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        embed = source.get_input_embeddings().weight.detach().float()
        self.mask_embedding = nn.Parameter(embed.mean(0).clone())
        if d2t is None:
            d2t = torch.arange(cfg.draft_vocab_size)
        if d2t.shape != (cfg.draft_vocab_size,):
            raise EdlmError(f"drafter: d2t has shape {tuple(d2t.shape)}, expected ({cfg.draft_vocab_size},)")
        self.register_buffer("d2t", d2t.long().clone())
        # The source's tables, shared and frozen (buffers that are not saved).
        self.register_buffer("embed", embed, persistent=False)
        head = source.get_output_embeddings().weight.detach().float()
        self.register_buffer("head", head[self.d2t].contiguous(), persistent=False)
        self._rope_module = (_rotary(source),)  # a tuple: not registered as a submodule of the drafter
        self.reset_parameters(source)

    # ------------------------------------------------------------------------------------ set-up

    @torch.no_grad()
    def reset_parameters(self, source: nn.Module) -> None:
        """``init: source`` copies source layers into the drafter's; ``random`` draws N(0, 0.02). ``fc`` starts as
        the mean of the feature layers (so the context state starts as a normed mix of source states)."""
        n = len(self.cfg.target_layer_ids)
        d = self.cfg.hidden_size
        self.fc.weight.copy_(torch.cat([torch.eye(d)] * n, dim=1) / n)
        self.hidden_norm.weight.fill_(1.0)
        if self.feature_norm is not None:
            self.feature_norm.fill_(1.0)
        if self.in_proj is not None:
            self.in_proj.weight.copy_(torch.eye(d))
        self.norm.weight.copy_(_final_norm(source).weight.detach().float())
        src_layers = source.model.layers
        picks = self.cfg.init_layers or list(range(len(src_layers) - len(self.layers), len(src_layers)))
        for layer, pick in zip(self.layers, picks):
            if self.cfg.init == "random":
                for p in layer.parameters():
                    if p.dim() == 2:
                        nn.init.normal_(p, std=0.02)
                continue
            src = src_layers[pick]
            pairs = [(layer.q_proj, src.self_attn.q_proj), (layer.k_proj, src.self_attn.k_proj),
                     (layer.v_proj, src.self_attn.v_proj), (layer.o_proj, src.self_attn.o_proj),
                     (layer.gate_proj, src.mlp.gate_proj), (layer.up_proj, src.mlp.up_proj),
                     (layer.down_proj, src.mlp.down_proj), (layer.input_layernorm, src.input_layernorm),
                     (layer.post_attention_layernorm, src.post_attention_layernorm)]
            for mine, theirs in pairs:
                mine.weight.copy_(theirs.weight.detach().float())

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (R, Q, hd) of positions (R, Q), from the source's own rotary module."""
        cos, sin = self._rope_module[0](self.embed[:1], positions)
        return cos.float(), sin.float()

    def context(self, features: torch.Tensor) -> torch.Tensor:
        """The injected context states (R, C, D) of source features (R, C, n, D)."""
        x = features.float()
        if self.feature_norm is not None:  # (.., n, D): each layer's vector on its own scale
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * self.feature_norm
        return self.hidden_norm(self.fc(x.flatten(-2)))

    # ------------------------------------------------------------------------------------ the forward

    def forward(self, first: torch.Tensor, positions: torch.Tensor, ctx: torch.Tensor,
                ctx_positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Draft logits (R, A*B, draft_vocab_size) of A blocks per row, each ``[first token, mask, ...]`` (training:
        many blocks over one context).

        Args:
            first: (R, A) the verified token opening each block.
            positions: (R, A*B) absolute positions of the block columns.
            ctx: (R, C, D) context states (:meth:`context`).
            ctx_positions: (R, C) their positions.
            mask: (R, A*B, C + A*B) bool: which context and block columns each block column sees.
        """
        ccos, csin = self.rope(ctx_positions)
        kvs = [layer.context_kv(ctx, ccos, csin) for layer in self.layers]
        last = None
        if self.in_proj is not None:  # the context state just before each block's anchor (position anchor - 1)
            r, a = first.shape
            before = (positions.view(r, a, -1)[..., 0] - 1).clamp(0, ctx.shape[1] - 1)  # (R, A)
            last = ctx.gather(1, before[..., None].expand(-1, -1, ctx.shape[-1]))
        return self.draft_logits(first, positions, kvs, mask, last)

    def draft_logits(self, first: torch.Tensor, positions: torch.Tensor,
                     kvs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                     last: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`forward` over context keys/values already projected per layer (``kvs``: (R, KV, C, hd) pairs, as
        :class:`DraftContext` keeps them); ``last`` (R, A, D): the context state before each block (needed with
        ``input_features``)."""
        r, a = first.shape
        b = self.cfg.block_size
        x = self.mask_embedding.expand(r, a, b, -1).clone()
        x[:, :, 0] = self.embed[first]
        if self.in_proj is not None:
            x = x + self.in_proj(last)[:, :, None, :]
        x = x.reshape(r, a * b, -1)  # (R, A*B, D)
        cos, sin = self.rope(positions)
        for layer, (k, v) in zip(self.layers, kvs):
            x = layer(x, k, v, cos, sin, mask[:, None])
        return self.norm(x) @ self.head.T

    # ------------------------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write the drafter folder atomically (a temporary folder, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
                   for k, v in self.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME))
        (tmp / WEIGHTS_NAME).chmod(0o644)  # safetensors writes owner-only; a shipped drafter must be readable
        (tmp / CONFIG_NAME).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        _swap_in(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, source: nn.Module, check: bool = True) -> Drafter:
        """A saved drafter over ``source``; refused (clear error) when ``source`` is not the one it was trained on."""
        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise EdlmError(f"no drafter in {str(path)!r} (no {CONFIG_NAME}); train one with: edlm drafter")
        cfg = DrafterConfig(**json.loads((path / CONFIG_NAME).read_text()))
        if check and cfg.source_fingerprint and cfg.source_fingerprint != fingerprint(source):
            raise EdlmError(f"the drafter in {path} was trained for another source ({cfg.source or 'unnamed'}, "
                            f"weights {cfg.source_fingerprint}); this model's weights are {fingerprint(source)}. "
                            "Train a drafter for it with: edlm drafter --model ...")
        state = load_file(str(path / WEIGHTS_NAME))
        drafter = cls(cfg, source, d2t=state["d2t"])
        drafter.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return drafter.eval()


def drafter_source(path: str | os.PathLike) -> str:
    """The source spec a drafter folder names (``embedded`` for the embedded SmolLM2)."""
    path = Path(path) / CONFIG_NAME
    if not path.is_file():
        raise EdlmError(f"no drafter in {str(path.parent)!r} (no {CONFIG_NAME}); train one with: edlm drafter")
    return json.loads(path.read_text()).get("source") or "embedded"


class DraftContext:
    """What the drafter has read of each row: the per-layer keys/values (R, KV, C, hd) of the source features at
    the row's verified positions 0 .. length-1 (positions are contiguous: a row's verified tokens are a prefix)."""

    def __init__(self, drafter: Drafter, rows: int):
        self.drafter = drafter
        self.length = [0] * rows
        self.last: list[torch.Tensor | None] = [None] * rows  # each row's latest context state (D,)
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor] | None]] = [[None] * rows for _ in drafter.layers]

    @torch.no_grad()
    def extend(self, row: int, features: torch.Tensor) -> None:
        """Append the features (n, layers, D) of the row's next ``n`` positions."""
        n = features.shape[0]
        if n == 0:
            return
        d = self.drafter
        pos = torch.arange(self.length[row], self.length[row] + n)[None]
        cos, sin = d.rope(pos)
        ctx = d.context(features[None])
        self.last[row] = ctx[0, -1]
        for layer, store in zip(d.layers, self.kv):
            k, v = layer.context_kv(ctx, cos, sin)  # (1, KV, n, hd)
            old = store[row]
            store[row] = (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))
        self.length[row] += n

    @torch.no_grad()
    def draft(self, rows: list[int], first: list[int]) -> torch.Tensor:
        """Draft logits (len(rows), B, Vd) of one block per given row, opening at the row's next position with
        token ``first[i]`` and seeing every position the row has read."""
        d = self.drafter
        b = d.cfg.block_size
        lengths = torch.tensor([self.length[r] for r in rows])
        width = int(lengths.max())
        kvs = []
        for store in self.kv:
            ks, vs = [], []
            for r in rows:
                k, v = store[r]
                pad = width - k.shape[2]
                ks.append(F.pad(k, (0, 0, 0, pad)))
                vs.append(F.pad(v, (0, 0, 0, pad)))
            kvs.append((torch.cat(ks), torch.cat(vs)))
        ctx_mask = torch.arange(width)[None, :] < lengths[:, None]  # (R, C)
        mask = torch.cat([ctx_mask[:, None, :].expand(-1, b, -1), torch.ones(len(rows), b, b, dtype=torch.bool)], -1)
        positions = lengths[:, None] + torch.arange(b)
        last = torch.stack([self.last[r] for r in rows])[:, None] if d.in_proj is not None else None
        return d.draft_logits(torch.tensor(first)[:, None], positions, kvs, mask, last)


def copy_drafter(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy a drafter folder (its weights and config, nothing else) to ``dest``, atomically."""
    src, dest = Path(src), Path(dest)
    if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise EdlmError(f"no drafter in {str(src)!r}; train one with: edlm drafter")
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copyfile(src / name, tmp / name)
        (tmp / name).chmod(0o644)
    _swap_in(tmp, dest)
    return dest


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the finished folder ``tmp`` at ``path``, replacing what was there."""
    if path.exists():
        old = path.with_name(path.name + f".old{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        _remove_tree(old)
    else:
        os.replace(tmp, path)


def _remove_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    path.rmdir()


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "inner", model).model  # the engine keeps the Hugging Face model as .inner


def _rotary(model: nn.Module) -> nn.Module:
    return _base(model).rotary_emb


def _final_norm(model: nn.Module) -> nn.Module:
    return _base(model).norm


# ------------------------------------------------------------------------------------------------ training


def position_weights(block: int, gamma: float) -> torch.Tensor:
    """DFlash's loss weight per block column: 0 at column 0 (the known token), exp(-(k-1)/gamma) at column k."""
    k = torch.arange(block, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def training_mask(anchors: torch.Tensor, ctx_len: int, block: int) -> torch.Tensor:
    """(R, A*B, C + A*B) bool for A blocks per row opening at positions ``anchors`` (R, A): a block column sees the
    context positions before its anchor, and its own block (bidirectional)::

        anchors = [2, 4], C = 6, B = 2        ctx 0 1 2 3 4 5 | blk 0 0 1 1
                                         q0     x x . . . . |     x x . .
                                         q0     x x . . . . |     x x . .
                                         q1     x x x x . . |     . . x x
                                         q1     x x x x . . |     . . x x
    """
    r, a = anchors.shape
    q_block = torch.arange(a * block) // block  # (Q,)
    ctx = torch.arange(ctx_len)[None, None, :] < anchors.repeat_interleave(block, dim=1)[:, :, None]  # (R, Q, C)
    own = (q_block[:, None] == q_block[None, :]).expand(r, -1, -1)  # (R, Q, Q)
    return torch.cat([ctx, own], dim=-1)


def draft_vocabulary(token_counts: torch.Tensor, size: int, always: list[int] | None = None) -> torch.Tensor:
    """The ``size`` most frequent token ids (counts (V,)), with the ids in ``always`` (e.g. EOS) included;
    sorted ascending."""
    counts = token_counts.clone().float()
    for t in always or []:
        counts[t] = float("inf")
    return counts.topk(size).indices.sort().values


def block_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross-entropy of draft logits (N, A*B, Vd) against draft-vocabulary labels (N, A*B) (-100:
    ignored); ``weights`` (B,) per block column. Normalised by the weights of the counted columns."""
    n, q, vd = logits.shape
    w = weights.repeat(q // weights.numel())[None].expand(n, -1) * (labels >= 0)
    ce = F.cross_entropy(logits.reshape(-1, vd).float(), labels.clamp_min(0).reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum().clamp_min(1e-9)


def expected_run(correct: torch.Tensor) -> float:
    """Mean accepted length of drafts given per-column correctness (N, B-1) bool: the run of leading Trues."""
    run = correct.long().cumprod(dim=-1).sum(-1)
    return float(run.float().mean()) if run.numel() else math.nan
