"""The mask token is never emitted, even by a model that ranks it first almost everywhere. The tiny test models'
mask row (the mean embedding) never wins, a real model's head can; here the mask row is pointed along the model's
mean final hidden state, so the ban decides nearly every token. Every mode (diffusion cached and not, AR,
speculative fused and not; greedy and sampled) must leave it out and still equal its reference."""

import dataclasses

import torch
from test_adapter import gated, hf_greedy
from test_speculative import PROMPTS, varied_dlm

from edlm.config import DecodeConfig
from edlm.decode import generate

BUDGET = 13  # ends mid-block


def favour_mask(dlm, scale: float = 2.0) -> float:
    """Set the output head's mask row to the direction of the mean final hidden state (over clean and mask-token
    inputs), ``scale`` times a typical row's norm; returns the fraction of those positions where the mask token is
    now the top prediction."""
    ids = torch.tensor([PROMPTS[1] + PROMPTS[0] + [dlm.mask_id] * 8])  # (1, T)
    with torch.no_grad():
        h = dlm.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].mean(0)  # (D,)
        head = dlm.model.get_output_embeddings().weight  # (V, D), untied in these models
        head[dlm.mask_id] = h / h.norm() * head.norm(dim=1).mean() * scale
        top = dlm.model(input_ids=ids).logits[0].argmax(-1)  # (T,)
    return float((top == dlm.mask_id).float().mean())


def decode_every_mode(dlm) -> dict[str, list[list[int]]]:
    """Output of every decoding mode and setting on PROMPTS, by a name of the setting."""
    base = DecodeConfig(max_new_tokens=BUDGET, ignore_eos=True)
    settings = {"ar": dict(mode="ar"), "ar sampled": dict(mode="ar", temperature=1.0)}
    for fused in (True, False):
        settings[f"speculative fused={fused}"] = dict(mode="speculative", fused_draft=fused)
    settings["speculative sampled"] = dict(mode="speculative", temperature=1.0)
    for use_cache in (True, False):
        settings[f"diffusion threshold cache={use_cache}"] = dict(threshold=0.3, use_cache=use_cache)
        settings[f"diffusion fixed cache={use_cache}"] = dict(policy="fixed", tokens_per_step=2, use_cache=use_cache)
    settings["diffusion sampled"] = dict(temperature=1.0, threshold=0.3)
    return {name: generate(dlm, PROMPTS, dataclasses.replace(base, **kw)).sequences for name, kw in settings.items()}


def assert_mask_banned_and_modes_agree(dlm, want_ar: list[list[int]]) -> None:
    outs = decode_every_mode(dlm)
    for name, seqs in outs.items():
        emitted = sum(s.count(dlm.mask_id) for s in seqs)
        assert emitted == 0, f"{name} emitted the mask token {emitted} times"
        assert [len(s) for s in seqs] == [BUDGET] * len(PROMPTS), name
    assert outs["ar"] == want_ar
    assert outs["speculative fused=True"] == outs["speculative fused=False"] == want_ar
    for policy in ("threshold", "fixed"):
        assert outs[f"diffusion {policy} cache=True"] == outs[f"diffusion {policy} cache=False"], policy


def test_no_mode_emits_the_mask_token_when_the_model_ranks_it_first():
    dlm = varied_dlm()
    assert favour_mask(dlm) > 0.8  # the ban is what decides: without it most tokens would be the mask
    # The reference: Hugging Face greedy generation with the mask token suppressed.
    want = [dlm.model.generate(torch.tensor([p]), max_new_tokens=BUDGET, min_new_tokens=BUDGET, do_sample=False,
                               suppress_tokens=[dlm.mask_id], pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
    assert_mask_banned_and_modes_agree(dlm, want)


def test_no_gated_mode_emits_the_mask_token_when_the_adapter_ranks_it_first():
    """A gated model's head has one row more than its source's (the mask token's): with that row favoured, AR and
    speculative output still equal the untouched source's greedy output, which cannot contain the mask token."""
    dlm, source = gated()
    assert favour_mask(dlm) > 0.8
    assert_mask_banned_and_modes_agree(dlm, [hf_greedy(source, p, BUDGET) for p in PROMPTS])
