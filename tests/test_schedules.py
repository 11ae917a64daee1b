import math

import pytest
import torch

from edlm.config import DiffusionConfig
from edlm.noising import noise, noise_samples, sample_t
from edlm.schedules import Bernoulli, PositionDependent, Uniform


def rates(schedule, t: float, block: int, samples: int = 20000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masked, _ = schedule.sample(torch.full((samples,), t), 1, block, g)
    return masked.float().mean(dim=(0, 1))  # (block,)


@pytest.mark.parametrize("t", [0.25, 0.5])
def test_position_dependent_rates_rise_along_block_and_average_to_t(t):
    block = 16
    r = rates(PositionDependent(sharpness=10.0), t, block)
    assert r.mean().item() == pytest.approx(t, abs=1e-6)  # exactly round(t*L') masks per block
    assert r[-1] > r[0] + 0.3  # strongly later-heavy at this t
    # Monotone up to sampling noise (20000 samples: std of a rate is < 0.004).
    assert torch.all(r[1:] - r[:-1] > -0.015)
    # Uniform has flat rates.
    u = rates(Uniform(), t, block)
    assert (u - t).abs().max() < 0.02


def test_position_dependent_weights_follow_the_formula_for_two_positions():
    # Block of 2, k=1: P(mask pos 1) = w1 / (w0 + w1) = sigmoid(beta * (1 - t)).
    t, block, sharpness = 0.5, 2, 1.0
    beta = sharpness * math.log(2) / block
    want = 1 / (1 + math.exp(-beta * (1 - t)))
    r = rates(PositionDependent(sharpness=sharpness), t, block, samples=200000)
    assert r[1].item() == pytest.approx(want, abs=0.005)


def successive_sampling_inclusion(weights: list[float], k: int) -> list[float]:
    """Exact P(position i is among k draws without replacement, each draw proportional to the remaining weights).

    Dynamic programming over the set already drawn (a bitmask): 2^L' states, cheap for L' = 8.
    """
    n = len(weights)
    prob = {0: 1.0}  # drawn set -> probability
    for _ in range(k):
        nxt: dict[int, float] = {}
        for drawn, p in prob.items():
            left = [i for i in range(n) if not drawn >> i & 1]
            total = sum(weights[i] for i in left)
            for i in left:
                nxt[drawn | 1 << i] = nxt.get(drawn | 1 << i, 0.0) + p * weights[i] / total
        prob = nxt
    return [sum(p for drawn, p in prob.items() if drawn >> i & 1) for i in range(n)]


@pytest.mark.parametrize("t", [0.25, 0.5, 0.75])
def test_position_dependent_rates_equal_weighted_sampling_without_replacement(t):
    # Pins w_i = exp(beta (1 - t) i): writing t for (1 - t) moves a rate by 0.34 at t = 0.25 and 0.75 (t = 0.5
    # cannot tell them apart); a beta 14% off (ln 2 / (L' - 1)) fails at every t.
    block, sharpness, samples = 8, 10.0, 100000
    beta = sharpness * math.log(2) / block
    k = round(t * block)
    want = torch.tensor(successive_sampling_inclusion([math.exp(beta * (1 - t) * i) for i in range(block)], k))
    assert want.sum().item() == pytest.approx(k)
    got = rates(PositionDependent(sharpness=sharpness), t, block, samples=samples)
    tol = 5 * (want * (1 - want) / samples).sqrt()  # 5 standard errors of each empirical rate (< 0.008)
    assert torch.all((got - want).abs() < tol), (got, want)


def test_sharpness_zero_reproduces_uniform_exactly():
    t = torch.rand(64, generator=torch.Generator().manual_seed(1))
    a, ra = PositionDependent(sharpness=0.0).sample(t, 4, 16, torch.Generator().manual_seed(7))
    b, rb = Uniform().sample(t, 4, 16, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and torch.equal(ra, rb)
    c, _ = PositionDependent(sharpness=10.0).sample(t, 4, 16, torch.Generator().manual_seed(7))
    assert not torch.equal(a, c)


def test_reversed_sharpness_masks_early_positions_more():
    r = rates(PositionDependent(sharpness=-10.0), 0.25, 16)
    assert r[0] > r[-1] + 0.3


def test_bernoulli_rate_is_t():
    r = rates(Bernoulli(), 0.3, 16)
    assert r.mean().item() == pytest.approx(0.3, abs=0.01)


def test_noise_masks_at_least_one_per_block_and_replaces_with_mask_id():
    cfg = DiffusionConfig(block_size=8, eps=1e-3)
    x0 = torch.randint(0, 100, (32, 32))
    out = noise(x0, cfg, mask_id=999, generator=torch.Generator().manual_seed(0), t=torch.full((32,), 1e-3))
    assert torch.equal(out.masked, out.xt == 999)
    assert torch.equal(out.xt[~out.masked], x0[~out.masked])
    per_block = out.masked.view(32, 4, 8).sum(-1)
    assert torch.all(per_block == 1)
    assert torch.allclose(out.ratio, torch.full_like(out.ratio, 1 / 8))


def test_complementary_masks_cover_every_token_once():
    cfg = DiffusionConfig(block_size=8, complementary=True)
    x0 = torch.randint(0, 100, (4, 16))
    out = noise(x0, cfg, 999, torch.Generator().manual_seed(0))
    assert out.xt.shape == (8, 16)
    assert torch.equal(out.masked[:4] ^ out.masked[4:], torch.ones(4, 16, dtype=torch.bool))
    assert torch.equal(out.x0[:4], x0) and torch.equal(out.x0[4:], x0)


def test_t_range_and_per_sample_noise_is_independent_of_batch_split():
    t = sample_t(10000, 0.01, torch.Generator().manual_seed(0))
    assert t.min() > 0.01 - 1e-7 and t.max() <= 1.0
    cfg = DiffusionConfig(block_size=4)
    x0 = torch.randint(0, 50, (4, 8))
    whole = noise_samples(x0, cfg, 99, seed=3, sample_ids=[10, 11, 12, 13])
    half = noise_samples(x0[2:], cfg, 99, seed=3, sample_ids=[12, 13])
    assert torch.equal(whole.xt[2:], half.xt)
    other_seed = noise_samples(x0, cfg, 99, seed=4, sample_ids=[10, 11, 12, 13])
    assert not torch.equal(whole.masked, other_seed.masked)
