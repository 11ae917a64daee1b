"""The three decoding modes of one converted checkpoint; speculative decoding's guarantee: greedy output == AR mode."""

import pytest
import torch
from conftest import make_dlm

import edlm.speculative as spec
from edlm.ar import ar_generate
from edlm.compat import new_cache
from edlm.config import DecodeConfig
from edlm.decode import FullStepper, Layout, generate, iter_steps
from edlm.errors import ConfigError
from edlm.masks import to_attention_mask
from edlm.sampling import pad_token_id

PROMPTS = [[5, 17, 99, 3], [120, 44, 8, 61, 200, 7, 19, 33, 2, 90, 14], [250]]


def varied_dlm(family: str = "llama", token_shift: bool = True):
    """A tiny random model with a clean causal copy and its own random output head: with the tied head a random
    model's AR output just repeats the last token, which would make "speculative == AR" nearly vacuous."""
    dlm = make_dlm(family, block_size=4, token_shift=token_shift, clean_causal=True)
    head = dlm.model.get_output_embeddings()
    g = torch.Generator().manual_seed(0)
    head.weight = torch.nn.Parameter(torch.randn(head.weight.shape, generator=g) * 2)
    return dlm


def oracle_drafts(monkeypatch, reference: dict[tuple, list[int]], wrong_every: int) -> None:
    """Replace the drafter's guesses by the AR reference continuation, corrupted at every ``wrong_every``-th
    generated position (0: never), so that drafts are accepted whole, in part, or not at all: the paths a random
    tiny model (whose drafts are almost never right) would not exercise."""
    real = spec._next_draft

    def drafted(row, logits, start, block, cfg, generator):
        real(row, logits, start, block, cfg, generator)
        first = len(row.seq) - row.prompt_len
        truth = reference[tuple(row.seq[:row.prompt_len])][first:first + len(row.draft)]
        row.draft = [t if not wrong_every or (first + k) % wrong_every else (t + 1) % 250
                     for k, t in enumerate(truth)]

    monkeypatch.setattr(spec, "_next_draft", drafted)


@pytest.mark.parametrize("family,token_shift", [("llama", True), ("qwen3", True), ("gemma", True), ("llama", False)])
def test_greedy_speculative_equals_ar_mode_token_for_token(monkeypatch, family, token_shift):
    dlm = varied_dlm(family, token_shift)
    for budget in (1, 6, 19):  # 6 and 19 end mid-block
        ar = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=budget, mode="ar"))
        assert ar.sequences == ar_generate(dlm.model, PROMPTS, DecodeConfig(max_new_tokens=budget),
                                           eos_id=dlm.tokenizer.eos_token_id, banned=[dlm.mask_id]).sequences
        assert all(len(s) == budget for s in ar.sequences) and len(set(ar.sequences[1])) > budget // 2
        for wrong_every in (None, 0, 3):  # None: the model's own drafts
            if wrong_every is not None:
                oracle_drafts(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, ar.sequences)}, wrong_every)
            for fused, aligned in ((True, True), (False, True), (True, False)):
                cfg = DecodeConfig(max_new_tokens=budget, mode="speculative", fused_draft=fused, aligned_draft=aligned)
                batched = generate(dlm, PROMPTS, cfg)
                assert batched.sequences == ar.sequences, (budget, wrong_every, fused, aligned)
                if wrong_every == 3:  # rows accept different lengths: each row must still equal its lone run
                    assert [generate(dlm, [p], cfg).sequences[0] for p in PROMPTS] == ar.sequences
                if wrong_every == 0 and budget == 19:  # perfect drafts: several tokens per forward
                    assert batched.stats.tokens_per_forward > (2.5 if fused else 1.6)
            monkeypatch.undo()


def test_perfect_drafts_fill_each_block_in_one_forward(monkeypatch):
    """Block 4, perfect drafts, fused: the prefill commits one token and drafts the rest of its block; from then
    on each forward verifies a block's draft and commits it plus the next token (4 per forward)."""
    dlm = varied_dlm()
    prompt = [PROMPTS[0]]  # 4 tokens: generation starts at position 4, a block start
    ar = generate(dlm, prompt, DecodeConfig(max_new_tokens=17, mode="ar")).sequences
    oracle_drafts(monkeypatch, {tuple(prompt[0]): ar[0]}, 0)
    steps = [new[0] for new, _ in iter_steps(dlm, prompt, DecodeConfig(max_new_tokens=17, mode="speculative"))]
    assert [len(s) for s in steps] == [1, 4, 4, 4, 4]
    assert sum(steps, []) == ar[0]


def test_unaligned_drafts_always_guess_a_whole_block_minus_one(monkeypatch):
    """Generation starting mid-block (5-token prompt, block 4), perfect drafts: aligned drafting guesses only to the
    end of the aligned block (2 guesses after the prefill), unaligned drafting always guesses 3."""
    dlm = varied_dlm()
    prompt = [PROMPTS[1][:5]]
    ar = generate(dlm, prompt, DecodeConfig(max_new_tokens=17, mode="ar")).sequences
    oracle_drafts(monkeypatch, {tuple(prompt[0]): ar[0]}, 0)
    for aligned, want in ((True, [1, 3, 4, 4, 4, 1]), (False, [1, 4, 4, 4, 4])):
        cfg = DecodeConfig(max_new_tokens=17, mode="speculative", aligned_draft=aligned)
        steps = [new[0] for new, _ in iter_steps(dlm, prompt, cfg)]
        assert [len(s) for s in steps] == want, aligned
        assert sum(steps, []) == ar[0]


def test_eos_stops_speculative_exactly_where_ar_stops(monkeypatch):
    dlm = varied_dlm("qwen3")
    free = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=16, mode="ar")).sequences
    # pretend a token that some row first writes after a few others is EOS
    eos = next(t for f in free for i, t in enumerate(f) if i >= 3 and t not in f[:i])
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(eos)
    ar = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=16, mode="ar")).sequences
    assert ar == [f[:f.index(eos) + 1] if eos in f else f for f in free] and min(map(len, ar)) < 16
    for wrong_every in (0, 3):
        oracle_drafts(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, ar)}, wrong_every)
        assert generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=16, mode="speculative")).sequences == ar
        monkeypatch.undo()


def test_should_stop_finishes_a_row_in_every_mode():
    dlm = varied_dlm()
    for mode in ("ar", "diffusion", "speculative"):
        cfg = DecodeConfig(max_new_tokens=12, mode=mode, threshold=0.02)
        got = [0, 0, 0]
        for new, _ in iter_steps(dlm, PROMPTS, cfg, should_stop=lambda r, got=got: r == 1 and got[1] >= 1):
            for r, part in enumerate(new):
                got[r] += len(part)
        assert got[0] == got[2] == 12 and 1 <= got[1] < 12, mode


def test_speculative_sampling_keeps_the_ar_distribution():
    """The acceptance rule alone, on a 5-token vocabulary: whatever the drafter's distribution q, the committed
    token is distributed as the AR model's p."""
    cfg = DecodeConfig(temperature=1.0)
    p_logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])  # (G + 1, V)
    q = torch.tensor([0.05, 0.1, 0.6, 0.2, 0.05])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        guess = int(torch.multinomial(q, 1, generator=g))
        row = spec._Row(seq=[1, 2], prompt_len=2, cached=1, draft=[guess], draft_probs=q[None])
        counts[spec._accept(row, p_logits, cfg, g)[0]] += 1
    assert torch.allclose(counts / n, torch.softmax(p_logits[0], -1), atol=0.012)
    # The rule is not vacuous: accepting every guess would give q instead.
    assert (torch.softmax(p_logits[0], -1) - q).abs().max() > 0.3


def test_sampled_speculative_is_reproducible_per_seed():
    dlm = varied_dlm()
    cfg = dict(max_new_tokens=12, mode="speculative", temperature=1.0, top_p=0.9)
    a = generate(dlm, PROMPTS, DecodeConfig(seed=1, **cfg)).sequences
    assert a == generate(dlm, PROMPTS, DecodeConfig(seed=1, **cfg)).sequences
    assert a != generate(dlm, PROMPTS, DecodeConfig(seed=2, **cfg)).sequences


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="speculative"):
        DecodeConfig(mode="jacobi")


def test_drafting_for_a_rejection_too_saves_the_draft_only_forwards(monkeypatch):
    """With one hypothesis a rejected draft leaves nothing to verify next (that forward commits one token); with two
    (whole draft, none of it) the block drafted for "none accepted" is verified next: same output, fewer forwards."""
    dlm = varied_dlm()
    ar = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=19, mode="ar")).sequences
    oracle_drafts(monkeypatch, {tuple(p): s for p, s in zip(PROMPTS, ar)}, 3)
    forwards = {}
    for hypotheses in (1, 2):
        cfg = DecodeConfig(max_new_tokens=19, mode="speculative", draft_hypotheses=hypotheses)
        out = generate(dlm, PROMPTS[:1], cfg)
        assert out.sequences == ar[:1]
        forwards[hypotheses] = out.stats.forwards
    assert forwards[2] < forwards[1]


def test_the_untrained_ar_pass_warning_comes_once_per_model(caplog):
    dlm = make_dlm("llama", block_size=4)
    assert not dlm.config.clean_causal
    cfg = DecodeConfig(max_new_tokens=4, mode="speculative")
    with caplog.at_level("WARNING", logger="edlm.speculative"):
        generate(dlm, [[5, 6, 7]], cfg)
        generate(dlm, [[5, 6, 7]], cfg)
    assert sum("rarely accepted" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("causal_in_block", [False, True])
def test_a_drafted_block_sees_exactly_the_clean_keys_before_its_start(aligned, causal_in_block):
    """The step's mask, read back through the key positions: a noisy query sees the clean keys (cached or verified
    in this step) before its block's first position and none at or after it, although every draft reaches past
    some block's start; and it sees its own block, no other."""
    block = 4
    rows = [spec._Row(seq=list(range(10, 20)), prompt_len=4, cached=7, draft=[30, 31, 32]),  # clean: positions 7..12
            spec._Row(seq=[40, 41, 42, 43, 44], prompt_len=5, draft=[50, 51, 52]),  # clean 0..7, nothing cached
            spec._Row(seq=[60, 61], prompt_len=2, done=True)]
    hyps = [spec._hypotheses(r, 3) for r in rows]
    assert hyps == [[3, 0, 1], [3, 0, 1], []]
    col_pos = torch.tensor([list(range(7)), [-1] * 7, [-1] * 7])  # (R, K) the cache holds row 0's positions 0..6
    ids, pos, attn, starts = spec._step_inputs(rows, hyps, block, 1000, 0, causal_in_block, col_pos, "cpu",
                                               aligned=aligned)
    kv_old, width = col_pos.shape[1], ids.shape[1] - 3 * block
    clean_pos = torch.full((3, width), -1)
    for i, row in enumerate(rows[:2]):
        n = len(row.seq) - row.cached + len(row.draft)
        clean_pos[i, :n] = torch.arange(row.cached, row.cached + n)
    key_pos = torch.cat([col_pos, clean_pos], dim=1)  # (R, K + W) position of every clean key, -1: none
    in_block = torch.ones(block, block, dtype=torch.bool)
    in_block = in_block.tril() if causal_in_block else in_block
    beyond = 0
    for i, row in enumerate(rows[:2]):
        filled = row.seq + row.draft
        for j, accepted in enumerate(hyps[i]):
            end = len(row.seq) + accepted
            first = end // block * block if aligned else end
            cols = slice(width + j * block, width + (j + 1) * block)
            assert starts[i][j] == first and pos[i, cols].tolist() == list(range(first, first + block))
            assert ids[i, cols].tolist() == filled[first:end] + [1000] * (first + block - end)
            visible = (key_pos[i] >= 0) & (key_pos[i] < first)
            seen = attn[i, cols, :kv_old + width]  # (B, K + W)
            assert torch.equal(seen, visible.expand(block, -1)), \
                f"row {i}, hypothesis {j}: block at {first} sees clean positions {key_pos[i][seen.any(0)].tolist()}"
            noisy = attn[i, cols, kv_old + width:].reshape(block, 3, block)  # (B, hypotheses, B)
            assert torch.equal(noisy[:, j], in_block) and not noisy[:, [k for k in range(3) if k != j]].any()
            beyond += int((key_pos[i] >= first).any())
    assert beyond >= 4  # most blocks had clean keys at or after their start to leak: the check is not vacuous


def assert_drafts_equal_diffusion_steps(dlm) -> None:
    """One speculative step (as ``iter_speculative`` builds it, first step: empty cache) over two rows whose drafts
    reach into a block that some hypothesis leaves all-mask: that block's logits equal those of a plain diffusion
    step (``FullStepper``) on the same prefix with an all-mask block."""
    block = dlm.config.block_size
    rows = [spec._Row(seq=PROMPTS[1][:8], prompt_len=4, draft=[7, 8, 9]),  # none accepted: block 8..11, draft in it
            spec._Row(seq=PROMPTS[1][:5], prompt_len=5, draft=[21, 22, 23])]  # all accepted: block 8..11
    hyps = [[3, 0], [3, 0]]
    ids, pos, attn, starts = spec._step_inputs(rows, hyps, block, dlm.mask_id, pad_token_id(dlm.tokenizer),
                                               dlm.pattern.causal_in_block, torch.empty((2, 0), dtype=torch.long),
                                               dlm.device)
    width = ids.shape[1] - 2 * block
    dtype = dlm.model.get_input_embeddings().weight.dtype
    checked = 0
    with torch.no_grad():
        logits = dlm.run(ids, pos, to_attention_mask(attn, dtype, dlm.attn_implementation),
                         past_key_values=new_cache(dlm.model, 2), use_cache=True,
                         noisy=slice(width, ids.shape[1])).logits  # (R, W + H*B, V)
        for i, row in enumerate(rows):
            for j, start in enumerate(starts[i]):
                cols = slice(width + j * block, width + (j + 1) * block)
                if not bool((ids[i, cols] == dlm.mask_id).all()):
                    continue
                layout = Layout.build([(row.seq + row.draft)[:start]], block, pad_token_id(dlm.tokenizer),
                                      dlm.device)
                layout.tokens = torch.cat([layout.tokens, torch.full((1, block), dlm.mask_id)], dim=1)
                want = FullStepper(dlm, layout).block_logits(start, torch.arange(start, start + block))[0]
                torch.testing.assert_close(logits[i, cols], want, atol=1e-4, rtol=1e-4,
                                           msg=lambda m, i=i, j=j: f"row {i}, hypothesis {j}: {m}")
                checked += 1
    assert checked == 2


@pytest.mark.parametrize("family,token_shift", [("llama", True), ("qwen3", True), ("gemma", True), ("llama", False)])
def test_a_drafted_block_predicts_as_a_diffusion_step_on_its_prefix(family, token_shift):
    assert_drafts_equal_diffusion_steps(varied_dlm(family, token_shift))
