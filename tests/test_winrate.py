"""Aggregated win rate (P-Soups App. E.1) on hand-made judge scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raypref.eval.winrate import aggregated_outcome, dimension_outcome, win_rate, win_rate_matrix

# P1A: simpler is better (lower expertise), P1B: more expert; P2A concise (lower length); P3A friendlier.
PREFS = {
    "P1A": ("expertise", -1), "P1B": ("expertise", 1),
    "P2A": ("length", -1), "P2B": ("length", 1),
    "P3A": ("friendly", 1), "P3B": ("friendly", -1),
}
ABA = ("P1A", "P2B", "P3A")
BBB = ("P1B", "P2B", "P3B")


def s(expertise, length, friendly):
    return {"expertise": expertise, "length": length, "friendly": friendly}


def test_dimension_outcome_direction_and_tolerance():
    assert dimension_outcome(0.9, 0.1, 1) == 1
    assert dimension_outcome(0.9, 0.1, -1) == -1
    assert dimension_outcome(0.50, 0.52, 1, tol=0.05) == 0
    assert dimension_outcome(0.50, 0.52, 1, tol=0.0) == -1
    with pytest.raises(ValueError, match="direction"):
        dimension_outcome(1.0, 0.0, 2)


def test_aggregated_outcome_sums_dimensions():
    a, b = s(0.2, 10, 0.9), s(0.8, 20, 0.1)  # A simpler (+1), shorter (-1 for P2B), friendlier (+1)
    assert aggregated_outcome(a, b, ABA, PREFS) == 1  # +1 -1 +1
    assert aggregated_outcome(a, b, BBB, PREFS) == -1  # -1 -1 -1
    assert aggregated_outcome(a, b, ("P1A", "P2B"), PREFS) == 0  # +1 -1: a tie
    assert aggregated_outcome(b, a, ABA, PREFS) == -1  # antisymmetric


def test_win_rate_counts_ties_but_excludes_them():
    a = {ABA: [s(0.2, 10, 0.9), s(0.5, 10, 0.5), s(0.9, 30, 0.9)], BBB: [s(0.9, 30, 0.1)]}
    b = {ABA: [s(0.8, 20, 0.1), s(0.5, 10, 0.5), s(0.1, 10, 0.1)], BBB: [s(0.1, 10, 0.9)]}
    r = win_rate(a, b, PREFS)
    # ABA: win (+1-1+1), tie (all equal), win (-1+1+1); BBB: win (+1+1+1).
    assert (r.wins, r.losses, r.ties) == (3, 0, 1)
    assert r.rate == 1.0
    assert (r.by_combination[ABA].wins, r.by_combination[ABA].ties) == (2, 1)
    back = win_rate(b, a, PREFS)
    assert (back.wins, back.losses, back.ties) == (0, 3, 1)


def test_win_rate_mixed_outcomes_value():
    a = {ABA: [s(0.2, 20, 0.9), s(0.9, 5, 0.1), s(0.2, 20, 0.9), s(0.3, 20, 0.9)]}
    b = {ABA: [s(0.8, 10, 0.1), s(0.1, 20, 0.9), s(0.9, 10, 0.2), s(0.3, 20, 0.9)]}
    r = win_rate(a, b, PREFS)
    assert (r.wins, r.losses, r.ties) == (2, 1, 1)
    assert r.rate == pytest.approx(2 / 3)


def test_all_ties_give_undefined_rate():
    same = {ABA: [s(0.5, 10, 0.5)] * 3}
    nearly = {ABA: [s(0.51, 10.0, 0.49)] * 3}
    r = win_rate(same, nearly, PREFS, tol=0.05)
    assert (r.wins, r.losses, r.ties) == (0, 0, 3)
    assert r.rate is None


def test_matrix_rows_beat_columns_complementary_and_nan_diagonal():
    good = {ABA: [s(0.1, 30, 0.9)] * 2 + [s(0.9, 5, 0.1)]}
    mid = {ABA: [s(0.5, 15, 0.5)] * 3}
    flat = {ABA: [s(0.5, 15, 0.5)] * 3}
    names, rates, details = win_rate_matrix({"P-SOUPS": good, "PP": mid, "VB": flat}, PREFS)
    assert names == ["P-SOUPS", "PP", "VB"]
    assert all(math.isnan(rates[i, i]) for i in range(3))
    assert rates[0, 1] == pytest.approx(2 / 3) and rates[1, 0] == pytest.approx(1 / 3)
    assert np.isnan(rates[1, 2]) and details[("PP", "VB")].ties == 3  # identical outputs: all ties


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="different combinations"):
        win_rate({ABA: [s(0, 0, 0)]}, {BBB: [s(0, 0, 0)]}, PREFS)
    with pytest.raises(ValueError, match="prompts"):
        win_rate({ABA: [s(0, 0, 0)]}, {ABA: []}, PREFS)
    with pytest.raises(KeyError, match="friendly"):
        win_rate({ABA: [{"expertise": 0, "length": 0}]}, {ABA: [s(0, 0, 0)]}, PREFS)
    with pytest.raises(KeyError, match="P4A"):
        aggregated_outcome(s(0, 0, 0), s(0, 0, 0), ("P4A",), PREFS)
