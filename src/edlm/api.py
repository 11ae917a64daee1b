"""The text front end, above the model (as litgpt's ``api.py`` sits above ``model.py``): prompts in, text out.

``encode_prompt`` applies the chat template; ``generate_text`` decodes text prompts; ``complete`` decodes token-id
prompts in one batch and cuts each text at the first stop string. :class:`edlm.model.DiffusionLM` keeps
``encode`` / ``generate`` / ``complete`` as shortcuts to these.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import torch

from edlm.config import DecodeConfig
from edlm.decode import iter_steps
from edlm.sampling import DecodeOutput, DecodeStats, pad_token_id
from edlm.speculative import iter_drafted
from edlm.text import cut_at_stop, stop_index


def encode_prompt(tokenizer: Any, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
    """Token ids of a user prompt or a conversation (``[{"role", "content"}, ...]``): through the tokenizer's chat
    template (with the generation prompt) when it has one and ``chat`` is on, else the contents joined by newlines."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def generate_text(dlm, prompts: str | list[str], config: DecodeConfig | None = None, chat: bool = True,
                  **overrides: Any) -> tuple[list[str], DecodeStats]:
    """Generate text for one or more prompts; returns ``(texts, stats)`` (see :func:`complete`).

    Args:
        prompts: prompt text(s); each is wrapped in the chat template when the tokenizer has one and ``chat``.
        config: a :class:`edlm.config.DecodeConfig` (default settings when None).
        overrides: fields of DecodeConfig to change, e.g. ``threshold=0.7, max_new_tokens=64``.
    """
    cfg = dataclasses.replace(config or DecodeConfig(), **overrides)
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    return complete(dlm, [encode_prompt(dlm.tokenizer, t, chat) for t in texts], cfg)


@torch.no_grad()
def decode_until_stop(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> DecodeOutput:
    """Token-id prompts decoded in one batch with ``cfg``; a row stops at the first block boundary where its text
    holds one of ``cfg.stop`` (its sequence keeps the whole block: :func:`complete` cuts the text)."""
    sequences: list[list[int]] = [[] for _ in prompts]

    def seen_stop(row: int) -> bool:  # asked at block boundaries
        return stop_index(dlm.tokenizer.decode(sequences[row], skip_special_tokens=True), cfg.stop) is not None

    stats = DecodeStats(rows=len(prompts))
    for new, stats in iter_steps(dlm, prompts, cfg, should_stop=seen_stop if cfg.stop else None):  # noqa: B007
        for seq, part in zip(sequences, new):
            seq.extend(part)
    return DecodeOutput(sequences, stats)


@torch.no_grad()
def drafted_until_stop(source, drafter, tokenizer: Any, prompts: list[list[int]], cfg: DecodeConfig,
                       ) -> DecodeOutput:
    """Token-id prompts decoded in one batch by the unmodified ``source`` with a block ``drafter``
    (:func:`edlm.speculative.iter_drafted`): the source's own continuation; a row stops after the verify where its
    text first holds one of ``cfg.stop`` (:func:`stopped_text` cuts it) or at EOS."""
    sequences: list[list[int]] = [[] for _ in prompts]

    def seen_stop(row: int) -> bool:
        return stop_index(tokenizer.decode(sequences[row], skip_special_tokens=True), cfg.stop) is not None

    eos = None if cfg.ignore_eos else tokenizer.eos_token_id
    stats = DecodeStats(rows=len(prompts))
    steps = iter_drafted(source, drafter, prompts, cfg, eos, pad_token_id(tokenizer),
                         should_stop=seen_stop if cfg.stop else None)
    for new, stats in steps:  # noqa: B007
        for seq, part in zip(sequences, new):
            seq.extend(part)
    return DecodeOutput(sequences, stats)


class DraftedLM:
    """An unmodified ``source`` (Hugging Face causal LM or compiled engine) with its block ``drafter``, shaped like a
    :class:`edlm.model.DiffusionLM` where a server needs one (``model``, ``tokenizer``, ``config.block_size``,
    :meth:`encode`, :meth:`iter_steps`). It decodes only speculatively, so its text is the source's own."""

    speculative_only = True

    def __init__(self, source, drafter, tokenizer: Any):
        self.model, self.drafter, self.tokenizer = source, drafter, tokenizer
        self.config = SimpleNamespace(block_size=drafter.cfg.block_size)

    def encode(self, prompt: str | list[dict[str, str]], chat: bool = True) -> list[int]:
        """Token ids of a user prompt or a conversation (:func:`encode_prompt`)."""
        return encode_prompt(self.tokenizer, prompt, chat)

    def iter_steps(self, prompts: list[list[int]], cfg: DecodeConfig, should_stop=None, seeds=None):
        """:func:`edlm.speculative.iter_drafted` (the contract of :func:`edlm.decode.iter_steps`)."""
        eos = None if cfg.ignore_eos else self.tokenizer.eos_token_id
        return iter_drafted(self.model, self.drafter, prompts, cfg, eos, pad_token_id(self.tokenizer),
                            should_stop=should_stop, seeds=seeds)


def stopped_text(tokenizer: Any, sequence: list[int], stop: list[str] | tuple[str, ...]) -> str:
    """A generated sequence's text, cut at its first stop string (:func:`edlm.text.cut_at_stop`)."""
    return cut_at_stop(tokenizer.decode(sequence, skip_special_tokens=True), stop)


def complete(dlm, prompts: list[list[int]], cfg: DecodeConfig) -> tuple[list[str], DecodeStats]:
    """``(texts, stats)`` of token-id prompts decoded in one batch with ``cfg`` (:func:`decode_until_stop`), each
    text cut at its first stop string (:func:`stopped_text`)."""
    out = decode_until_stop(dlm, prompts, cfg)
    return [stopped_text(dlm.tokenizer, s, cfg.stop) for s in out.sequences], out.stats
