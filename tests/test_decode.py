import pytest
import torch
from conftest import make_dlm

from edlm.ar import ar_generate
from edlm.config import DecodeConfig
from edlm.decode import entropy_policy, entropy_sum_policy, generate, stream
from edlm.errors import EdlmError

PROMPTS = [[5, 17, 99, 3], [120, 44, 8, 61, 200, 7, 19, 33, 2, 90, 14], [250]]


def test_block_size_one_causal_equals_ar_baseline_token_for_token():
    dlm = make_dlm("llama", pattern="causal", token_shift=True, block_size=1)
    cfg = DecodeConfig(max_new_tokens=20)
    ar = ar_generate(dlm.model, PROMPTS, cfg, eos_id=None, banned=[dlm.mask_id])
    for use_cache in (True, False):
        out = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=20, use_cache=use_cache))
        assert out.sequences == ar.sequences
        assert all(len(s) == 20 for s in out.sequences)
    single = [ar_generate(dlm.model, [p], cfg, eos_id=None, banned=[dlm.mask_id]).sequences[0] for p in PROMPTS]
    assert single == ar.sequences  # the baseline's batching is exact too


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma"])
@pytest.mark.parametrize("policy,kwargs", [("threshold", {"threshold": 0.005}), ("fixed", {"tokens_per_step": 3}),
                                           ("entropy", {"entropy_bound": 30.0})])
def test_cache_gives_the_same_tokens_as_full_recomputation(family, policy, kwargs):
    dlm = make_dlm(family, block_size=4)
    base = dict(max_new_tokens=14, policy=policy, **kwargs)
    cached = generate(dlm, PROMPTS, DecodeConfig(use_cache=True, **base))
    full = generate(dlm, PROMPTS, DecodeConfig(use_cache=False, **base))
    assert cached.sequences == full.sequences
    assert cached.stats.forwards == full.stats.forwards
    assert cached.stats.forwards < 14  # 14 tokens per row in fewer forwards: commits were parallel
    assert len({tuple(s) for s in cached.sequences}) == 3  # outputs differ: the check is not vacuous


@pytest.mark.parametrize("token_shift", [False, True])
def test_each_batched_row_equals_the_prompt_decoded_alone(token_shift):
    dlm = make_dlm("qwen3", block_size=4, token_shift=token_shift)
    cfg = DecodeConfig(max_new_tokens=13, threshold=0.02)
    batched = generate(dlm, PROMPTS, cfg).sequences
    alone = [generate(dlm, [p], cfg).sequences[0] for p in PROMPTS]
    assert batched == alone


def test_same_seed_same_output_and_sampling_depends_on_seed():
    dlm = make_dlm(block_size=4)
    cfg = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, threshold=0.5)
    a = generate(dlm, PROMPTS, DecodeConfig(seed=1, **cfg)).sequences
    b = generate(dlm, PROMPTS, DecodeConfig(seed=1, **cfg)).sequences
    c = generate(dlm, PROMPTS, DecodeConfig(seed=2, **cfg)).sequences
    assert a == b and a != c


def test_max_new_tokens_is_exact_and_eos_stops_a_row():
    dlm = make_dlm(block_size=4)
    for n in (1, 3, 4, 9):
        out = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=n, threshold=0.02))
        assert [len(s) for s in out.sequences] == [n, n, n]
    free = generate(dlm, PROMPTS[:1], DecodeConfig(max_new_tokens=12, threshold=0.02)).sequences[0]
    eos = free[5]  # pretend the 6th generated token is EOS
    dlm.tokenizer.eos_token = dlm.tokenizer.convert_ids_to_tokens(eos)
    cut = generate(dlm, PROMPTS[:1], DecodeConfig(max_new_tokens=12, threshold=0.02)).sequences[0]
    assert cut == free[: free.index(eos) + 1]
    kept = generate(dlm, PROMPTS[:1], DecodeConfig(max_new_tokens=12, threshold=0.02, ignore_eos=True)).sequences[0]
    assert kept == free  # ignore_eos (benchmarks): EOS is an ordinary token, max_new_tokens are made


def test_stream_yields_the_same_tokens_block_by_block():
    dlm = make_dlm(block_size=4)
    cfg = DecodeConfig(max_new_tokens=11, threshold=0.02)
    parts = list(stream(dlm, PROMPTS[1], cfg))
    assert len(parts) >= 3 and sum(parts, []) == generate(dlm, [PROMPTS[1]], cfg).sequences[0]


def test_bad_decoding_input_is_rejected_clearly():
    dlm = make_dlm(block_size=4)
    with pytest.raises(EdlmError, match="empty"):
        generate(dlm, [[]], DecodeConfig())
    with pytest.raises(EdlmError, match="context"):
        generate(dlm, [[1] * 2040], DecodeConfig(max_new_tokens=64))
    with pytest.raises(EdlmError, match="inconsistent"):
        generate(dlm, PROMPTS, DecodeConfig(block_size=6))
    with pytest.raises(ValueError, match="threshold"):
        DecodeConfig(threshold=1.2)
    with pytest.raises(ValueError, match="entropy_bound"):
        DecodeConfig(policy="entropy", entropy_bound=-0.1)
    assert generate(dlm, PROMPTS, DecodeConfig(block_size=8, max_new_tokens=4, threshold=0.02)).sequences
    assert torch.is_tensor(dlm.model.get_input_embeddings().weight)


def test_sampled_rows_are_independent_of_their_batch_neighbours():
    dlm = make_dlm(block_size=4)
    cfg = DecodeConfig(max_new_tokens=12, temperature=1.0, threshold=0.5)
    from edlm.decode import iter_steps

    def run(prompts, seeds):
        seqs = [[] for _ in prompts]
        with torch.no_grad():
            for new, _ in iter_steps(dlm, prompts, cfg, seeds=seeds):
                for s, part in zip(seqs, new):
                    s.extend(part)
        return seqs

    batched = run(PROMPTS, [11, 12, 13])
    alone = [run([p], [seed])[0] for p, seed in zip(PROMPTS, [11, 12, 13])]
    assert batched == alone
    assert run(PROMPTS[:1], [14])[0] != alone[0]


def test_eager_attention_decodes_like_sdpa():
    from edlm.checkpoints import tiny_model
    from edlm.config import DiffusionConfig
    from edlm.model import DiffusionLM

    outs = []
    for impl in ("sdpa", "eager"):
        model, tok = tiny_model("qwen2", seed=0, attn_implementation=impl)
        dlm = DiffusionLM.from_ar(model, tok, DiffusionConfig(block_size=4)).eval()
        assert dlm.attn_implementation == impl
        outs.append(generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=10, policy="fixed", tokens_per_step=2)))
    assert outs[0].sequences == outs[1].sequences


def _reference_decode(dlm, prompt: list[int], max_new: int, block: int, threshold: float) -> list[int]:
    """Greedy threshold decoding by full recomputation, written from docs/method.md's rules and nothing in decode.py:
    a query sees every key of its own and earlier blocks; positions past the budget stay mask tokens forever."""
    from edlm.masks import to_attention_mask

    eos, mask = dlm.tokenizer.eos_token_id, dlm.mask_id
    x = list(prompt)
    first_new, out = len(prompt), []
    start = (len(prompt) // block) * block
    while len(out) < max_new:
        end = start + block
        x += [mask] * (end - len(x))
        gen = [i for i in range(start, end) if i >= first_new]
        open_ = [i for i in gen if i < first_new + max_new]
        while open_:
            blk = torch.arange(end) // block
            attn = to_attention_mask(blk[None, :] <= blk[:, None], torch.float32, dlm.attn_implementation)
            logits = dlm.model(input_ids=torch.tensor([x]), attention_mask=attn,
                               position_ids=torch.arange(end)[None]).logits[0].float()
            if dlm.config.token_shift:
                logits = torch.cat([logits[:1] * float("nan"), logits[:-1]])
            logits[:, mask] = float("-inf")
            conf, tok = torch.softmax(logits, -1).max(-1)
            best = max(open_, key=lambda i: float(conf[i]))
            for i in list(open_):
                if i == best or float(conf[i]) >= threshold:
                    x[i] = int(tok[i])
                    open_.remove(i)
            eos_at = [i for i in gen if x[i] == eos and i not in open_ and i < first_new + max_new]
            if eos_at and not any(i < eos_at[0] for i in open_):
                open_ = []
        new = [x[i] for i in gen if i < first_new + max_new]
        if eos in new:
            return out + new[: new.index(eos) + 1]
        out += new
        start = end
    return out


@pytest.mark.parametrize("token_shift", [False, True])
def test_a_block_cut_by_max_new_tokens_sees_masks_not_pads(token_shift):
    """max_new_tokens ending inside a block: the positions past it stay mask tokens (as in training), and the
    decoder (cached and full) equals an independent full-recompute reference token for token."""
    dlm = make_dlm(block_size=4, token_shift=token_shift, peaked=4.0)
    prompts = [[5, 17, 99, 3, 41], [120, 44, 8, 61, 200, 7, 19]]
    seen = set()
    for budget in (1, 2, 5, 6, 7, 10, 11):
        for p in prompts:
            want = _reference_decode(dlm, p, budget, 4, threshold=0.3)
            for use_cache in (True, False):
                cfg = DecodeConfig(max_new_tokens=budget, threshold=0.3, use_cache=use_cache)
                assert generate(dlm, [p], cfg).sequences[0] == want, (budget, p, use_cache)
            seen.add(tuple(want))
    assert len(seen) > 7  # different budgets and prompts gave different outputs: the comparison is not vacuous


def test_entropy_policies_commit_the_least_uncertain_prefix_within_the_bound():
    entropy = torch.tensor([[0.01, 0.5, 0.02, 0.0, 2.0], [0.3, 0.3, 0.3, 0.3, 0.3], [0.9, 0.0, 0.0, 0.0, 0.0]])
    open_ = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cfg = DecodeConfig(policy="entropy", entropy_bound=0.1)
    # EB-sampler: sorted open entropies 0.01, 0.02, 0.5, 2.0; sums less the largest 0, 0.01, 0.03, 0.53 -> three go.
    # Row 2: 0.3 each -> sums less the largest 0, 0.3, ...: only the first. Row 3: its one open position, however
    # uncertain; the closed positions (entropy 0) never.
    assert entropy_policy(None, open_, cfg, entropy).tolist() == [
        [True, True, True, False, False], [True, False, False, False, False], [True, False, False, False, False]]
    # Counting the largest too: 0.01 + 0.02 <= 0.1 but + 0.5 is not.
    assert entropy_sum_policy(None, open_, cfg, entropy).tolist() == [
        [True, False, True, False, False], [True, False, False, False, False], [True, False, False, False, False]]
    wide = DecodeConfig(policy="entropy", entropy_bound=100.0)
    assert entropy_sum_policy(None, open_, wide, entropy).tolist() == open_.tolist()


def test_a_looser_entropy_bound_commits_more_per_forward():
    dlm = make_dlm(block_size=8)

    def forwards(policy, bound):
        cfg = DecodeConfig(max_new_tokens=16, policy=policy, entropy_bound=bound)
        return generate(dlm, PROMPTS, cfg).stats.forwards

    one_per_forward = generate(dlm, PROMPTS, DecodeConfig(max_new_tokens=16, policy="left_to_right")).stats.forwards
    # Nothing is certain in a random model: at bound 0 one position per row and forward (the EB rule's free
    # largest entropy is the first position's own).
    assert forwards("entropy_sum", 0.0) == forwards("entropy", 0.0) == one_per_forward
    assert forwards("entropy", 6.0) < one_per_forward
    assert forwards("entropy_sum", 1e6) == forwards("entropy", 1e6) < forwards("entropy", 6.0)
