"""Simulated preference data sets: one per user population, written as shards.

A population's records go to ``<out>/<population>/shard-00000.parquet`` (+ ``.jsonl`` with
the same rows, `PreferenceRecord.to_row` schema); held-out pairs on test prompts go to the
sibling ``<out>/<population>_test/`` (a sibling, not a sub-folder, because readers of a
folder recurse into sub-folders).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypref import atomic
from raypref.data import users as populations
from raypref.data.records import ROW_COLUMNS, PreferenceRecord, validate_row
from raypref.data.users import User
from raypref.data.world import World

Draw = Callable[[World, User, list[User], int, np.random.Generator, str], list[PreferenceRecord]]


def _pairs_for_user(world: World, user: User, users: list[User], n: int, rng: np.random.Generator,
                    split: str) -> list[PreferenceRecord]:
    return world.pairs_for_user(user, n, rng, split=split)


def _conflicting_pairs(world: World, user: User, users: list[User], n: int, rng: np.random.Generator,
                       split: str) -> list[PreferenceRecord]:
    # only pairs the two users order oppositely (Liu 2025 §3.5.1)
    other = next(u for u in users if u.user_id != user.user_id)
    return world.pairs_for_user(user, n, rng, require_conflict_with=other, split=split)


def _preference_pairs(world: World, user: User, users: list[User], n: int, rng: np.random.Generator,
                      split: str) -> list[PreferenceRecord]:
    # chosen clearly better on the preference's one dimension (P-Soups)
    return world.pairs_for_preference(user.group, n, rng, split)


@dataclass(frozen=True)
class Population:
    """A simulated population: its users `(seed, n_annotators) -> users`, and how each
    user's pairs are drawn."""
    users: Callable[[int, int], list[User]]
    draw: Draw = _pairs_for_user


POPULATION_REGISTRY: dict[str, Population] = {
    "ultrafeedback_random": Population(lambda seed, n: populations.ultrafeedback_random(seed)),
    "ultrafeedback_cluster": Population(lambda seed, n: populations.ultrafeedback_cluster(seed)),
    "two_user_conflict": Population(lambda seed, n: populations.two_user_conflict(), _conflicting_pairs),
    "length_conflict": Population(lambda seed, n: populations.length_conflict(n, seed)),
    "psoups": Population(lambda seed, n: populations.psoups_users(), _preference_pairs),
}
POPULATIONS = tuple(POPULATION_REGISTRY)  # the names, in registry order (jobs seed their rngs by it)


def get_population(name: str) -> Population:
    """The registered population `name`; a ValueError lists the known ones."""
    if name not in POPULATION_REGISTRY:
        raise ValueError(f"unknown population {name!r}; known: {list(POPULATIONS)}")
    return POPULATION_REGISTRY[name]


def population_users(name: str, seed: int = 0, n_annotators: int = 10) -> list[User]:
    """The users of population ``name`` (P-Soups preferences become users 1..6)."""
    return get_population(name).users(seed, n_annotators)


def simulate_population(world: World, name: str, users: list[User], pairs_per_user: int,
                        rng: np.random.Generator, split: str = "train") -> list[PreferenceRecord]:
    """``pairs_per_user`` records for every user of population ``name``, drawn its way."""
    draw = get_population(name).draw
    records: list[PreferenceRecord] = []
    for user in users:
        records += draw(world, user, users, pairs_per_user, rng, split)
    return records


def write_shards(records: list[PreferenceRecord], out_dir: str | Path,
                 shard_size: int) -> list[Path]:
    """Write records as ``shard-NNNNN.parquet`` and ``shard-NNNNN.jsonl``; returns the
    parquet paths. The new shard set replaces the old one in one folder swap (other files in
    ``out_dir`` are carried over), so a rerun never mixes data and a crash leaves the old set."""
    if shard_size < 1:
        raise ValueError(f"write_shards: shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)

    def write(tmp: Path) -> None:
        if out_dir.is_dir():
            for old in out_dir.iterdir():
                if not old.name.startswith("shard-"):
                    (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
        for index, start in enumerate(range(0, len(records), shard_size)):
            rows = [r.to_row() for r in records[start:start + shard_size]]
            stem = tmp / f"shard-{index:05d}"
            table = pa.Table.from_pylist(rows).select(list(ROW_COLUMNS))
            pq.write_table(table, stem.with_suffix(".parquet"))
            with open(stem.with_suffix(".jsonl"), "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)

    atomic.replace_dir(out_dir, write)
    return sorted(out_dir.glob("shard-*.parquet"))


def read_shards(out_dir: str | Path, fmt: str = "parquet") -> list[PreferenceRecord]:
    """Read back every shard of ``fmt`` ("parquet" or "jsonl") in ``out_dir``, validated."""
    if fmt not in ("parquet", "jsonl"):
        raise ValueError(f"read_shards: fmt must be 'parquet' or 'jsonl', got {fmt!r}")
    records = []
    for path in sorted(Path(out_dir).glob(f"shard-*.{fmt}")):
        if fmt == "parquet":
            rows: Iterable[dict] = pq.read_table(path).to_pylist()
        else:
            rows = (json.loads(line) for line in path.read_text().splitlines() if line)
        records += [validate_row(row) for row in rows]
    return records


def user_counts(records: Iterable[PreferenceRecord]) -> dict[int, int]:
    """Pairs per user id, sorted by id."""
    counts = Counter(r.user_id for r in records)
    return {uid: counts[uid] for uid in sorted(counts)}
