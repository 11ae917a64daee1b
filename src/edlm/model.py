"""DiffusionLM: any Hugging Face causal LM driven as a block-diffusion LM through its own arguments.

No modeling code is copied: the wrapper passes a custom 4D attention mask (or a flex ``BlockMask``), explicit
``position_ids`` and ``logits_to_keep`` to the model's ordinary ``forward``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from edlm.adapter import Columns, adapter_state, attach, find_gate, load_adapter_state
from edlm.api import complete, encode_prompt, generate_text
from edlm.checkpoints import load_hf, resolve_model
from edlm.compat import cache_kwargs, new_cache  # noqa: F401 (re-exported: edlm.model.new_cache)
from edlm.config import DiffusionConfig, from_dict
from edlm.errors import EdlmError
from edlm.masks import PATTERNS, MaskMod, causal, dense_mask, flex_block_mask, noisy_over_clean, to_attention_mask
from edlm.noising import Noised

logger = logging.getLogger(__name__)

EDLM_CONFIG_NAME = "edlm_config.json"
ADAPTER_CONFIG_NAME = "edlm_adapter.json"
"""In a gated adapter folder: the adapter's settings and the source it belongs to (see :mod:`edlm.adapter`)."""
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar training loss (weighted per ``loss_weighting``)."""
    masked_ce: torch.Tensor
    """Scalar: unweighted mean cross-entropy over masked tokens (comparable across weightings)."""
    n_masked: int
    """Number of masked (scored) tokens."""
    ar_ce: torch.Tensor | None = None
    """Scalar: the AR next-token cross-entropy on the clean copy (``ar_weight > 0`` only)."""


def add_mask_token(model: nn.Module, tokenizer: Any, token: str) -> int:
    """Make sure ``token`` exists as a special token with a usable embedding row; return its id.

    A new token gets the mean of the existing input (and, if untied, output) embeddings, so the model starts from
    an "average token" rather than a random one.
    """
    vocab = tokenizer.get_vocab()
    is_new = token not in vocab
    if is_new:
        tokenizer.add_special_tokens({"mask_token": token})
    elif tokenizer.mask_token != token:
        tokenizer.mask_token = token
    token_id = tokenizer.convert_tokens_to_ids(token)
    emb = model.get_input_embeddings()
    old_rows = emb.weight.shape[0]
    if token_id >= old_rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    if is_new or token_id >= old_rows:
        with torch.no_grad():
            inp = model.get_input_embeddings().weight
            inp[token_id] = inp[: min(old_rows, token_id)].mean(dim=0)
            out = model.get_output_embeddings()
            if out is not None and out.weight.data_ptr() != inp.data_ptr():
                out.weight[token_id] = out.weight[: min(old_rows, token_id)].mean(dim=0)
                if getattr(out, "bias", None) is not None:
                    out.bias[token_id] = out.bias[: min(old_rows, token_id)].mean()
        logger.info("added mask token %r as id %d (embedding rows %d -> %d)", token, token_id, old_rows,
                    model.get_input_embeddings().weight.shape[0])
    return token_id


class DiffusionLM(nn.Module):
    """A causal LM plus its tokenizer and diffusion settings.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``), optionally wrapped by peft.
        tokenizer: its tokenizer; must contain ``config.mask_token``.
        config: diffusion settings; ``mask_token_id`` is filled in from the tokenizer.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: DiffusionConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        if config.mask_token not in vocab:
            raise EdlmError(
                f"the tokenizer has no mask token {config.mask_token!r}; convert the model with `edlm convert` "
                "(which adds it), or set diffusion.mask_token to a token the tokenizer has")
        mask_id = vocab[config.mask_token]
        if mask_id >= model.get_input_embeddings().weight.shape[0]:
            raise EdlmError(f"mask token id {mask_id} is outside the model's embedding table; re-run conversion")
        self.config = dataclasses.replace(config, mask_token_id=mask_id)
        self.pattern = PATTERNS[self.config.pattern]
        # FSDP's transformer auto-wrap looks for this on the wrapped module: the decoder layer class names.
        self._no_split_modules = getattr(model, "_no_split_modules", None)
        self._mask_cache: dict[tuple, Any] = {}
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(self._base_forward()).parameters
        self.gate = find_gate(model)
        """The adapters' gate of a gated model (None: every weight acts on every column)."""
        self.adapter: dict[str, Any] | None = None
        """A gated model's adapter settings and source reference (what ``edlm_adapter.json`` holds)."""

    # ------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_ar(cls, model: nn.Module, tokenizer: Any, config: DiffusionConfig | None = None) -> DiffusionLM:
        """Wrap an AR model for conversion, adding the mask token when the tokenizer lacks it."""
        config = config or DiffusionConfig()
        add_mask_token(model, tokenizer, config.mask_token)
        return cls(model, tokenizer, config)

    def add_gated_adapter(self, r: int, alpha: float, target_modules: str | list[str] = "all-linear",
                          layers: list[int] | None = None, source: dict[str, Any] | None = None) -> None:
        """Freeze the model and give it gated adapters (see :mod:`edlm.adapter`), in place.

        ``source`` (``{"model": spec, "seed": int}``) is what :meth:`from_pretrained` loads the source from later.
        """
        if self.gate is not None:
            raise EdlmError("the model already has gated adapters")
        if not (self.pattern.clean_copy and self.config.clean_causal):
            raise EdlmError("a gated adapter drafts over the source's own causal context: set diffusion.pattern "
                            "block_causal_clean and diffusion.clean_causal: true")
        check = _source_check(self.model)
        self.gate = attach(self.model, self.mask_id, r, alpha, target_modules, layers,
                           seed=(source or {}).get("seed", 0))
        self.adapter = {"format": 1, "r": r, "alpha": alpha, "target_modules": target_modules, "layers": layers,
                        "source": source or {"model": "embedded", "seed": 0}, "source_check": check}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
                        source: str | None = None) -> DiffusionLM:
        """Load a converted model folder written by :meth:`save_pretrained` (or by ``edlm convert``).

        A gated adapter folder (``edlm_adapter.json``) loads its source (the model it names, or ``source``: a
        Hugging Face folder, ``embedded`` or a tiny spec) and puts the adapter on it.
        """
        path = Path(path)
        cfg_file = path / EDLM_CONFIG_NAME
        if not path.is_dir():
            raise EdlmError(f"converted model folder {str(path)!r} does not exist; give the output folder of edlm "
                            "convert (e.g. runs/demo after edlm demo --model embedded)")
        if (path / ADAPTER_CONFIG_NAME).is_file():
            return _load_gated(path, dtype, device, attn_implementation, source)
        if (path / "config.json").is_file() and (path / "config.json").is_file() and not cfg_file.is_file():
            raise EdlmError(
                f"{str(path)!r} is a Hugging Face model but not a converted edlm model (no {EDLM_CONFIG_NAME}); "
                f"convert it first: edlm convert --model {path} --output-dir OUT")
        model, tokenizer = load_hf(path, dtype=dtype, attn_implementation=attn_implementation)
        config = read_diffusion_config(path)
        return cls(model.to(device), tokenizer, config)

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write a normal HF model folder plus ``edlm_config.json``; LoRA adapters are merged into the weights.

        ``state_dict`` (keys as in ``DiffusionLM.state_dict()``) replaces the live weights, e.g. a full state dict
        gathered from FSDP shards.

        Files are written to a temporary sibling folder and moved into place one by one, so a crash never
        leaves a partly written file under its final name.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".tmp-save-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        if self.gate is not None:  # a gated adapter: its few tensors and the source's reference, unmerged
            tmp.mkdir()
            from safetensors.torch import save_file

            save_file({k: v.float().contiguous() for k, v in adapter_state(self.model).items()},
                      tmp / ADAPTER_WEIGHTS_NAME)
            (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(self.adapter, indent=2) + "\n")
            (tmp / EDLM_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
            for item in sorted(tmp.iterdir()):
                os.replace(item, path / item.name)
            tmp.rmdir()
            return
        model = self.model
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if hasattr(model, "merge_and_unload"):  # peft: merge a copy; the live model keeps its adapters
            model = _merged_copy(model)
            if state_dict is not None:
                raise EdlmError("saving a gathered state dict of a LoRA model is not supported; save unsharded")
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        self.tokenizer.save_pretrained(tmp)
        (tmp / EDLM_CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        for item in sorted(tmp.iterdir()):
            os.replace(item, path / item.name)
        tmp.rmdir()

    # ------------------------------------------------------------------------------------------------ helpers

    def _base_forward(self):
        model = self.model
        if hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        return model.forward

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def attn_implementation(self) -> str:
        cfg = self.model.config
        return getattr(cfg, "_attn_implementation", None) or "sdpa"

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    def attention_mask(self, mask_mod: MaskMod, q_len: int, kv_len: int, key: tuple) -> Any:
        """The 4D mask (or flex BlockMask) for a predicate, cached under ``key``."""
        impl = self.attn_implementation
        full_key = (key, q_len, kv_len, impl, str(self.device))
        if full_key not in self._mask_cache:
            if len(self._mask_cache) > 64:
                self._mask_cache.clear()
            if impl == "flex_attention":
                mask = flex_block_mask(mask_mod, q_len, kv_len, self.device)
            else:
                dtype = self.model.get_input_embeddings().weight.dtype
                mask = to_attention_mask(dense_mask(mask_mod, q_len, kv_len, self.device), dtype, impl)
            self._mask_cache[full_key] = mask
        return self._mask_cache[full_key]

    def run(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: Any,
            keep: torch.Tensor | None = None, past_key_values: Any = None, use_cache: bool = False,
            noisy: Columns = None):
        """One forward of the underlying model; returns its output (``.logits`` only at ``keep`` positions).

        ``noisy``: the columns being drafted (a slice of the sequence dimension); a gated model's adapters act on
        those alone, every other column runs the source. Models without gated adapters ignore it.
        """
        if self.gate is not None:
            with self.gate.open(noisy):
                return self._run(input_ids, position_ids, attention_mask, keep, past_key_values, use_cache)
        return self._run(input_ids, position_ids, attention_mask, keep, past_key_values, use_cache)

    def _run(self, input_ids, position_ids, attention_mask, keep, past_key_values, use_cache):
        kwargs: dict[str, Any] = {}
        if keep is not None and self._accepts_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        if attention_mask is not None and not hasattr(attention_mask, "mask_mod") \
                and attention_mask.shape[0] == 1 and input_ids.shape[0] > 1:
            attention_mask = attention_mask.expand(input_ids.shape[0], *attention_mask.shape[1:])
        if past_key_values is not None:
            kwargs.update(cache_kwargs(self.model, past_key_values))
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=use_cache, **kwargs)
        if keep is not None and not self._accepts_logits_to_keep:
            out.logits = out.logits[:, keep] if keep.dim() == 1 else torch.gather(
                out.logits, 1, keep[..., None].expand(-1, -1, out.logits.shape[-1]))
        return out

    # ----------------------------------------------------------------------------------------------- training

    def prediction_index(self, length: int, device: torch.device) -> torch.Tensor:
        """Index into the training forward's positions whose state predicts each noisy token: (L,) long.

        No shift: noisy position i predicts token i. Token shift: the state at i - 1 predicts token i; at a block
        start that state belongs to the previous block, which is the *clean* copy when the pattern has one (as in
        decoding, where the previous block is final). Token 0 has no predictor (index 0, excluded from the loss).
        """
        idx = torch.arange(length, device=device)
        if not self.config.token_shift:
            return idx
        prev = (idx - 1).clamp_min(0)
        if self.pattern.clean_copy:
            block_start = (idx % self.config.block_size == 0) & (idx > 0)
            prev = torch.where(block_start, prev + length, prev)
        return prev

    def training_logits(self, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Logits predicting each noisy position's clean token: (B, L, V) from xt, x0 of shape (B, L)."""
        return self._training_forward(xt, x0, with_ar=False)[0]

    def _training_forward(self, xt: torch.Tensor, x0: torch.Tensor,
                          with_ar: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(noisy-half logits (B, L, V), clean-half logits at positions 0..L-2 (B, L - 1, V) when ``with_ar``):
        one forward serves the diffusion loss and, on a causal clean copy, the AR next-token loss."""
        if self.gate is not None:
            return self._gated_training_forward(xt, x0), None
        batch, length = xt.shape
        cfg = self.config
        if self.pattern.clean_copy:
            input_ids = torch.cat([xt, x0], dim=1)  # (B, 2L)
            position_ids = torch.arange(length, device=xt.device).repeat(2)[None].expand(batch, -1)
        else:
            input_ids = xt
            position_ids = torch.arange(length, device=xt.device)[None].expand(batch, -1)
        total = input_ids.shape[1]
        mask_mod = self.pattern.build(length, cfg.block_size, cfg.clean_causal)
        attn = self.attention_mask(mask_mod, total, total, key=("train", cfg.pattern, cfg.block_size,
                                                                  cfg.clean_causal, length))
        keep = self.prediction_index(length, xt.device)
        if with_ar:
            keep = torch.cat([keep, torch.arange(length, 2 * length - 1, device=xt.device)])
        logits = self.run(input_ids, position_ids, attn, keep=keep).logits
        if with_ar:
            return logits[:, :length], logits[:, length:]
        return logits, None

    def _gated_training_forward(self, xt: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Noisy-half logits (B, L, V) of a gated model, in two forwards instead of one over ``[xt ; x0]``.

        The clean copy is the frozen source (its columns' gates are closed): it runs once causally without autograd
        and hands its keys/values to the noisy stream, the only part with a backward. The noisy stream attends to
        them as in the joint forward (:func:`edlm.masks.noisy_over_clean`). With token shift a block's first token
        is predicted by the clean state before it: the source's own next-token logits, which no parameter moves.
        """
        from transformers import DynamicCache

        batch, length = xt.shape
        cfg = self.config
        positions = torch.arange(length, device=xt.device)[None].expand(batch, -1)  # (B, L)
        starts = torch.arange(cfg.block_size, length, cfg.block_size, device=xt.device)  # blocks after the first
        cache = DynamicCache(config=self.model.config)
        with torch.no_grad():
            clean_attn = self.attention_mask(causal(length, cfg.block_size), length, length,
                                             key=("train-clean", length))
            clean_keep = starts - 1 if cfg.token_shift and len(starts) else torch.tensor([length - 1])
            clean = self.run(x0, positions, clean_attn, keep=clean_keep.to(xt.device), past_key_values=cache,
                             use_cache=True).logits  # (B, n, V)
        attn = self.attention_mask(noisy_over_clean(length, cfg.block_size), length, 2 * length,
                                   key=("train-noisy", cfg.block_size, length))
        keep = (positions[0] - 1).clamp_min(0) if cfg.token_shift else positions[0]
        logits = self.run(xt, positions, attn, keep=keep, past_key_values=cache, use_cache=True,
                          noisy=slice(0, length)).logits  # (B, L, V)
        if cfg.token_shift and len(starts):
            logits = logits.index_copy(1, starts, clean.to(logits.dtype))
        return logits

    def loss(self, noised: Noised) -> LossOutput:
        """``diffusion_weight`` x the masked-token cross-entropy on the noisy half (1/t-weighted per
        ``loss_weighting``, averaged over tokens) + ``ar_weight`` x the next-token cross-entropy on the clean half."""
        cfg = self.config
        x0 = noised.x0
        logits, ar_logits = self._training_forward(noised.xt, x0, with_ar=cfg.ar_weight > 0)  # (B, L, V)
        scored = noised.masked.clone()
        if cfg.token_shift:
            scored[:, 0] = False  # token 0 has no predecessor
        n_masked = int(scored.sum())
        ar_ce = None
        if ar_logits is not None:
            ar_ce = F.cross_entropy(ar_logits.flatten(0, 1).float(), x0[:, 1:].flatten())
        if n_masked == 0:
            diffusion = logits.sum() * 0.0
            masked_ce = diffusion.detach()
        else:
            ce = F.cross_entropy(logits[scored].float(), x0[scored], reduction="none")  # (M,)
            masked_ce = ce.mean()
            diffusion = (ce / noised.ratio[scored]).sum() / x0.numel() if cfg.loss_weighting == "inv_t" else masked_ce
        loss = cfg.diffusion_weight * diffusion
        if ar_ce is not None:
            loss = loss + cfg.ar_weight * ar_ce
        return LossOutput(loss=loss, masked_ce=masked_ce.detach(), n_masked=n_masked,
                          ar_ce=None if ar_ce is None else ar_ce.detach())

    def forward(self, noised: Noised) -> LossOutput:
        return self.loss(noised)

    # ---------------------------------------------------------------------------------------------- inference
    # The text front end lives in edlm.api, above the model; these methods are shortcuts to it.

    def encode(self, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of a user prompt or a conversation (:func:`edlm.api.encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, chat)

    def generate(self, prompts: str | list[str], config: Any = None, chat: bool = True, **overrides: Any):
        """``(texts, stats)`` for one or more text prompts (:func:`edlm.api.generate_text`)."""
        return generate_text(self, prompts, config, chat, **overrides)

    def complete(self, prompts: list[list[int]], cfg: Any) -> tuple[list[str], Any]:
        """``(texts, stats)`` of token-id prompts decoded in one batch (:func:`edlm.api.complete`)."""
        return complete(self, prompts, cfg)


def _source_check(model: nn.Module) -> dict[str, Any]:
    """What identifies a source model well enough to refuse an adapter trained on another: its shape and the L1
    norm of its input embeddings (dtype-tolerant)."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    return {"model_type": getattr(cfg, "model_type", None),
            "num_hidden_layers": getattr(cfg, "num_hidden_layers", None),
            "hidden_size": getattr(cfg, "hidden_size", None), "vocab_rows": int(emb.shape[0]),
            "embedding_l1": float(emb.detach().double().abs().sum())}


def _source_mismatch(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_rows"):
        if saved.get(key) != now.get(key):
            return f"{key} is {now.get(key)!r}, the adapter was trained on {saved.get(key)!r}"
    a, b = saved.get("embedding_l1", 0.0), now.get("embedding_l1", 0.0)
    if abs(a - b) > 1e-2 * max(abs(a), 1e-12):
        return f"its embeddings differ (L1 norm {b:.6g} vs {a:.6g})"
    return None


def _load_gated(path: Path, dtype: torch.dtype, device: str | torch.device, attn_implementation: str,
                source: str | None) -> DiffusionLM:
    """A gated adapter folder on its source (see :meth:`DiffusionLM.from_pretrained`)."""
    from safetensors.torch import load_file

    try:
        spec = json.loads((path / ADAPTER_CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise EdlmError(f"{path / ADAPTER_CONFIG_NAME} is not valid JSON ({e}); re-save the adapter") from None
    weights = path / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise EdlmError(f"{str(path)!r} has {ADAPTER_CONFIG_NAME} but no {ADAPTER_WEIGHTS_NAME}: the adapter folder "
                        "is incomplete; re-run edlm convert or copy the whole folder")
    model_spec = source or spec["source"].get("model") or "embedded"
    if not model_spec.startswith(("tiny", "embedded")) and not Path(model_spec).exists() \
            and (path / model_spec).exists():
        model_spec = str(path / model_spec)  # a source path written relative to the adapter folder
    model, tokenizer = resolve_model(model_spec, dtype=torch.float32, attn_implementation=attn_implementation,
                                     seed=spec["source"].get("seed", 0))
    dlm = DiffusionLM.from_ar(model, tokenizer, read_diffusion_config(path))
    problem = _source_mismatch(spec.get("source_check", {}), _source_check(dlm.model))
    if problem:
        raise EdlmError(f"the adapter in {str(path)!r} does not belong to the source {model_spec!r}: {problem}; "
                        "give the model it was trained on (--source / source=)")
    dlm.add_gated_adapter(spec["r"], spec["alpha"], spec["target_modules"], spec.get("layers"),
                          source=spec["source"])
    load_adapter_state(dlm.model, load_file(str(weights)))
    return dlm.to(device=device, dtype=dtype)


def _merged_copy(peft_model: nn.Module) -> nn.Module:
    """Merge LoRA weights into a copy of the base model, leaving the training model untouched."""
    return copy.deepcopy(peft_model).merge_and_unload()


def read_diffusion_config(path: str | os.PathLike) -> DiffusionConfig:
    """The :class:`DiffusionConfig` saved in a converted model folder."""
    cfg_file = Path(path) / EDLM_CONFIG_NAME
    if not cfg_file.is_file():
        raise EdlmError(f"{str(path)!r} has no {EDLM_CONFIG_NAME}: it is not a model converted by edlm")
    try:
        data = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise EdlmError(f"{cfg_file} is not valid JSON ({e}); re-save the model") from None
    return from_dict(DiffusionConfig, data, where=f"{cfg_file}: ")


def source_spec(model_dir: str | os.PathLike) -> str | None:
    """The AR source a converted folder was trained from (its train_config.yaml), or None if unknown."""
    cfg_file = Path(model_dir) / "train_config.yaml"
    if not cfg_file.is_file():
        return None
    data = yaml.safe_load(cfg_file.read_text()) or {}
    return data.get("model") or "embedded"
