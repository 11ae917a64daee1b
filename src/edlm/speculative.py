"""Lossless self-speculative decoding: the diffusion head of a converted model drafts, a causal pass of the same
weights verifies.

Every step is one forward whose columns, per row, are

    clean:  the committed tokens not cached yet (at least the last one), then the draft   causal, as in AR decoding
    noisy:  the block (aligned to 0, B, 2B, ...) holding the first position after the draft, its positions before
            that point filled in, the rest mask tokens                                      the diffusion drafter

    key ->          cache           clean               noisy
    clean query     all (valid)     causal              -
    noisy query     positions < s   positions < s       all its block (s = the block's first position)

The clean columns' logits are the model's AR next-token predictions. The draft's longest prefix on which they agree
is accepted, and the AR prediction right after it is committed too, so every committed token is the causal pass's
greedy choice given the tokens before it: greedy output is exactly that of ``mode="ar"`` (with sampling, the
standard speculative acceptance rule keeps the AR distribution). Keys/values of the verified clean columns stay in
the cache; the other columns are cropped, or, inside a batch whose rows accepted different lengths, kept and masked
for the rows they do not belong to. When a row's whole draft was accepted, the noisy block's predictions (which
assumed it) are its next draft; otherwise its next step drafts afresh from the verified tokens. With
``fused_draft=False`` drafting and verifying take separate forwards (the reference for the fused step's gain).

The drafter sees causal clean context, as the clean copy was in training only with ``clean_causal``: that is the
setting the joint objective (``ar_weight``) trains, and the one this mode is meant for.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from edlm.compat import new_cache
from edlm.config import DecodeConfig
from edlm.drafter import DraftContext, Drafter, source_forward
from edlm.errors import EdlmError
from edlm.masks import dense_mask, speculative_mask, to_attention_mask
from edlm.sampling import DecodeOutput, DecodeStats, pad_token_id, probabilities, row_generators, validate_prompts

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """One prompt's state between steps."""

    seq: list[int]
    """Committed tokens, prompt included (position i holds seq[i])."""
    prompt_len: int
    cached: int = 0
    """Positions [0, cached) have valid keys/values in the cache (always < len(seq))."""
    draft: list[int] = field(default_factory=list)
    """Guesses for positions len(seq), len(seq) + 1, ... to verify in the next step."""
    draft_probs: torch.Tensor | None = None
    """(len(draft), V) drafter distributions the guesses were sampled from (sampling only)."""
    done: bool = False

    @property
    def produced(self) -> int:
        return len(self.seq) - self.prompt_len


def _hypotheses(row: _Row, count: int) -> list[int]:
    """Acceptance lengths of ``row.draft`` to draft the next block for: the whole draft first, then 0, 1, ... up to
    ``count`` in all (short acceptances are the common rejections)."""
    if row.done or count < 1:
        return []
    full = len(row.draft)
    return [full] + [a for a in range(min(count - 1, full))]


def _step_inputs(rows: list[_Row], hyps: list[list[int]], block: int, mask_id: int, pad_id: int,
                 causal_in_block: bool, col_pos: torch.Tensor, device, aligned: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Token ids (R, W + H*B), position ids (R, W + H*B) and the bool attention (R, W + H*B, K + W + H*B) of one
    step, where K = cached columns, W = the widest clean part and H = the most hypotheses of a row (``hyps[r]``:
    acceptance lengths, one noisy block each); and the first position of each row's noisy blocks. Columns that
    belong to no real token (padding, finished rows, missing hypotheses) attend only to themselves."""
    n_rows, kv_old = len(rows), col_pos.shape[1]
    clean = [r.seq[r.cached:] + r.draft if not r.done else [pad_id] for r in rows]
    width = max(len(c) for c in clean)
    n_blocks = max(len(h) for h in hyps)
    q_len = width + n_blocks * block
    ids = torch.full((n_rows, q_len), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, q_len), dtype=torch.long)
    real_query = torch.zeros((n_rows, q_len), dtype=torch.bool)
    # Position of every key column per row (-1: not a real token of that row).
    key_pos = torch.full((n_rows, kv_old + q_len), -1, dtype=torch.long)
    key_pos[:, :kv_old] = col_pos.cpu()
    context_end = torch.zeros((n_rows, q_len), dtype=torch.long)  # a noisy query sees clean positions below this
    starts: list[list[int]] = []
    for i, (row, toks) in enumerate(zip(rows, clean)):
        ids[i, :len(toks)] = torch.tensor(toks)
        starts.append([])
        if row.done:
            continue
        pos[i, :len(toks)] = torch.arange(row.cached, row.cached + len(toks))
        key_pos[i, kv_old:kv_old + len(toks)] = pos[i, :len(toks)]
        real_query[i, :len(toks)] = True
        filled = row.seq + row.draft
        for j, accepted in enumerate(hyps[i]):
            end = len(row.seq) + accepted  # the first position this hypothesis leaves open (the AR token's)
            start = end // block * block if aligned else end
            starts[i].append(start)
            cols = slice(width + j * block, width + (j + 1) * block)
            known = filled[start:end]
            ids[i, cols] = mask_id
            ids[i, cols.start:cols.start + len(known)] = torch.tensor(known, dtype=torch.long)
            pos[i, cols] = torch.arange(start, start + block)
            real_query[i, cols] = True
            context_end[i, cols] = start
    mod = speculative_mask(key_pos, pos, context_end, real_query, kv_old, width, block, causal_in_block)
    attn = dense_mask(mod, q_len, kv_old + q_len, rows=n_rows)
    return ids.to(device), pos.to(device), attn.to(device), starts


def _accept(row: _Row, ar_logits: torch.Tensor, cfg: DecodeConfig, generator: torch.Generator,
            skipped: int = 0) -> list[int]:
    """Verify ``row.draft`` against the AR logits at the row's clean columns (L, V), of which the first ``skipped``
    were not computed; return the new tokens (the accepted prefix of the draft, then the AR model's own next
    token)."""
    base = len(row.seq) - 1 - row.cached - skipped  # clean column whose logits predict position len(row.seq)
    if cfg.temperature == 0.0:
        ar = ar_logits[base:base + len(row.draft) + 1].argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(row.draft) and row.draft[accepted] == ar[accepted]:
            accepted += 1
        return row.draft[:accepted] + [ar[accepted]]
    # Standard speculative sampling: keep guess d with probability min(1, p(d) / q(d)); at the first rejection draw
    # from the normalised residual max(0, p - q); after a fully accepted draft draw from p.
    p = probabilities(ar_logits[base:base + len(row.draft) + 1], cfg)  # (G + 1, V)
    out: list[int] = []
    for k, guess in enumerate(row.draft):
        q = row.draft_probs[k]
        ratio = float(p[k, guess] / q[guess].clamp_min(1e-20))
        if float(torch.rand((), generator=generator, device=p.device)) < min(1.0, ratio):
            out.append(guess)
            continue
        residual = (p[k] - q).clamp_min(0.0)
        dist = residual / residual.sum() if float(residual.sum()) > 0 else p[k]
        return out + [int(torch.multinomial(dist, 1, generator=generator))]
    return out + [int(torch.multinomial(p[len(row.draft)], 1, generator=generator))]


def _next_draft(row: _Row, drafted: torch.Tensor, start: int, block: int, cfg: DecodeConfig,
                generator: torch.Generator) -> None:
    """Set the row's next draft from the predictions (B, V) for a noisy block's positions [start, start + B): its
    positions from len(row.seq) on (the AR model's own token already fills len(row.seq) - 1)."""
    first = len(row.seq)
    last = min(start + block, row.prompt_len + cfg.max_new_tokens)  # no guesses past the budget
    if first >= last:
        row.draft, row.draft_probs = [], None
        return
    logits = drafted[first - start:last - start]
    if cfg.temperature == 0.0:
        row.draft, row.draft_probs = logits.argmax(dim=-1).tolist(), None
        return
    probs = probabilities(logits, cfg)  # positions are drawn independently, as the acceptance rule assumes
    row.draft = torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
    row.draft_probs = probs


def _drop_unused_columns(cache, col_pos: torch.Tensor) -> torch.Tensor:
    """Crop the trailing cache columns no row needs any more (at batch 1: everything past the verified tokens);
    returns the positions table (R, columns) of what is kept."""
    keep = int((col_pos >= 0).any(dim=0).nonzero().max()) + 1 if bool((col_pos >= 0).any()) else 0
    if keep < col_pos.shape[1]:
        cache.crop(keep - col_pos.shape[1])  # a negative count of trailing columns to drop
        col_pos = col_pos[:, :keep]
    return col_pos


def iter_speculative(dlm, prompts: list[list[int]], cfg: DecodeConfig,
                     should_stop: Callable[[int], bool] | None = None, seeds: list[int] | None = None,
                     ) -> Iterator[tuple[list[list[int]], DecodeStats]]:
    """Self-speculative decoding (see module docstring), yielding after every forward: (new tokens per row, running
    stats), with the contract of :func:`edlm.decode.iter_steps`."""
    block = validate_prompts(dlm, prompts, cfg)
    if not dlm.config.clean_causal and not getattr(dlm, "_warned_untrained_ar", False):
        dlm._warned_untrained_ar = True  # once per model, not once per call
        log.warning("speculative decoding of a model converted without clean_causal: its AR pass is untrained, "
                    "so drafts are rarely accepted (output is still that of mode='ar')")
    t0 = time.perf_counter()
    device, tok = dlm.device, dlm.tokenizer
    eos = None if cfg.ignore_eos else tok.eos_token_id
    pad_id = pad_token_id(tok)
    generators = row_generators(seeds, cfg, len(prompts), device)
    rows = [_Row(seq=list(p), prompt_len=len(p)) for p in prompts]
    cache = new_cache(dlm.model, len(prompts))
    col_pos = torch.empty((len(rows), 0), dtype=torch.long)  # position of each cache column per row, -1: none
    dtype = dlm.model.get_input_embeddings().weight.dtype
    stats = DecodeStats(rows=len(rows))
    shift = dlm.config.token_shift

    while True:
        if should_stop is not None:
            for i, row in enumerate(rows):
                row.done = row.done or should_stop(i)
        if all(r.done for r in rows):
            return
        with_noisy = cfg.fused_draft or not any(r.draft for r in rows if not r.done)
        hyps = [_hypotheses(r, cfg.draft_hypotheses if with_noisy else 0) for r in rows]
        ids, pos, attn, starts = _step_inputs(rows, hyps, block, dlm.mask_id, pad_id, dlm.pattern.causal_in_block,
                                              col_pos, device, aligned=cfg.aligned_draft)
        width = ids.shape[1] - block * max(len(h) for h in hyps)  # clean columns
        logits = dlm.run(ids, pos, to_attention_mask(attn, dtype, dlm.attn_implementation), past_key_values=cache,
                         use_cache=True, noisy=slice(width, ids.shape[1])).logits  # (R, W + H*B, V)
        logits[..., dlm.mask_id] = float("-inf")
        stats.forwards += 1
        if ids.shape[1] > width:
            cache.crop(width - ids.shape[1])  # the noisy blocks' keys/values are never context
        new_pos = torch.full((len(rows), width), -1, dtype=torch.long)
        new_tokens: list[list[int]] = []
        for i, row in enumerate(rows):
            if row.done:
                new_tokens.append([])
                continue
            new = _accept(row, logits[i, :width], cfg, generators[i])
            accepted = len(new) - 1
            new = new[:cfg.max_new_tokens - row.produced]
            if eos is not None and eos in new:
                new = new[:new.index(eos) + 1]
                row.done = True
            # Verified clean columns: positions [cached, len(seq) + accepted) (their inputs were all correct).
            verified = len(row.seq) + len(new) - 1 - row.cached
            new_pos[i, :verified] = torch.arange(row.cached, row.cached + verified)
            row.cached += verified
            row.seq.extend(new)
            row.done = row.done or row.produced >= cfg.max_new_tokens
            new_tokens.append(new)
            row.draft, row.draft_probs = [], None
            # The next draft comes from the block drafted for this acceptance length, else from the longest shorter
            # one (its later predictions are guesses made without the accepted tokens: verification sorts them out).
            below = [j for j, h in enumerate(hyps[i]) if h <= accepted]
            if below and not row.done:
                j = max(below, key=lambda j: hyps[i][j])
                drafted = logits[i, width + j * block:width + (j + 1) * block]  # (B, V) at the block's positions
                if shift:  # the state at p - 1 predicts p; a block's first position is never drafted
                    drafted = torch.cat([drafted[:1] * float("nan"), drafted[:-1]])
                _next_draft(row, drafted, starts[i][j], block, cfg, generators[i])
        col_pos = _drop_unused_columns(cache, torch.cat([col_pos, new_pos], dim=1))
        stats.tokens = sum(r.produced for r in rows)
        stats.seconds = time.perf_counter() - t0
        yield new_tokens, stats


# ------------------------------------------------------------------------------------------------ with a drafter


def iter_drafted(source, drafter: Drafter, prompts: list[list[int]], cfg: DecodeConfig, eos_id: int | None,
                 pad_id: int = 0, should_stop: Callable[[int], bool] | None = None,
                 seeds: list[int] | None = None) -> Iterator[tuple[list[list[int]], DecodeStats]]:
    """Speculative decoding of an unmodified ``source`` (Hugging Face causal LM or compiled engine) with a
    :class:`edlm.drafter.Drafter`, drafting *after* the verify. Each cycle, per row:

    1. the source verifies ``[its last token ; the draft]`` causally; the longest agreeing prefix plus the
       source's own next token are committed (greedy output is the source's, token for token; sampling keeps its
       distribution by the standard acceptance rule);
    2. the source's features at the verified positions extend the drafter's context;
    3. the drafter drafts the next block from the newly committed token, cut where its running confidence falls
       below ``cfg.draft_cut``.

    Yields after every source forward (the contract of :func:`edlm.decode.iter_steps`); ``stats.forwards`` counts
    source forwards.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EdlmError("every prompt needs at least one token")
    t0 = time.perf_counter()
    block = drafter.cfg.block_size
    layers = tuple(drafter.cfg.target_layer_ids)
    device = source.get_input_embeddings().weight.device
    impl = getattr(source.config, "_attn_implementation", None) or "sdpa"
    generators = row_generators(seeds, cfg, len(prompts), device)
    rows = [_Row(seq=list(p), prompt_len=len(p)) for p in prompts]
    cache = new_cache(source, len(prompts))
    context = DraftContext(drafter, len(prompts))
    col_pos = torch.empty((len(rows), 0), dtype=torch.long)
    stats = DecodeStats(rows=len(rows))
    while True:
        if should_stop is not None:
            for i, row in enumerate(rows):
                row.done = row.done or should_stop(i)
        if all(r.done for r in rows):
            return
        ids, pos, attn, _ = _step_inputs(rows, [[] for _ in rows], block, 0, pad_id, False, col_pos, device)
        width = ids.shape[1]
        # Only the columns from each row's last committed token on predict anything: the rest (a prompt's) need no
        # logits.
        skipped = min(len(r.seq) - 1 - r.cached for r in rows if not r.done)
        logits, feats = source_forward(source, ids, pos, to_attention_mask(attn, torch.float32, impl), cache, layers,
                                       logits_to_keep=width - skipped)
        stats.forwards += 1
        new_pos = torch.full((len(rows), width), -1, dtype=torch.long)
        new_tokens: list[list[int]] = []
        for i, row in enumerate(rows):
            if row.done:
                new_tokens.append([])
                continue
            new = _accept(row, logits[i], cfg, generators[i], skipped)
            if row.draft:
                stats.verifies += 1
                stats.accepted += len(new) - 1
            new = new[:cfg.max_new_tokens - row.produced]
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id) + 1]
                row.done = True
            verified = len(row.seq) + len(new) - 1 - row.cached  # columns whose inputs were all right
            new_pos[i, :verified] = torch.arange(row.cached, row.cached + verified)
            context.extend(i, feats[i, :verified])
            row.cached += verified
            row.seq.extend(new)
            row.done = row.done or row.produced >= cfg.max_new_tokens
            row.draft, row.draft_probs = [], None
            new_tokens.append(new)
        col_pos = _drop_unused_columns(cache, torch.cat([col_pos, new_pos], dim=1))
        live = [i for i, r in enumerate(rows) if not r.done]
        if live:
            drafted = context.draft(live, [rows[i].seq[-1] for i in live])  # (len(live), B, Vd)
            for k, i in enumerate(live):
                _set_draft(rows[i], drafted[k, 1:], drafter.d2t, drafter.cfg.vocab_size, cfg, generators[i])
        stats.tokens = sum(r.produced for r in rows)
        stats.seconds = time.perf_counter() - t0
        yield new_tokens, stats


def draft_length(conf: torch.Tensor, cfg: DecodeConfig) -> int:
    """How many of a draft's guesses to verify, from their confidences (n,): with ``cfg.verify_costs``, the length
    k maximising (1 + sum of the first k running confidences) / verify_costs[k], the expected tokens a cycle commits
    per unit of its cost; else those whose running confidence stays >= ``cfg.draft_cut`` (all when it is 0)."""
    running = conf.float().cumprod(0)
    if cfg.verify_costs is not None:
        costs = torch.tensor(cfg.verify_costs[:conf.shape[0] + 1])
        expected = 1 + torch.cat([running.new_zeros(1), running.cumsum(0)])[:costs.shape[0]]
        return int((expected / costs).argmax())
    if cfg.draft_cut > 0:
        return int((running >= cfg.draft_cut).sum())
    return conf.shape[0]


def _set_draft(row: _Row, logits: torch.Tensor, d2t: torch.Tensor, vocab: int, cfg: DecodeConfig,
               generator: torch.Generator) -> None:
    """The row's next draft from draft-vocabulary logits (B-1, Vd): at most the budget left after the source's next
    token, cut where the running confidence falls below ``cfg.draft_cut``."""
    room = row.prompt_len + cfg.max_new_tokens - len(row.seq) - 1
    logits = logits[:max(room, 0)]
    if logits.shape[0] == 0:
        return
    if cfg.temperature == 0.0:
        conf, idx = torch.softmax(logits.float(), -1).max(-1)
        q = None
    else:
        q = probabilities(logits, cfg)  # (n, Vd)
        idx = torch.multinomial(q, 1, generator=generator).squeeze(-1)
        conf = q.gather(-1, idx[:, None]).squeeze(-1)
    n = draft_length(conf, cfg)
    if n < conf.shape[0]:
        idx, conf = idx[:n], conf[:n]
        q = None if q is None else q[:n]
    row.draft = d2t[idx].tolist()
    if q is not None:  # the drafter's distribution over the whole vocabulary, for the acceptance rule
        row.draft_probs = torch.zeros((q.shape[0], vocab), dtype=q.dtype).index_copy_(1, d2t, q)


@torch.no_grad()
def drafted_generate(source, drafter: Drafter, prompts: list[list[int]], cfg: DecodeConfig, eos_id: int | None,
                     pad_id: int = 0) -> DecodeOutput:
    """Collect :func:`iter_drafted`: generated ids per row (prompt excluded; ending with EOS when one was
    produced)."""
    sequences: list[list[int]] = [[] for _ in prompts]
    stats = DecodeStats(rows=len(prompts))
    for new, stats in iter_drafted(source, drafter, prompts, cfg, eos_id, pad_id):  # noqa: B007
        for seq, part in zip(sequences, new):
            seq.extend(part)
    return DecodeOutput(sequences=sequences, stats=stats)
