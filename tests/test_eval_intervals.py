"""Bootstrap intervals of aggregated win rates over prompts and seeds."""
import numpy as np
import pytest

from raypref.eval.intervals import (outcome_matrix, prompt_groups, win_rate_interval,
                                    win_rate_intervals)

TABLE = {"P1A": ("expertise", -1), "P2A": ("verbosity", -1)}
COMBOS = [("P1A", "P2A"), ("P1A",)]


def synthetic(p_win, n_prompts, n_seeds=1, n_combos=2, seed=0):
    """Outcome matrices where A wins with probability p_win, else loses or ties."""
    g = np.random.default_rng(seed)
    return [g.choice([1, -1, 0], p=[p_win, 0.9 - p_win, 0.1], size=(n_prompts, n_combos))
            for _ in range(n_seeds)]


def test_interval_covers_the_estimate_and_shrinks_with_more_prompts():
    widths = []
    for n in (40, 400, 4000):
        iv = win_rate_interval(synthetic(0.6, n))
        assert iv.low <= iv.estimate <= iv.high
        assert iv.estimate == pytest.approx(iv.wins / (iv.wins + iv.losses))
        widths.append(iv.high - iv.low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]
    assert win_rate_interval(synthetic(0.6, 4000)).low > 0.6 / 0.9 - 0.03


def test_deterministic_with_seed_and_seed_dependent():
    data = synthetic(0.5, 100, n_seeds=3)
    assert win_rate_interval(data, seed=4) == win_rate_interval(data, seed=4)
    assert win_rate_interval(data, seed=4).low != win_rate_interval(data, seed=5).low


def test_seeds_that_disagree_widen_the_interval():
    agree = synthetic(0.6, 300, n_seeds=3)
    disagree = [synthetic(p, 300, seed=i)[0] for i, p in enumerate((0.3, 0.6, 0.85))]
    w_agree = np.subtract(*reversed(_bounds(win_rate_interval(agree))))
    w_disagree = np.subtract(*reversed(_bounds(win_rate_interval(disagree))))
    assert w_disagree > 2 * w_agree


def test_fixed_seeds_narrow_the_interval_with_more_seeds_while_resampling_them_is_conservative():
    one = win_rate_interval(synthetic(0.5, 200, n_seeds=1))
    three = synthetic(0.5, 200, n_seeds=3)
    fixed = win_rate_interval(three, resample_seeds=False)
    both = win_rate_interval(three)
    width = lambda iv: iv.high - iv.low  # noqa: E731
    assert width(fixed) < 0.75 * width(one)
    assert width(both) > width(fixed)
    assert fixed.estimate == both.estimate


def _bounds(iv):
    return iv.low, iv.high


def test_rows_of_one_prompt_are_resampled_together():
    # two samples per prompt that always agree: twice the rows, but no more information
    base = synthetic(0.6, 60)[0]
    doubled = np.concatenate([base, base])
    grouped = win_rate_interval([doubled], prompt_groups(60, 2))
    naive = win_rate_interval([doubled])
    single = win_rate_interval([base])
    assert grouped.high - grouped.low == pytest.approx(single.high - single.low, rel=0.15)
    assert naive.high - naive.low < 0.85 * (grouped.high - grouped.low)


def test_outcome_matrix_from_judge_scores_and_pairwise_table():
    a = {c: [{"expertise": 0.1, "verbosity": 0.2}] * 5 for c in COMBOS}
    b = {c: [{"expertise": 0.5, "verbosity": 0.1}] * 5 for c in COMBOS}
    m = outcome_matrix(a, b, TABLE, combinations=COMBOS)
    assert m.shape == (5, 2)
    assert (m[:, 0] == 0).all() and (m[:, 1] == 1).all()  # +1 -1 = tie; P1A alone: win
    table = win_rate_intervals([{"A": a, "B": b}] * 2, TABLE, n_boot=200)
    assert table[("A", "B")].estimate == 1.0 and table[("B", "A")].estimate == 0.0
    assert table[("A", "B")].ties == 10


def test_all_ties_and_bad_inputs():
    ties = win_rate_interval([np.zeros((10, 2), dtype=int)])
    assert ties.estimate is None and ties.ties == 20 and ties.text() == "n/a"
    with pytest.raises(ValueError, match="shapes"):
        win_rate_interval([np.zeros((10, 2)), np.zeros((9, 2))])
    with pytest.raises(ValueError, match="groups"):
        win_rate_interval([np.zeros((10, 2))], groups=[0, 1])
    with pytest.raises(ValueError, match="missing"):
        outcome_matrix({COMBOS[0]: []}, {}, TABLE)


@pytest.mark.parametrize("level", [0.95, 0.5])
def test_interval_has_its_nominal_coverage_and_normal_width(level):
    """Over 300 synthetic experiments the interval covers the true decisive win rate about
    ``level`` of the time, and its width is the normal approximation's 2·z·sqrt(p(1-p)/n)."""
    from statistics import NormalDist

    truth = 0.6 / 0.9  # synthetic(): wins 0.6, losses 0.3, ties 0.1
    covered, ratios = 0, []
    for i in range(300):
        data = synthetic(0.6, 150, seed=100 + i)
        iv = win_rate_interval(data, n_boot=1000, level=level, seed=i)
        covered += iv.low <= truth <= iv.high
        n = iv.wins + iv.losses
        normal = 2 * NormalDist().inv_cdf(0.5 + level / 2) * np.sqrt(iv.estimate * (1 - iv.estimate) / n)
        ratios.append((iv.high - iv.low) / normal)
    assert abs(covered / 300 - level) < 0.05, f"coverage {covered / 300:.3f} for level {level}"
    assert np.median(ratios) == pytest.approx(1.0, abs=0.1)
