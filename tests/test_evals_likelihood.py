"""Likelihoods: the ELBO against the exact AR value, determinism, batching."""

import statistics

import pytest
from conftest import make_dlm

from edlm.evals.likelihood import Scorer, ar_loglikelihood, ar_scores, dlm_elbo, dlm_elbos

CONTEXT, CONT = [5, 17, 99, 3, 42], [120, 44, 8, 61, 200, 7]


def test_block_size_one_elbo_equals_the_exact_ar_likelihood_in_expectation():
    # block_causal_clean + block 1 + token shift: every masked token is predicted from the clean copy's previous
    # state, i.e. exactly the AR model's next-token distribution, so E[ELBO] = log p_AR(continuation | context).
    dlm = make_dlm("llama", block_size=1, token_shift=True)
    exact = ar_loglikelihood(dlm.model, CONTEXT, CONT, banned=dlm.mask_id)
    few = [dlm_elbo(dlm, CONTEXT, CONT, n_samples=8, seed=s) for s in range(8)]
    many = [dlm_elbo(dlm, CONTEXT, CONT, n_samples=256, seed=s) for s in range(4)]
    assert abs(statistics.mean(many) - exact) < 0.08 * abs(exact)
    assert statistics.pstdev(many) < statistics.pstdev(few)  # converges as samples grow
    # same seed, same estimate
    assert dlm_elbo(dlm, CONTEXT, CONT, n_samples=3, seed=0) == dlm_elbo(dlm, CONTEXT, CONT, n_samples=3, seed=0)


def test_elbo_estimate_converges_and_is_deterministic_for_larger_blocks():
    dlm = make_dlm("qwen3", block_size=4)
    runs = {n: [dlm_elbo(dlm, CONTEXT, CONT, n_samples=n, seed=s) for s in range(6)] for n in (4, 64)}
    assert statistics.pstdev(runs[64]) < statistics.pstdev(runs[4])
    assert abs(statistics.mean(runs[64]) - statistics.mean(runs[4])) < 3 * statistics.pstdev(runs[4]) + 1e-6
    assert dlm_elbo(dlm, CONTEXT, CONT, n_samples=4, seed=1) == runs[4][1]
    assert all(v < 0 for v in runs[64])


def test_batched_likelihoods_equal_one_at_a_time():
    dlm = make_dlm("llama", block_size=4)
    choices = [[7], [120, 44, 8], [9, 9, 9, 9, 9, 9], [], [33, 1]]  # different lengths and padded lengths
    batched = ar_scores(dlm.model, CONTEXT, choices, banned=dlm.mask_id)
    single = [ar_loglikelihood(dlm.model, CONTEXT, c, banned=dlm.mask_id) for c in choices]
    assert batched == pytest.approx(single, abs=1e-4) and batched[3] == 0.0
    elbos = dlm_elbos(dlm, CONTEXT, choices, n_samples=5, seed=3, max_rows=4)  # several forwards per length group
    assert elbos == pytest.approx([dlm_elbo(dlm, CONTEXT, c, n_samples=5, seed=3) if c else 0.0 for c in choices],
                                  abs=1e-4)
    scorer = Scorer(dlm, n_samples=5, seed=3)
    assert scorer.score_choices(CONTEXT, choices) == pytest.approx(elbos, abs=1e-5)
    with pytest.raises(Exception, match="non-empty context"):
        dlm_elbos(dlm, [], [[1]])
