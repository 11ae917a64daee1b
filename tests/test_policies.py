"""Each commit policy of ``edlm.decode.POLICIES`` at its edges: a confidence (or entropy sum) exactly at the bound
commits, nothing within it commits exactly one position per row, ties go to the leftmost position, and a closed
position never commits however sure it looks. The values are exact in float32, so "at the bound" is exact."""

import pytest
import torch

from edlm.config import DecodeConfig
from edlm.decode import (
    NEEDS_ENTROPY,
    POLICIES,
    entropy_policy,
    entropy_sum_policy,
    fixed_policy,
    left_to_right_policy,
    threshold_policy,
)

T, F = True, False


def test_threshold_commits_a_confidence_exactly_at_the_threshold():
    conf = torch.tensor([[0.75, 0.5, 0.25, 0.5], [0.5, 0.5, 0.5, 0.5], [1.0, 0.25, 1.0, 0.5]])
    open_ = torch.tensor([[T, T, T, F], [T, T, T, T], [T, T, T, T]])
    assert threshold_policy(conf, open_, DecodeConfig(threshold=0.5)).tolist() == [
        [T, T, F, F], [T, T, T, T], [T, F, T, T]]
    # threshold 1.0: a softmax can round to exactly 1.0 in float32, and that is confident enough.
    assert threshold_policy(conf, open_, DecodeConfig(threshold=1.0)).tolist() == [
        [T, F, F, F], [T, F, F, F], [T, F, T, F]]


def test_threshold_with_every_confidence_below_commits_exactly_the_most_confident_per_row():
    conf = torch.tensor([[0.1, 0.3, 0.2, 0.3], [0.4, 0.05, 0.2, 0.1], [0.2, 0.95, 0.6, 0.99], [0.5, 0.5, 0.5, 0.5]])
    open_ = torch.tensor([[T, T, T, T], [F, T, T, T], [T, F, T, F], [F, F, F, F]])
    pick = threshold_policy(conf, open_, DecodeConfig(threshold=0.7))
    # Row 0: a tie at 0.3 goes to the left one. Rows 1-2: the closed positions (0.4; 0.95 and 0.99, above the
    # threshold) are never picked. Row 3: nothing open, nothing committed.
    assert pick.tolist() == [[F, T, F, F], [F, F, T, F], [F, F, T, F], [F, F, F, F]]
    assert pick.sum(-1).tolist() == [1, 1, 1, 0]


def test_fixed_commits_the_k_most_confident_and_breaks_ties_to_the_left():
    conf = torch.tensor([[0.3, 0.3, 0.3, 0.1], [0.9, 0.2, 0.5, 0.2], [0.1, 0.2, 0.9, 0.8], [0.5, 0.5, 0.5, 0.5]])
    open_ = torch.tensor([[T, T, T, T], [F, T, T, T], [F, T, F, F], [F, F, F, F]])
    pick = fixed_policy(conf, open_, DecodeConfig(policy="fixed", tokens_per_step=2))
    # Row 1: the closed 0.9 does not count; 0.5, then the left of two 0.2s. Row 2: one open, fewer than k.
    assert pick.tolist() == [[T, T, F, F], [F, T, T, F], [F, T, F, F], [F, F, F, F]]


def test_left_to_right_commits_the_k_leftmost_open_positions():
    conf = torch.tensor([[0.1, 0.9, 0.9, 0.9, 0.9]]).expand(3, -1)  # confidence plays no part
    open_ = torch.tensor([[F, T, F, T, T], [F, F, F, F, T], [F, F, F, F, F]])
    assert left_to_right_policy(conf, open_, DecodeConfig(policy="left_to_right", tokens_per_step=2)).tolist() == [
        [F, T, F, T, F], [F, F, F, F, T], [F, F, F, F, F]]


def test_entropy_policies_commit_a_sum_exactly_at_the_bound_and_break_ties_to_the_left():
    entropy = torch.tensor([[0.25, 0.5, 0.25, 0.75], [0.5, 0.25, 0.0, 0.25]])
    open_ = torch.tensor([[T, T, T, T], [T, T, F, T]])
    cfg = DecodeConfig(policy="entropy", entropy_bound=0.5)
    # Row 0 sorted 0.25 (col 0), 0.25 (col 2), 0.5, 0.75. Less the largest: 0, 0.25, 0.5 (= the bound), 1.0.
    # Row 1 (the closed 0.0 never counts): 0.25 (col 1), 0.25 (col 3), 0.5: sums 0, 0.25, 0.5 -> all three.
    assert entropy_policy(None, open_, cfg, entropy).tolist() == [[T, T, T, F], [T, T, F, T]]
    # The largest counts too: 0.25, 0.5 (= the bound), 1.0.
    assert entropy_sum_policy(None, open_, cfg, entropy).tolist() == [[T, F, T, F], [F, T, F, T]]


@pytest.mark.parametrize("policy", [entropy_policy, entropy_sum_policy])
def test_entropy_policies_with_nothing_within_the_bound_commit_exactly_the_surest_per_row(policy):
    entropy = torch.tensor([[0.5, 0.3, 0.3, 0.9], [0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    open_ = torch.tensor([[T, T, T, T], [F, T, T, F], [F, F, F, F]])
    pick = policy(None, open_, DecodeConfig(policy="entropy", entropy_bound=0.1), entropy)
    assert pick.tolist() == [[F, T, F, F], [F, F, T, F], [F, F, F, F]]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_commits_at_least_one_open_position_per_row_and_no_closed_one(name):
    """Random blocks full of ties (confidences and entropies on a coarse grid), some rows all closed: whatever the
    policy, each row with an open position commits one or more of them, and nothing else. A policy that commits
    nothing would make the decoder loop forever."""
    g = torch.Generator().manual_seed(0)
    cfg = DecodeConfig(policy=name, threshold=0.9, tokens_per_step=2, entropy_bound=0.5)
    for _ in range(50):
        conf = torch.randint(0, 5, (6, 8), generator=g) / 8.0  # (R, B) at most 0.5: all below the threshold
        entropy = torch.randint(0, 5, (6, 8), generator=g) / 4.0 if name in NEEDS_ENTROPY else None
        open_ = torch.rand((6, 8), generator=g) < 0.5
        open_[0] = False
        pick = POLICIES[name](conf, open_, cfg, entropy)
        assert not (pick & ~open_).any()
        assert torch.equal(pick.any(-1), open_.any(-1))
        if name in ("fixed", "left_to_right"):
            assert torch.equal(pick.sum(-1), open_.sum(-1).clamp_max(2))
