"""The old name of :mod:`edlm.sampling` (what every decoding mode shares), kept so that existing imports work."""

from edlm.sampling import (
    DecodeOutput,
    DecodeStats,
    choose,
    choose_rows,
    decode_block_size,
    pad_token_id,
    probabilities,
    row_generators,
    validate_prompts,
)

__all__ = ["DecodeOutput", "DecodeStats", "choose", "choose_rows", "decode_block_size", "pad_token_id",
           "probabilities", "row_generators", "validate_prompts"]
