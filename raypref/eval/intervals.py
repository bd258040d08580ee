"""Bootstrap 95% intervals for aggregated win rates, over prompts and training seeds.

The evaluation of method A against B is a grid: training seeds × evaluation rows (prompt ×
sample) × preference combinations. Seeds and prompts are the random parts of the design, the
combinations are fixed (the 8 users of P-Soups §E.1). A bootstrap replicate resamples seeds and
prompts with replacement (a crossed, paired bootstrap: the same resampled prompts for every
seed, combination and sample of the prompt, and, through ``seed``, for every pair of methods)
and recomputes ``wins / (wins + losses)``; the interval is the percentile interval.

Resampling both crossed factors is conservative: the seed × prompt noise is counted more than
once, so with a few seeds the interval is wider than the true spread (no bootstrap of a
crossed design is exact, McCullagh 2000). ``resample_seeds=False`` keeps the seeds fixed: an
interval for these trained policies over prompts, narrower, but blind to how much a new
training seed would move the result.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from raypref.eval.winrate import Combination, MethodScores, PreferenceTable, aggregated_outcome


@dataclass(frozen=True)
class Interval:
    """Point estimate (pooled over seeds) and percentile bootstrap interval; None where no
    outcome was decisive."""
    estimate: float | None
    low: float | None
    high: float | None
    level: float
    wins: int
    losses: int
    ties: int

    def text(self, scale: float = 100.0) -> str:
        if self.estimate is None:
            return "n/a"
        return (f"{scale * self.estimate:.1f} [{scale * self.low:.1f}, {scale * self.high:.1f}]")


def prompt_groups(n_prompts: int, samples_per_prompt: int = 1) -> np.ndarray:
    """Prompt index of each row when rows are prompt 0..n-1 for sample 0, then sample 1, ...
    (the order of `experiments.soups.evaluate.judged_generations`)."""
    return np.tile(np.arange(n_prompts), samples_per_prompt)


def outcome_matrix(a: MethodScores, b: MethodScores, preferences: PreferenceTable,
                   tol: float = 0.0, combinations: Sequence[Combination] | None = None
                   ) -> np.ndarray:
    """Aggregated outcomes of A vs B (+1 / 0 / -1), shape (rows, combinations)."""
    combos = list(combinations) if combinations is not None else list(a)
    missing = [c for c in combos if c not in a or c not in b]
    if missing:
        raise ValueError(f"outcome_matrix: combinations {missing} are missing from a method")
    rows = {len(a[c]) for c in combos} | {len(b[c]) for c in combos}
    if len(rows) != 1:
        raise ValueError(f"outcome_matrix: every combination needs the same number of rows for "
                         f"both methods; got lengths {sorted(rows)}")
    return np.array([[aggregated_outcome(sa, sb, c, preferences, tol)
                      for sa, sb in zip(a[c], b[c])] for c in combos], dtype=np.int8).T


def win_rate_interval(per_seed: Sequence[np.ndarray], groups: Sequence[int] | None = None, *,
                      n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                      resample_seeds: bool = True) -> Interval:
    """Interval of the aggregated win rate from ``per_seed`` outcome matrices (one per
    training seed, each rows × combinations, rows in the same order for every seed).

    ``groups[r]``: the prompt of row r (rows of one prompt are resampled together); default:
    every row its own prompt. Same inputs and ``seed``: same interval.
    """
    if not per_seed:
        raise ValueError("win_rate_interval: no seeds")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"win_rate_interval: need 0 < level < 1 and n_boot >= 1, got "
                         f"level={level}, n_boot={n_boot}")
    shapes = {np.shape(o) for o in per_seed}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"win_rate_interval: every seed needs one rows × combinations matrix; "
                         f"got shapes {sorted(shapes)}")
    outcomes = np.stack([np.asarray(o) for o in per_seed])        # seeds × rows × combos
    n_rows = outcomes.shape[1]
    groups = np.arange(n_rows) if groups is None else np.asarray(groups)
    if groups.shape != (n_rows,):
        raise ValueError(f"win_rate_interval: groups has {groups.size} entries for {n_rows} rows")
    _, group_index = np.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1 if n_rows else 0
    # wins / losses per seed and prompt: a replicate only reweights these
    wins = np.zeros((len(outcomes), n_groups))
    losses = np.zeros((len(outcomes), n_groups))
    np.add.at(wins.T, group_index, (outcomes == 1).sum(axis=2).T)
    np.add.at(losses.T, group_index, (outcomes == -1).sum(axis=2).T)
    total_w, total_l = int(wins.sum()), int(losses.sum())
    ties = int((outcomes == 0).sum())
    if total_w + total_l == 0:
        return Interval(None, None, None, level, total_w, total_l, ties)

    rng = np.random.default_rng(seed)
    n_seeds = len(outcomes)
    seed_w = (rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot)
              if resample_seeds else np.ones((n_boot, n_seeds)))
    prompt_w = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_boot)
    boot_w = np.einsum("bs,sp,bp->b", seed_w, wins, prompt_w)
    boot_l = np.einsum("bs,sp,bp->b", seed_w, losses, prompt_w)
    decisive = boot_w + boot_l > 0
    rates = boot_w[decisive] / (boot_w[decisive] + boot_l[decisive])
    alpha = (1 - level) / 2
    low, high = np.quantile(rates, [alpha, 1 - alpha])
    return Interval(total_w / (total_w + total_l), float(low), float(high), level,
                    total_w, total_l, ties)


def win_rate_intervals(methods_per_seed: Sequence[Mapping[str, MethodScores]],
                       preferences: PreferenceTable, groups: Sequence[int] | None = None, *,
                       tol: float = 0.0, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                       resample_seeds: bool = True) -> dict[tuple[str, str], Interval]:
    """Intervals for every ordered pair of methods (P-Soups Table 2 with intervals).

    ``methods_per_seed[s]``: {method: {combination: scores per row}} of training seed s; every
    seed must hold the same methods and combinations. One bootstrap seed for every pair, so
    the pairs are resampled alike.
    """
    if not methods_per_seed:
        raise ValueError("win_rate_intervals: no seeds")
    names = list(methods_per_seed[0])
    for s, methods in enumerate(methods_per_seed):
        if list(methods) != names:
            raise ValueError(f"win_rate_intervals: seed {s} has methods {list(methods)}, "
                             f"seed 0 has {names}")
    combos = list(methods_per_seed[0][names[0]]) if names else []
    out = {}
    for row in names:
        for col in names:
            if row != col:
                per_seed = [outcome_matrix(m[row], m[col], preferences, tol, combos)
                            for m in methods_per_seed]
                out[(row, col)] = win_rate_interval(per_seed, groups, n_boot=n_boot, level=level,
                                                    seed=seed, resample_seeds=resample_seeds)
    return out


def sweep_bootstrap(points: Sequence[Sequence[float]], groups: Sequence[int], *, n_boot: int = 2000,
                    level: float = 0.95, seed: int = 0) -> tuple[list[tuple[float, float]], float]:
    """A weight sweep's noise over prompts: ``points[i]``: the judged value of every answer at
    weight i, rows grouped by prompt (``groups``, the same rows at every weight). Resamples
    prompts with replacement, the same draw for every weight (the points stay paired), and
    returns each point's percentile interval of the mean and the share of resamples whose means
    rise strictly at every step: how sure "monotone" is, where a 5-point sweep's steps are as
    small as its noise."""
    values = np.asarray(points, dtype=np.float64)
    groups = np.asarray(groups)
    if values.ndim != 2 or values.shape[1] != len(groups) or not len(groups):
        raise ValueError(f"sweep_bootstrap: need [points, rows] values with one group per row, "
                         f"got {values.shape} values and {len(groups)} groups")
    ids, per_row = np.unique(groups, return_inverse=True)
    sums = np.zeros((values.shape[0], len(ids)))
    np.add.at(sums, (slice(None), per_row), values)
    counts = np.bincount(per_row, minlength=len(ids)).astype(np.float64)
    draw = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    means = sums[:, draw].sum(axis=2) / counts[draw].sum(axis=1)  # [points, n_boot]
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail], axis=1)
    rising = float(np.mean(np.all(np.diff(means, axis=0) > 0, axis=0)))
    return [(float(lo), float(hi)) for lo, hi in zip(low, high)], rising
