"""Aggregated pairwise win rate of Personalized Soups (P-Soups, Appendix E.1).

For one prompt and one preference combination (e.g. ``("P1A", "P2B", "P3A")``), each preference
compares the two outputs on its own dimension: WIN = +1, TIE = 0, LOSE = -1. The sum over the
combination's preferences decides the aggregated outcome (> 0 WIN, = 0 TIE, < 0 LOSE). The win rate
over all prompts × combinations is ``wins / (wins + losses)``; ties are counted but excluded.

Judge scores are plain dicts (``{"expertise": 0.8, ...}``); a preference names the score key it
reads and its direction: ``+1`` when a higher score is better, ``-1`` when lower is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

Combination = tuple[str, ...]
Scores = Mapping[str, float]
# For each preference combination, the judge scores of a method's output on each prompt (same prompt order).
MethodScores = Mapping[Combination, Sequence[Scores]]
# Preference name -> (judge score key, +1 if higher is better / -1 if lower is better).
PreferenceTable = Mapping[str, tuple[str, int]]


@dataclass(frozen=True)
class WinRate:
    """Win / loss / tie counts of method A against method B; ``rate`` is None without decisive outcomes."""

    wins: int
    losses: int
    ties: int
    by_combination: dict[Combination, "WinRate"] = field(default_factory=dict, compare=False, repr=False)

    @property
    def rate(self) -> float | None:
        decisive = self.wins + self.losses
        return self.wins / decisive if decisive else None


def dimension_outcome(score_a: float, score_b: float, direction: int, tol: float = 0.0) -> int:
    """+1 if A is better on this dimension, -1 if B is, 0 when the scores differ by at most ``tol``."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction!r}")
    diff = (score_a - score_b) * direction
    if not math.isfinite(diff):
        raise ValueError(f"judge scores must be finite, got {score_a!r} and {score_b!r}")
    if abs(diff) <= tol:
        return 0
    return 1 if diff > 0 else -1


def aggregated_outcome(
    scores_a: Scores, scores_b: Scores, combination: Combination, preferences: PreferenceTable, tol: float = 0.0
) -> int:
    """Sign of the summed per-preference outcomes: +1 WIN, 0 TIE, -1 LOSE (for A)."""
    total = 0
    for pref in combination:
        if pref not in preferences:
            raise KeyError(f"preference {pref!r} is not in the preference table {sorted(preferences)}")
        key, direction = preferences[pref]
        for label, scores in (("A", scores_a), ("B", scores_b)):
            if key not in scores:
                raise KeyError(f"judge scores of output {label} have no {key!r} (needed by {pref}); "
                               f"they have {sorted(scores)}")
        total += dimension_outcome(scores_a[key], scores_b[key], direction, tol)
    return (total > 0) - (total < 0)


def win_rate(a: MethodScores, b: MethodScores, preferences: PreferenceTable, tol: float = 0.0) -> WinRate:
    """Aggregated win rate of A over B across every prompt × preference combination."""
    if set(a) != set(b):
        raise ValueError(f"the two methods were scored on different combinations: "
                         f"{sorted(set(a) ^ set(b))}")
    if not a:
        raise ValueError("no preference combinations to compare")
    per_combo = {}
    for combo in a:
        if len(a[combo]) != len(b[combo]):
            raise ValueError(f"combination {combo}: {len(a[combo])} prompts for A but {len(b[combo])} for B")
        outcomes = [aggregated_outcome(sa, sb, combo, preferences, tol) for sa, sb in zip(a[combo], b[combo])]
        per_combo[combo] = WinRate(outcomes.count(1), outcomes.count(-1), outcomes.count(0))
    return WinRate(
        wins=sum(r.wins for r in per_combo.values()),
        losses=sum(r.losses for r in per_combo.values()),
        ties=sum(r.ties for r in per_combo.values()),
        by_combination=per_combo,
    )


def win_rate_matrix(
    methods: Mapping[str, MethodScores], preferences: PreferenceTable, tol: float = 0.0
) -> tuple[list[str], np.ndarray, dict[tuple[str, str], WinRate]]:
    """Win rate of every row method over every column method (P-Soups Table 2 layout).

    Returns ``(names, rates, details)``: ``rates[i, j]`` is the win rate of ``names[i]`` over
    ``names[j]`` (NaN on the diagonal and where no comparison was decisive); ``details`` holds the counts.
    """
    names = list(methods)
    rates = np.full((len(names), len(names)), np.nan)
    details: dict[tuple[str, str], WinRate] = {}
    for i, row in enumerate(names):
        for j, col in enumerate(names):
            if i == j:
                continue
            result = win_rate(methods[row], methods[col], preferences, tol)
            details[(row, col)] = result
            if result.rate is not None:
                rates[i, j] = result.rate
    return names, rates, details
