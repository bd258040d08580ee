"""Simulated preference data sets: one per user population, written as shards.

A population's records go to ``<out>/<population>/shard-00000.parquet`` (+ ``.jsonl`` with
the same rows, `PreferenceRecord.to_row` schema); held-out pairs on test prompts go to the
sibling ``<out>/<population>_test/`` (a sibling, not a sub-folder, because readers of a
folder recurse into sub-folders).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypref.data import users as populations
from raypref.data.records import ROW_COLUMNS, PreferenceRecord, validate_row
from raypref.data.users import User
from raypref.data.world import World

POPULATIONS = ("ultrafeedback_random", "ultrafeedback_cluster", "two_user_conflict",
               "length_conflict", "psoups")


def population_users(name: str, seed: int = 0, n_annotators: int = 10) -> list[User]:
    """The users of population ``name`` (P-Soups preferences become users 1..6)."""
    if name == "ultrafeedback_random":
        return populations.ultrafeedback_random(seed)
    if name == "ultrafeedback_cluster":
        return populations.ultrafeedback_cluster(seed)
    if name == "two_user_conflict":
        return populations.two_user_conflict()
    if name == "length_conflict":
        return populations.length_conflict(n_annotators, seed)
    if name == "psoups":
        return [p.as_user(i + 1) for i, p in enumerate(populations.psoups_profiles())]
    raise ValueError(f"unknown population {name!r}; known: {POPULATIONS}")


def simulate_population(world: World, name: str, users: list[User], pairs_per_user: int,
                        rng: np.random.Generator, split: str = "train") -> list[PreferenceRecord]:
    """``pairs_per_user`` records for every user of population ``name``.

    two_user_conflict keeps only pairs the two users order oppositely (001 §3.5.1);
    psoups uses `World.pairs_for_preference` (chosen clearly better on one dimension).
    """
    records: list[PreferenceRecord] = []
    for user in users:
        if name == "psoups":
            records += world.pairs_for_preference(user.group, pairs_per_user, rng, split)
        elif name == "two_user_conflict":
            other = next(u for u in users if u.user_id != user.user_id)
            records += world.pairs_for_user(user, pairs_per_user, rng,
                                            require_conflict_with=other, split=split)
        else:
            records += world.pairs_for_user(user, pairs_per_user, rng, split=split)
    return records


def write_shards(records: list[PreferenceRecord], out_dir: str | Path,
                 shard_size: int) -> list[Path]:
    """Write records as ``shard-NNNNN.parquet`` and ``shard-NNNNN.jsonl``; returns the
    parquet paths. Old shards in ``out_dir`` are removed so a rerun never mixes data."""
    if shard_size < 1:
        raise ValueError(f"write_shards: shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("shard-*.parquet")) + list(out_dir.glob("shard-*.jsonl")):
        old.unlink()
    paths = []
    for index, start in enumerate(range(0, len(records), shard_size)):
        rows = [r.to_row() for r in records[start:start + shard_size]]
        stem = out_dir / f"shard-{index:05d}"
        table = pa.Table.from_pylist(rows).select(list(ROW_COLUMNS))
        pq.write_table(table, stem.with_suffix(".parquet"))
        with open(stem.with_suffix(".jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        paths.append(stem.with_suffix(".parquet"))
    return paths


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
