"""Quality checks beside the win rates (002 Fig. 2): a personalized arm should not buy its
wins by losing general quality (here: the world's `quality` judge, or any scorer)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence


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
