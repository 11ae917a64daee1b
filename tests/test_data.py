"""Packing documents into training rows: plain EOS-joined streams, and documents aligned to block boundaries."""

import datasets
import pytest

from edlm.checkpoints import resolve_model
from edlm.data import pack
from edlm.errors import EdlmError

DOCS = ["count 1 = 2 3", "seq 4 6 = 8 10 12", "ab", "down 9 = 8 7 6 5"]


@pytest.fixture(scope="module")
def tokenizer():
    return resolve_model("tiny")[1]


def _rows(tokenizer, seq_len, align=1):
    packed = pack(datasets.Dataset.from_dict({"text": DOCS}), tokenizer, seq_len, align=align)
    return [list(r) for r in packed["input_ids"]]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_plain_packing_joins_documents_with_eos_and_drops_the_tail(tokenizer):
    eos = tokenizer.eos_token_id
    stream = [t for d in DOCS for t in (*_ids(tokenizer, d), eos)]
    rows = _rows(tokenizer, 8)
    assert rows == [stream[i:i + 8] for i in range(0, len(stream) // 8 * 8, 8)]


def test_aligned_documents_start_at_block_boundaries_with_their_eos(tokenizer):
    eos, block = tokenizer.eos_token_id, 4
    stream = [t for row in _rows(tokenizer, 8, align=block) for t in row]
    pos = 0
    for doc in DOCS:  # EOS doc EOS, EOS-padded to whole blocks, in order
        ids = _ids(tokenizer, doc)
        end = pos + 1 + len(ids)
        pad = -(end + 1) % block
        if end + 1 + pad > len(stream):
            break  # the dropped tail
        assert pos % block == 0 and stream[pos] == eos and stream[pos + 1:end] == ids
        assert stream[end:end + 1 + pad] == [eos] * (1 + pad)
        pos = end + 1 + pad
    assert pos >= 8  # at least one whole document checked
    assert _rows(tokenizer, 8, align=block) != _rows(tokenizer, 8)  # the layouts differ


def test_aligned_packing_needs_rows_of_whole_blocks(tokenizer):
    with pytest.raises(EdlmError, match="multiple of the block size"):
        _rows(tokenizer, 10, align=4)
