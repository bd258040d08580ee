"""Quality checks beside the win rates (P-Soups Fig. 2): a personalized arm should not buy its
wins by losing general quality (here: the world's `quality` judge, or any scorer)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from raypref.eval.winrate import MethodScores, WinRate, win_rate

QUALITY_KEY = "quality"


def quality_drops(means: Mapping[str, float], reference: str = "SFT",
                  margin: float = 0.05) -> list[str]:
    """Report lines for every arm whose mean quality is below ``reference``'s by more than
    ``margin`` (an absolute difference on the 0..1 scale)."""
    if reference not in means:
        raise KeyError(f"quality_drops: no quality for the reference arm {reference!r}; "
                       f"have {sorted(means)}")
    base = means[reference]
    return [f"{arm}: quality {q:.3f} is below {reference}'s {base:.3f} by {base - q:.3f} "
            f"(margin {margin:g})" for arm, q in means.items()
            if arm != reference and base - q > margin]


def quality_holds(qualities: Sequence[float], reference: float, margin: float = 0.05) -> bool:
    """True when no point of a sweep falls more than ``margin`` below ``reference``; a weight
    sweep counts as monotone only if this holds along it."""
    if not qualities:
        raise ValueError("quality_holds: no qualities")
    return all(reference - q <= margin for q in qualities)


def quality_win_rate(a: MethodScores, b: MethodScores, tol: float = 0.0,
                     key: str = QUALITY_KEY) -> WinRate:
    """P-Soups Fig. 2's helpfulness comparison: A's win rate over B on the quality score alone
    (scores[key] of every row of every combination), W/L/T kept per combination."""
    table = {key: (key, 1)}
    per_combo = {}
    for combo in a:
        if combo not in b:
            raise ValueError(f"quality_win_rate: combination {combo} is missing from B")
        per_combo[combo] = win_rate({(key,): a[combo]}, {(key,): b[combo]}, table, tol)
    return WinRate(sum(r.wins for r in per_combo.values()), sum(r.losses for r in per_combo.values()),
                   sum(r.ties for r in per_combo.values()), per_combo)
