"""Which (user, example) pairs a reward-model step trains on.

* `AdaptiveSampler` (Liu 2025 §4.2.2): users pass through groups A (to train), B (training, one
  user per phase) and C (done). Each batch takes N_A : N_B : N_C examples in a configured
  ratio (default 1 : 2 : 4) over the non-empty groups; a group's share is split evenly over
  its users. After the last phase every user is in C.
* `UniformSampler`: the plain baseline, examples drawn uniformly over all users' pools.
* `DemonstrationSampler`: the N demonstrations that identify the user of a query, drawn
  from that user's pool (default 8 of 100, Liu 2025 Table 1), fresh per epoch.

Both batch samplers are deterministic functions of (seed, step), so a resumed run draws
the same batches as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

GROUPS = ("A", "B", "C")


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def _check_pools(pool_sizes: dict[int, int]) -> None:
    if not pool_sizes:
        raise ValueError("sampler: no users (pool_sizes is empty)")
    empty = [u for u, n in pool_sizes.items() if n < 1]
    if empty:
        raise ValueError(f"sampler: user(s) {empty} have no training examples")


def _draw(pool_sizes: dict[int, int], users: Sequence[int], count: int,
          rng: np.random.Generator) -> list[tuple[int, int]]:
    """``count`` (user, example index) draws: users in turn from a random start (an even
    split), examples uniformly from each user's pool."""
    if count == 0:
        return []
    start = int(rng.integers(len(users)))
    picked = [users[(start + i) % len(users)] for i in range(count)]
    return [(u, int(rng.integers(pool_sizes[u]))) for u in picked]


@dataclass
class AdaptiveSampler:
    pool_sizes: dict[int, int]              # user id -> number of training examples
    batch_size: int
    phase_steps: int                        # optimizer steps per phase (one user in B)
    ratio: tuple[float, float, float] = (1.0, 2.0, 4.0)   # N_A : N_B : N_C
    order: tuple[int, ...] | None = None    # the order users enter B; None = sorted ids
    seed: int = 0

    def __post_init__(self):
        _check_pools(self.pool_sizes)
        if self.batch_size < 1 or self.phase_steps < 1:
            raise ValueError(f"AdaptiveSampler: batch_size={self.batch_size} and "
                             f"phase_steps={self.phase_steps} must be >= 1")
        if len(self.ratio) != 3 or min(self.ratio) < 0 or sum(self.ratio) <= 0:
            raise ValueError(f"AdaptiveSampler: ratio={self.ratio} must be 3 non-negative "
                             "numbers (N_A : N_B : N_C), not all zero")
        order = tuple(sorted(self.pool_sizes)) if self.order is None else tuple(self.order)
        if sorted(order) != sorted(self.pool_sizes):
            raise ValueError(f"AdaptiveSampler: order {list(order)} must list each user of "
                             f"pool_sizes {sorted(self.pool_sizes)} exactly once")
        self.order = order

    def groups(self, step: int) -> dict[str, list[int]]:
        """Users in A, B, C at optimizer step ``step`` (1-based)."""
        phase = (step - 1) // self.phase_steps
        if phase >= len(self.order):
            return {"A": [], "B": [], "C": list(self.order)}
        return {"A": list(self.order[phase + 1:]), "B": [self.order[phase]],
                "C": list(self.order[:phase])}

    def group_counts(self, step: int) -> dict[str, int]:
        """Examples per group in this step's batch: the ratio over the non-empty groups,
        rounded so that the running totals within a phase track the ratio (largest
        remainder on the cumulative targets), so small batches realize it too."""
        groups = self.groups(step)
        weights = np.array([self.ratio[i] if groups[g] else 0.0 for i, g in enumerate(GROUPS)])
        if weights.sum() == 0:  # e.g. ratio (1, 0, 0) once A is empty: fall back to all users
            weights = np.array([1.0 if groups[g] else 0.0 for g in GROUPS])
        share = weights / weights.sum()
        k = (step - 1) % self.phase_steps  # steps already taken in this phase
        before = _apportion(share, k * self.batch_size)
        after = _apportion(share, (k + 1) * self.batch_size)
        return {g: int(after[i] - before[i]) for i, g in enumerate(GROUPS)}

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The (user id, example index) pairs of step ``step``."""
        rng = _rng(self.seed, step)
        groups, counts = self.groups(step), self.group_counts(step)
        out: list[tuple[int, int]] = []
        for g in GROUPS:
            out += _draw(self.pool_sizes, groups[g], counts[g], rng)
        return out


def _apportion(share: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to ``total`` closest to share * total (largest remainder)."""
    exact = share * total
    base = np.floor(exact).astype(int)
    extra = total - base.sum()
    order = np.argsort(-(exact - base), kind="stable")
    base[order[:extra]] += 1
    return base


@dataclass
class UniformSampler:
    """Every example of every user equally likely (the vanilla VAE RM's batches)."""
    pool_sizes: dict[int, int]
    batch_size: int
    seed: int = 0

    def __post_init__(self):
        _check_pools(self.pool_sizes)
        self._users = np.array(sorted(self.pool_sizes))
        self._sizes = np.array([self.pool_sizes[u] for u in self._users])

    def batch(self, step: int) -> list[tuple[int, int]]:
        rng = _rng(self.seed, step)
        flat = rng.integers(self._sizes.sum(), size=self.batch_size)
        bounds = np.cumsum(self._sizes)
        which = np.searchsorted(bounds, flat, side="right")
        starts = bounds - self._sizes
        return [(int(self._users[w]), int(f - starts[w])) for w, f in zip(which, flat)]


@dataclass
class DemonstrationSampler:
    """N demonstrations per query from the user's pool (the first ``pool_size`` of the
    user's examples; the query itself is never its own demonstration)."""
    pool_sizes: dict[int, int]   # user id -> examples available as demonstrations
    n_demos: int = 8
    pool_size: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.n_demos < 1 or self.pool_size < self.n_demos:
            raise ValueError(f"DemonstrationSampler: need 1 <= n_demos ({self.n_demos}) <= "
                             f"pool_size ({self.pool_size})")
        short = {u: n for u, n in self.pool_sizes.items() if min(n, self.pool_size) < self.n_demos + 1}
        if short:
            raise ValueError(f"DemonstrationSampler: user(s) {short} have fewer than "
                             f"n_demos + 1 = {self.n_demos + 1} examples to draw "
                             "demonstrations from (the query is excluded)")

    def demos(self, user_id: int, query_index: int, epoch: int) -> list[int]:
        """Indices (into the user's examples) of the N demonstrations for one query."""
        if user_id not in self.pool_sizes:
            raise KeyError(f"DemonstrationSampler: unknown user id {user_id}; known: "
                           f"{sorted(self.pool_sizes)}")
        pool = min(self.pool_sizes[user_id], self.pool_size)
        rng = _rng(self.seed, epoch, user_id, query_index)
        picks = rng.choice(pool - 1, size=self.n_demos, replace=False)
        if query_index < pool:  # skip the query's own slot
            picks = np.where(picks >= query_index, picks + 1, picks)
        return picks.tolist()
