"""Quality checks beside the win rates (P-Soups Fig. 2): a personalized arm should not buy its
wins by losing general quality (here: the world's `quality` judge, or any scorer)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

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


def base_quality_at(values: Sequence[float], reference_values: Sequence[float],
                    reference_quality: Sequence[float], k: int | None = None) -> np.ndarray:
    """The base's mean quality at each of ``values`` of an attribute: the mean quality of the
    ``k`` reference answers (the base's own, e.g. the candidate pool's) nearest to it on that
    attribute; default k = a tenth of the references (at least 1). A nearest-neighbour mean,
    not a line: on SmolLM2's pool quality rises with words up to ~75 and then levels off."""
    ref_v = np.asarray(reference_values, dtype=np.float64)
    ref_q = np.asarray(reference_quality, dtype=np.float64)
    if ref_v.shape != ref_q.shape or ref_v.ndim != 1 or not len(ref_v):
        raise ValueError(f"base_quality_at: need one quality per reference value, got "
                         f"{ref_v.shape} values and {ref_q.shape} qualities")
    k = max(1, len(ref_v) // 10) if k is None else k
    if not 1 <= k <= len(ref_v):
        raise ValueError(f"base_quality_at: k={k} must be in 1..{len(ref_v)} (the references)")
    gaps = np.abs(np.asarray(values, dtype=np.float64)[:, None] - ref_v[None, :])
    nearest = np.argsort(gaps, axis=1, kind="stable")[:, :k]
    return ref_q[nearest].mean(axis=1)


def attribute_matched_quality(quality: Sequence[float], point_values: Sequence[Sequence[float]],
                              sft_values: Sequence[float], reference_values: Sequence[float],
                              reference_quality: Sequence[float], k: int | None = None) -> list[float]:
    """A sweep's quality compared with SFT's *at the same attribute level*.

    A quality judge may lean with an attribute (on SmolLM2's pool the text quality judge rises
    with words and reading grade), so a sweep towards short or simple answers loses judged
    quality even where its answers are as good as the base's own short or simple ones. Point
    i's quality minus (the base's quality at point i's answers − the base's quality at SFT's
    answers), both from `base_quality_at`: what is left is what the soup lost beyond what
    the judge gives the base for the same change of the attribute. ``point_values``: each
    point's answers' attribute values; ``sft_values``: SFT's."""
    if len(quality) != len(point_values):
        raise ValueError(f"attribute_matched_quality: {len(quality)} qualities but "
                         f"{len(point_values)} points")
    at_sft = base_quality_at(sft_values, reference_values, reference_quality, k).mean()
    return [float(q - (base_quality_at(v, reference_values, reference_quality, k).mean() - at_sft))
            for q, v in zip(quality, point_values)]


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
