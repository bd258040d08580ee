"""Adaptive (A/B/C) sampling, uniform sampling and per-query demonstration draws."""
from collections import Counter

import pytest

from raypref.data.sampling import AdaptiveSampler, DemonstrationSampler, UniformSampler


def _realized(sampler, steps, users_in):
    counts = Counter()
    for step in steps:
        groups = sampler.groups(step)
        for user, _ in sampler.batch(step):
            counts[next(g for g in "ABC" if user in groups[g])] += 1
    return counts


@pytest.mark.parametrize("ratio", [(1, 2, 4), (1, 1, 3)])
def test_adaptive_realized_group_ratio_matches_config(ratio):
    pools = {u: 50 for u in (1, 2, 3)}
    s = AdaptiveSampler(pools, batch_size=6, phase_steps=14, ratio=ratio, order=(3, 1, 2), seed=1)
    # middle phase: A={2}, B={1}, C={3}; all groups non-empty
    assert s.groups(20) == {"A": [2], "B": [1], "C": [3]}
    counts = _realized(s, range(15, 29), None)
    total = sum(counts.values())
    assert total == 6 * 14
    for g, r in zip("ABC", ratio):  # within one example of the exact share
        assert abs(counts[g] - total * r / sum(ratio)) < 1
    # first phase: C is empty, so A : B = 1 : 2 under (1, 2, 4)
    first = _realized(s, range(1, 15), None)
    assert first["C"] == 0
    assert first["A"] * ratio[1] == first["B"] * ratio[0]


def test_adaptive_phases_follow_order_and_end_with_all_done():
    s = AdaptiveSampler({1: 10, 2: 10}, batch_size=4, phase_steps=3, order=(2, 1))
    assert s.groups(1) == {"A": [1], "B": [2], "C": []}
    assert s.groups(4) == {"A": [], "B": [1], "C": [2]}
    assert s.groups(7) == {"A": [], "B": [], "C": [2, 1]}
    assert {u for u, _ in s.batch(7)} <= {1, 2} and len(s.batch(7)) == 4
    assert all(0 <= i < 10 for step in range(1, 9) for _, i in s.batch(step))
    assert s.batch(5) == s.batch(5)  # deterministic per (seed, step): resumable


def test_adaptive_bad_config():
    with pytest.raises(ValueError, match="order"):
        AdaptiveSampler({1: 5, 2: 5}, 4, 3, order=(1, 1))
    with pytest.raises(ValueError, match="ratio"):
        AdaptiveSampler({1: 5}, 4, 3, ratio=(1, 2))
    with pytest.raises(ValueError, match="no training examples"):
        AdaptiveSampler({1: 0}, 4, 3)


def test_uniform_sampler_covers_users_in_proportion_to_pools():
    s = UniformSampler({1: 100, 2: 300}, batch_size=50, seed=0)
    counts = Counter(u for step in range(1, 41) for u, _ in s.batch(step))
    assert counts[2] / (counts[1] + counts[2]) == pytest.approx(0.75, abs=0.03)


def test_demonstrations_from_pool_fresh_per_epoch_and_never_the_query():
    s = DemonstrationSampler({1: 300, 2: 300}, n_demos=8, pool_size=100, seed=0)
    d0, d1 = s.demos(1, 5, epoch=0), s.demos(1, 5, epoch=1)
    assert len(set(d0)) == 8 and all(0 <= i < 100 for i in d0)
    assert 5 not in d0 and 5 not in d1
    assert d0 != d1 and s.demos(1, 5, epoch=0) == d0
    assert all(5 not in s.demos(2, 5, e) for e in range(50))
    with pytest.raises(KeyError, match="unknown user id 7"):
        s.demos(7, 0, 0)
    with pytest.raises(ValueError, match="fewer than"):
        DemonstrationSampler({1: 300, 2: 5}, n_demos=8)
