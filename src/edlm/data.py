"""Text corpora -> tokenized, packed, block-aligned training sequences (Hugging Face ``datasets``).

Documents are joined with EOS between them and cut into sequences of exactly ``seq_len`` tokens (the tail that
does not fill a sequence is dropped). Since ``seq_len`` is a multiple of the block size, blocks start at 0, B, 2B...
With ``align_documents`` every document starts at such a block boundary too (``EOS doc EOS``, EOS-padded to whole
blocks), the layout decoding sees: its prompts start at position 0, at a block boundary.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from edlm.assets import builtin_corpus
from edlm.config import DataConfig
from edlm.errors import EdlmError

logger = logging.getLogger(__name__)

_LOADERS = {".txt": "text", ".md": "text", ".rst": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet",
            **{ext: "text" for ext in (".py", ".c", ".h", ".cpp", ".js", ".ts", ".rs", ".go", ".java")}}


def _expand(source: str) -> list[Path] | Path:
    """Files of one source, or the folder itself when it is a ``save_to_disk`` dataset."""
    if source.startswith("builtin:"):
        return builtin_corpus(source.split(":", 1)[1])
    path = Path(source).expanduser()
    if not path.exists():
        raise EdlmError(f"corpus source {source!r} does not exist; give text/jsonl/parquet files, folders of them, "
                        "a datasets.save_to_disk folder, or builtin:shakespeare")
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() \
                or (path / "state.json").is_file():
            return path
        files = sorted(p for p in path.rglob("*") if p.suffix in _LOADERS and p.is_file())
        if not files:
            raise EdlmError(f"corpus folder {source!r} holds no {sorted(_LOADERS)} files")
        return files
    if path.suffix not in _LOADERS:
        raise EdlmError(f"corpus file {source!r} has an unsupported type; use one of {sorted(_LOADERS)}")
    return [path]


def load_documents(cfg: DataConfig):
    """All documents of the configured sources as one ``datasets.Dataset`` with a ``text`` column."""
    import datasets

    parts = []
    by_loader: dict[str, list[str]] = defaultdict(list)
    for source in cfg.corpus:
        found = _expand(source)
        if isinstance(found, Path):
            ds = datasets.load_from_disk(str(found))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            parts.append(_text_column(ds, cfg.text_field, source))
        else:
            for f in found:
                by_loader[_LOADERS[f.suffix]].append(str(f))
    for loader, files in by_loader.items():
        kwargs: dict[str, Any] = {"sample_by": "document"} if loader == "text" else {}
        ds = datasets.load_dataset(loader, data_files=files, split="train", **kwargs)
        parts.append(_text_column(ds, "text" if loader == "text" else cfg.text_field, files[0]))
    docs = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    docs = docs.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)
    if cfg.max_documents is not None:
        docs = docs.select(range(min(cfg.max_documents, len(docs))))
    if len(docs) == 0:
        raise EdlmError(f"the corpus {cfg.corpus} contains no text; check the files or data.text_field")
    return docs


def _text_column(ds, field: str, where: str):
    if field not in ds.column_names:
        raise EdlmError(f"corpus {where!r} has no column {field!r} (columns: {ds.column_names}); "
                        "set data.text_field")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def pack(docs, tokenizer, seq_len: int, align: int = 1):
    """Tokenize documents, join them with EOS and cut into rows of ``seq_len`` tokens.

    ``align > 1``: each document becomes ``EOS doc EOS`` padded with EOS to a multiple of ``align`` tokens, so every
    document starts (with its leading EOS) at a multiple of ``align`` (``seq_len`` must be one too)::

        align 4:  E d d d | d d E E | E d d E | ...      (E = EOS, d = a document's tokens)
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise EdlmError("the tokenizer has no EOS token; set tokenizer.eos_token before conversion")
    if seq_len % align:
        raise EdlmError(f"data.seq_len={seq_len} must be a multiple of the block size {align} to align documents")

    def aligned(doc: list[int]) -> list[int]:
        unit = [eos, *doc, eos]
        return unit + [eos] * (-len(unit) % align)

    def tokenize_and_pack(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        if align > 1:
            stream = [tok for doc in ids for tok in aligned(doc)]
        else:
            stream = [tok for doc in ids for tok in (*doc, eos)]
        n = len(stream) // seq_len
        return {"input_ids": [stream[i * seq_len:(i + 1) * seq_len] for i in range(n)]}

    # Large map batches lose little at the edges (the remainder of each batch is dropped).
    return docs.map(tokenize_and_pack, batched=True, batch_size=2000, remove_columns=["text"],
                    desc="tokenize and pack")


class PackedData:
    """Packed sequences, indexable by a list of row ids -> (B, seq_len) long tensor."""

    def __init__(self, ds, seq_len: int):
        self.ds = ds.with_format("torch")
        self.seq_len = seq_len

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, rows: list[int]) -> torch.Tensor:
        return self.ds[rows]["input_ids"].long()

    @property
    def num_tokens(self) -> int:
        return len(self) * self.seq_len


def build_data(cfg: DataConfig, tokenizer, block_size: int = 1) -> tuple[PackedData, PackedData | None]:
    """(train, validation-or-None) packed sequences for a data config (``block_size``: the alignment of
    ``cfg.align_documents``)."""
    docs = load_documents(cfg)
    packed = pack(docs, tokenizer, cfg.seq_len, align=block_size if cfg.align_documents else 1)
    if len(packed) == 0:
        raise EdlmError(f"the corpus is shorter than one sequence of data.seq_len={cfg.seq_len} tokens; "
                        "add text or lower data.seq_len")
    n_val = int(len(packed) * cfg.validation_fraction)
    if n_val:
        train, val = packed.select(range(len(packed) - n_val)), packed.select(range(len(packed) - n_val, len(packed)))
        return PackedData(train, cfg.seq_len), PackedData(val, cfg.seq_len)
    logger.info("packed %d sequences of %d tokens", len(packed), cfg.seq_len)
    return PackedData(packed, cfg.seq_len), None
