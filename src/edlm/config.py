"""Configuration dataclasses, validated on construction, and their YAML round trip.

A YAML preset is a serialized :class:`TrainConfig`; nested sections map to nested dataclasses. Unknown keys are
errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from edlm.errors import ConfigError

T = TypeVar("T")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass
class DiffusionConfig:
    """How an AR model is turned into a block-diffusion model; saved beside the converted weights."""

    block_size: int = 16
    """Tokens per block. Blocks start at absolute positions 0, B, 2B, ... in training and decoding alike."""
    pattern: str = "block_causal_clean"
    """Attention pattern name from ``edlm.masks.PATTERNS`` (``block_causal_clean``, ``bidirectional``,
    ``block_causal_noisy``, ``causal``)."""
    token_shift: bool = False
    """If true the hidden state at position i-1 predicts token i (AR-style head); if false position i predicts i."""
    clean_causal: bool = False
    """Variant: clean tokens attend causally (j <= i) instead of block-causally; decoding's prefill follows it."""
    schedule: str = "position_dependent"
    """Masking schedule name from ``edlm.schedules.SCHEDULES`` (``uniform``, ``position_dependent``)."""
    sharpness: float = 10.0
    """Position-dependent schedule only: 1/lambda of the paper. Weight of in-block position i is
    ``exp(beta * (1 - t) * i)`` with ``beta = sharpness * ln 2 / block_len``; 0 is uniform, 10 is the paper's
    lambda = 0.1, negative values mask earlier positions more (the paper's failing reversed variant)."""
    eps: float = 1e-3
    """Smallest mask ratio: t is drawn from U(eps, 1]."""
    loss_weighting: str = "inv_t"
    """``inv_t``: masked cross-entropy weighted by 1/t (the ELBO, paper Eq. 1); ``mean``: plain mean over masked."""
    complementary: bool = False
    """Also train on the complement of each mask (every token is predicted once per sequence)."""
    ar_weight: float = 0.0
    """Weight of an AR next-token loss on the clean copy, computed in the same forward (needs ``clean_causal: true``
    and a pattern with a clean copy, so that each clean token sees only its past). The successor recipe
    (Nemotron-Labs-Diffusion) uses ``ar_weight: 1.0`` with ``diffusion_weight: 0.3``; 0 is the paper's
    diffusion-only objective."""
    diffusion_weight: float = 1.0
    """Weight of the masked-token (diffusion) loss."""
    mask_token: str = "<|mask|>"
    """The mask token's text; added to the tokenizer as a special token when missing."""
    mask_token_id: int | None = None
    """Id of the mask token; filled in by ``DiffusionLM`` once the tokenizer is known."""

    def __post_init__(self) -> None:
        from edlm.masks import PATTERNS
        from edlm.schedules import SCHEDULES

        _check(isinstance(self.block_size, int) and self.block_size >= 1,
               f"diffusion.block_size must be a positive integer, got {self.block_size!r}")
        _check(self.pattern in PATTERNS,
               f"unknown attention pattern {self.pattern!r}; choose one of {sorted(PATTERNS)}")
        _check(self.schedule in SCHEDULES,
               f"unknown masking schedule {self.schedule!r}; choose one of {sorted(SCHEDULES)}")
        _check(math.isfinite(self.sharpness) and abs(self.sharpness) <= 100,
               f"diffusion.sharpness must be a finite number in [-100, 100] (paper: 10), got {self.sharpness!r}")
        _check(0.0 < self.eps < 1.0, f"diffusion.eps must be in (0, 1), got {self.eps!r}")
        _check(self.loss_weighting in ("inv_t", "mean"),
               f"diffusion.loss_weighting must be 'inv_t' or 'mean', got {self.loss_weighting!r}")
        _check(bool(self.mask_token), "diffusion.mask_token must be a non-empty string")
        _check(math.isfinite(self.ar_weight) and self.ar_weight >= 0 and math.isfinite(self.diffusion_weight)
               and self.diffusion_weight >= 0 and self.ar_weight + self.diffusion_weight > 0,
               f"diffusion.ar_weight and diffusion.diffusion_weight must be >= 0 and not both 0, got "
               f"{self.ar_weight!r} and {self.diffusion_weight!r}")
        if self.ar_weight > 0:
            _check(self.clean_causal and PATTERNS[self.pattern].clean_copy,
                   f"diffusion.ar_weight > 0 trains an AR loss on the clean copy, which must see only its past: set "
                   f"diffusion.clean_causal: true and a pattern with a clean copy (block_causal_clean), got "
                   f"pattern {self.pattern!r}, clean_causal {self.clean_causal}")


@dataclass
class DataConfig:
    """Where training text comes from and how it is packed."""

    corpus: list[str] = field(default_factory=lambda: ["builtin:shakespeare"])
    """Sources: text/jsonl/json/parquet files or folders of them, ``datasets.save_to_disk`` folders, or
    ``builtin:NAME`` (``shakespeare``, ``tiny``)."""
    seq_len: int = 512
    """Tokens per packed training sequence; a multiple of ``diffusion.block_size``."""
    text_field: str = "text"
    """Column holding the text in jsonl/json/parquet/saved datasets."""
    max_documents: int | None = None
    """Use at most this many documents (after loading), for quick runs."""
    validation_fraction: float = 0.0
    """Fraction of packed sequences held out for validation loss (0 disables)."""
    align_documents: bool = False
    """Start every document at a block boundary, as decoding does (a prompt starts at position 0): each document
    is packed as ``EOS document EOS`` followed by EOS up to a multiple of ``diffusion.block_size``. Without it,
    documents follow each other at any offset inside a block. Matters for short documents (task problems)."""

    def __post_init__(self) -> None:
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        _check(len(self.corpus) > 0, "data.corpus is empty; give at least one file, folder or builtin:NAME")
        _check(isinstance(self.seq_len, int) and self.seq_len >= 2,
               f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        _check(0.0 <= self.validation_fraction < 1.0,
               f"data.validation_fraction must be in [0, 1), got {self.validation_fraction!r}")


@dataclass
class LoraConfig:
    """LoRA adapters (peft); merged into the weights when the model is saved."""

    r: int = 16
    """Rank of the adapters (paper: 16 and 64)."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str | list[str] = "all-linear"
    """Modules that get adapters; ``all-linear`` is every attention and MLP linear (the paper's choice)."""
    train_embeddings: bool = True
    """Also train embeddings, norms and the LM head fully (the paper's setting; the mask embedding must learn).
    Ignored with ``gated``, which trains the mask token's embedding only."""
    gated: bool = False
    """Gated adapters over a frozen source (:mod:`edlm.adapter`): they act only on the noisy columns, so the
    prompt, the clean copy and every committed token run the source's own weights, and speculative decoding is
    lossless against the unmodified source. Saved unmerged, a few MB, as an adapter folder that names its source."""
    layers: list[int] | None = None
    """Gated adapters only: decoder layer indices that get adapters (negative counts from the top); None: all."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, f"lora.r must be >= 1, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(self.layers is None or self.gated, "lora.layers is supported for gated adapters only")
        _check(not self.gated or self.dropout == 0.0, "gated adapters have no dropout: set lora.dropout: 0")


@dataclass
class TrainConfig:
    """One conversion run: ``edlm convert`` reads it from YAML."""

    model: str | None = None
    """Source AR model: a Hugging Face folder, ``tiny`` / ``tiny:FAMILY`` (random test model), or None for
    the embedded SmolLM2-135M-Instruct."""
    output_dir: str = "runs/convert"
    """Folder for checkpoints, ``metrics.jsonl`` and the final converted model."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The diffusion settings saved with the model."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training text."""
    lora: LoraConfig | None = None
    """LoRA settings; None trains all weights."""
    micro_batch_size: int = 4
    """Sequences per device per forward."""
    grad_accum: int = 1
    """Forwards per optimizer step; the global batch is micro_batch_size * grad_accum * processes."""
    max_steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-5
    """Peak learning rate (paper: 1e-5)."""
    min_lr: float = 3e-6
    """Final learning rate of the cosine schedule (paper: 3e-6)."""
    lr_schedule: str = "cosine"
    """``cosine`` (to min_lr) or ``constant``, both after a linear warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clip (0 disables)."""
    mixed_precision: str = "auto"
    """``no``, ``bf16``, ``fp16`` or ``auto`` (bf16 on a GPU that supports it, else no)."""
    attn_implementation: str = "auto"
    """``auto`` (sdpa on CPU; flex_attention on GPU when available), ``sdpa``, ``eager`` or ``flex_attention``."""
    seed: int = 0
    """Seeds the data order, the noise and any new weights."""
    log_every: int = 10
    """Write a line to metrics.jsonl every this many steps."""
    save_every: int = 200
    """Write a checkpoint every this many steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Keep this many most recent checkpoints."""
    num_threads: int | None = None
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self) -> None:
        _check(self.micro_batch_size >= 1, f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.lr > 0 and self.min_lr >= 0, f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        _check(self.lr_schedule in ("cosine", "constant"),
               f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        _check(self.mixed_precision in ("auto", "no", "bf16", "fp16"),
               f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        _check(self.attn_implementation in ("auto", "sdpa", "eager", "flex_attention"),
               f"attn_implementation must be auto, sdpa, eager or flex_attention, got {self.attn_implementation!r}")
        _check(self.log_every >= 1 and self.save_every >= 0 and self.keep_checkpoints >= 1,
               "log_every and keep_checkpoints must be >= 1 and save_every >= 0")
        if self.lora is not None and self.lora.gated:
            d = self.diffusion
            _check(d.pattern == "block_causal_clean" and d.clean_causal and d.ar_weight == 0,
                   "a gated adapter drafts over the frozen source's causal context: set diffusion.pattern: "
                   "block_causal_clean, diffusion.clean_causal: true and diffusion.ar_weight: 0 (the source is not "
                   f"trained), got {d.pattern!r}, clean_causal {d.clean_causal}, ar_weight {d.ar_weight}")
        _check(self.data.seq_len % self.diffusion.block_size == 0,
               f"data.seq_len ({self.data.seq_len}) is not a multiple of diffusion.block_size "
               f"({self.diffusion.block_size}); blocks must tile the sequence: pick e.g. seq_len="
               f"{max(1, self.data.seq_len // self.diffusion.block_size) * self.diffusion.block_size}")


DECODE_MODES = ("diffusion", "ar", "speculative")


@dataclass
class DecodeConfig:
    """How a converted model generates text."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per prompt."""
    mode: str = "diffusion"
    """``diffusion``: the block decoder (several tokens per forward, output depends on ``threshold``); ``ar``: the
    converted weights decoded causally with a KV cache, one token per forward; ``speculative``: the diffusion head
    drafts a block, a causal pass of the same weights verifies it, and the agreeing prefix plus the causal pass's
    own next token are kept (greedy output identical to ``ar``)."""
    fused_draft: bool = True
    """``speculative``: draft the next block in the same forward that verifies the current draft (False: a separate
    draft forward after each verification)."""
    draft_hypotheses: int = 2
    """``speculative``: how many acceptance lengths of the current draft the next block is drafted for, in one
    forward (the whole draft, then 0, 1, ...): a rejected draft then still leaves a draft made from verified tokens.
    Each costs a block of extra tokens in the forward."""
    aligned_draft: bool = True
    """``speculative``: draft the aligned block (0, B, 2B, ...) holding the next open position, as training and the
    diffusion decoder place blocks, so a draft ends at the block's end (and is empty at its last position). False:
    the drafted block starts at the next open position, so every draft has ``block_size - 1`` guesses (with token
    shift) whatever the position; a drafted block then sees the same clean context as a training block does."""
    draft_cut: float = 0.0
    """``speculative`` with a drafter: cut each draft where the running product of its guesses' confidences falls
    below this (0: verify every guess; the verify's cost grows with its width)."""
    verify_costs: tuple[float, ...] | None = None
    """``speculative`` with a drafter: the cost of a cycle that verifies ``k`` drafts (``verify_costs[k]``: a forward
    of k + 1 columns plus the draft, any unit; k = 0 .. block - 1). When given, each draft keeps the length that
    maximises its expected committed tokens (1 + the sum of its running confidences) per unit of cost, instead of
    ``draft_cut``. ``edlm demo --draft-cut auto`` measures them."""
    block_size: int | None = None
    """Decoding block size; None uses the model's training block size. Must be a multiple or divisor of it."""
    policy: str = "threshold"
    """Commit policy from ``edlm.decode.POLICIES``: ``threshold``, ``fixed``, ``left_to_right``, ``entropy`` (the
    EB-sampler), ``entropy_sum``."""
    threshold: float = 0.9
    """``threshold`` policy: commit every masked position whose confidence is at least this (always >= 1)."""
    tokens_per_step: int = 1
    """``fixed`` policy: commit this many most confident positions per step."""
    entropy_bound: float = 0.1
    """``entropy`` / ``entropy_sum`` policies: commit the least uncertain open positions while their predictive
    entropies (``entropy``: less the largest, the EB-sampler) sum to at most this many nats (always >= 1)."""
    ignore_eos: bool = False
    """Keep generating after EOS until ``max_new_tokens`` (benchmarks: every run produces the same token count)."""
    temperature: float = 0.0
    """0 is greedy; otherwise sample from softmax(logits / temperature)."""
    top_p: float = 1.0
    """Nucleus sampling mass (with temperature > 0)."""
    seed: int = 0
    """Seed of the sampling generator."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (checked on decoded text at the edges, by the caller)."""
    use_cache: bool = True
    """Cache keys/values of finished blocks (False recomputes the whole sequence each step)."""

    def __post_init__(self) -> None:
        _check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _check(self.mode in DECODE_MODES, f"unknown decoding mode {self.mode!r}; choose one of {list(DECODE_MODES)}")
        _check(self.block_size is None or self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _check(0.0 < self.threshold <= 1.0, f"threshold must be in (0, 1], got {self.threshold}")
        _check(0.0 <= self.draft_cut < 1.0, f"draft_cut must be in [0, 1), got {self.draft_cut}")
        if self.verify_costs is not None:
            self.verify_costs = tuple(float(c) for c in self.verify_costs)
            _check(len(self.verify_costs) >= 1 and all(math.isfinite(c) and c > 0 for c in self.verify_costs),
                   f"verify_costs must be positive numbers, one per verify width, got {self.verify_costs}")
        _check(self.draft_hypotheses >= 1, f"draft_hypotheses must be >= 1, got {self.draft_hypotheses}")
        _check(self.tokens_per_step >= 1, f"tokens_per_step must be >= 1, got {self.tokens_per_step}")
        _check(math.isfinite(self.entropy_bound) and self.entropy_bound >= 0,
               f"entropy_bound must be a number >= 0 (nats), got {self.entropy_bound}")
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")


# --------------------------------------------------------------------------------------------- (de)serialization


def _resolve_type(tp: Any) -> Any:
    """Strip Optional[...] to the dataclass inside, if any."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise ``ConfigError``."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or cls.__name__}; valid keys: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        tp = _resolve_type(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{key}.")
        kwargs[key] = _coerce(tp, value, f"{where}{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"bad value in {where or cls.__name__}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Numbers written in ways YAML 1.1 reads as strings (``1e-4``) become the field's type."""
    try:
        if tp is float and isinstance(value, (str, int)) and not isinstance(value, bool):
            return float(value)
        if tp is int and isinstance(value, str):
            return int(value)
    except ValueError:
        raise ConfigError(f"{key} must be a {tp.__name__}, got {value!r}") from None
    return value


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls`` (what the CLI shows as a flag's help)."""
    docs: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def to_dict(obj: Any) -> dict[str, Any]:
    """A plain nested dict of a dataclass (for YAML / JSON)."""
    return dataclasses.asdict(obj)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings (values parsed as YAML) to a nested dict, in place; returns it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. diffusion.block_size=8)")
        key, value = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(value)
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with a clear error when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; presets live in configs/ "
                          "(e.g. configs/tiny.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of settings at top level")
    return data


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      **fields: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from an optional YAML file, ``key=value`` overrides, then explicit fields."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    data.update({k: v for k, v in fields.items() if v is not None})
    return from_dict(TrainConfig, data)
