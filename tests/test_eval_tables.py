"""P-Soups' tables: per-combination W/L/T, average column, criteria-wise win rate; quality checks."""
import numpy as np
import pytest

from raypref.data.users import psoups_combinations
from raypref.eval.quality import quality_drops, quality_holds
from raypref.eval.tables import (average_win_rates, combination_label, criteria_win_rates,
                                 wlt_markdown, wlt_rows)
from raypref.eval.winrate import win_rate_matrix

TABLE = {"P1A": ("expertise", -1), "P1B": ("expertise", 1), "P2A": ("verbosity", -1),
         "P2B": ("verbosity", 1), "P3A": ("style", 1), "P3B": ("style", -1)}
COMBOS = [tuple(c) for c in psoups_combinations()]


def scores(seed, n=30):
    g = np.random.default_rng(seed)
    return {c: [{"expertise": g.random(), "verbosity": g.random(), "style": g.uniform(-1, 1)}
                for _ in range(n)] for c in COMBOS}


def test_wlt_rows_sum_to_the_count_and_the_total_is_the_sum():
    methods = {"P-Soups": scores(0), "P-MORL": scores(1), "SFT": scores(2)}
    _, rates, details = win_rate_matrix(methods, TABLE, tol=0.05)
    rows = wlt_rows(details, [("P-Soups", "P-MORL"), ("P-Soups", "SFT")])
    for row in rows:
        assert list(row.cells) == ["AAA", "AAB", "ABA", "ABB", "BAA", "BAB", "BBA", "BBB"]
        assert all(sum(cell) == 30 for cell in row.cells.values())
        assert sum(c[0] for c in row.cells.values()) == row.total.wins
        assert sum(c[2] for c in row.cells.values()) == row.total.ties
    text = wlt_markdown(rows)
    assert text.count("\n") == 3 and "P-Soups vs SFT" in text
    assert f"{100 * rows[0].total.rate:.1f}%" in text
    with pytest.raises(KeyError, match="battle"):
        wlt_rows(details, [("P-Soups", "nobody")])


def test_average_column_leaves_out_the_diagonal_and_undecided_cells():
    rates = np.array([[np.nan, 0.6, 0.8], [0.4, np.nan, np.nan], [0.2, np.nan, np.nan]])
    assert average_win_rates(["a", "b", "c"], rates) == pytest.approx(
        {"a": 0.7, "b": 0.4, "c": 0.2})


def test_criteria_win_rate_averages_the_combinations_that_contain_the_preference():
    # A is better on expertise-down (P1A) in every combination; equal verbosity; style: A wins
    # only in the combinations that contain P3A and only on half the prompts
    a, b = {}, {}
    for c in COMBOS:
        a[c] = [{"expertise": 0.1, "verbosity": 0.5, "style": 0.5 if i % 2 else -0.5}
                for i in range(10)]
        b[c] = [{"expertise": 0.9, "verbosity": 0.5, "style": 0.0} for _ in range(10)]
    rates = criteria_win_rates(a, b, TABLE)
    assert rates["P1A"] == 1.0 and rates["P1B"] == 0.0
    assert rates["P2A"] is None and rates["P2B"] is None  # all ties
    assert rates["P3A"] == pytest.approx(0.5) and rates["P3B"] == pytest.approx(0.5)
    assert set(rates) == set(TABLE)
    # a different per-combination rate moves only the preferences of that combination
    a[("P1A", "P2A", "P3A")] = [dict(s, style=-0.5) for s in a[("P1A", "P2A", "P3A")]]
    moved = criteria_win_rates(a, b, TABLE)
    assert moved["P3A"] == pytest.approx((0.0 + 3 * 0.5) / 4)
    assert moved["P3B"] == rates["P3B"] and moved["P1A"] == rates["P1A"]


def test_combination_labels():
    assert combination_label(("P1A", "P2B", "P3A")) == "ABA"
    assert combination_label(("P1B", "P2A", "P3D")) == "BAD"


def test_quality_checks():
    lines = quality_drops({"SFT": 0.6, "P-Soups": 0.58, "P-MORL": 0.4}, "SFT", 0.05)
    assert len(lines) == 1 and lines[0].startswith("P-MORL")
    assert quality_holds([0.6, 0.57, 0.59], 0.6, 0.05)
    assert not quality_holds([0.6, 0.5, 0.59], 0.6, 0.05)
    with pytest.raises(KeyError, match="reference"):
        quality_drops({"P-Soups": 0.5})


def test_pooling_seeds_sums_counts_and_rows():
    from raypref.eval.tables import concat_seeds, pool_win_rates

    table = {"P1A": ("expertise", -1), "P1B": ("expertise", 1), "P2A": ("verbosity", -1),
             "P2B": ("verbosity", 1), "P3A": ("style", 1), "P3B": ("style", -1)}
    per_seed = [(scores(2 * s), scores(2 * s + 1)) for s in range(3)]
    results = [win_rate_matrix({"A": a, "B": b}, table)[2][("A", "B")] for a, b in per_seed]
    pooled = pool_win_rates(results)
    assert pooled.wins == sum(r.wins for r in results)
    assert all(sum(pooled.by_combination[c].__dict__[k] for k in ("wins", "losses", "ties")) == 90
               for c in COMBOS)
    a_all = concat_seeds([a for a, _ in per_seed])
    b_all = concat_seeds([b for _, b in per_seed])
    assert win_rate_matrix({"A": a_all, "B": b_all}, table)[2][("A", "B")] == pooled
    with pytest.raises(ValueError, match="seed 1"):
        concat_seeds([scores(0), {COMBOS[0]: []}])


def test_quality_win_rate_reads_only_the_quality_score():
    from raypref.eval.quality import quality_win_rate

    a = {c: [{"quality": 0.9, "style": -1.0}] * 4 for c in COMBOS[:2]}
    b = {c: [{"quality": 0.5, "style": 1.0}] * 4 for c in COMBOS[:2]}
    b[COMBOS[1]] = [{"quality": 0.9, "style": 1.0}] * 4
    result = quality_win_rate(a, b, tol=0.01)
    assert (result.wins, result.losses, result.ties) == (4, 0, 4)
    assert result.by_combination[COMBOS[0]].wins == 4
