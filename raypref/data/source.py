"""Your own preference data as a job's data section (``--data.source path --data.format trl``).

A job that trains on preference pairs takes a `PreferenceSource`: a file, folder of shards,
``save_to_disk`` folder or hub name, read by one loader schema of `loaders.SCHEMAS` (TRL's
standard / conversational rows by default; PRISM or binarized UltraFeedback too). It is read
once in the driver by `loaders.load_validated`, so wrong columns end in one `WrongColumns`
before anything starts, and bad rows go to the job's quarantine file with their reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypref.data.loaders import SCHEMAS, UserIdMap, load_validated
from raypref.data.records import PreferenceRecord

USER_IDS_FILE = "user_ids.json"  # the source's user keys -> ids, beside the job's copy of its rows
QUARANTINE_FILE = "quarantine_source.jsonl"  # the source's bad rows, in the run's folder


@dataclass
class PreferenceSource:
    """Preference pairs from your own data instead of the job's default (see README "Your own data")."""

    # "" = the job's own data; else a .jsonl / .jsonl.gz / .parquet file or folder of them, a
    # datasets save_to_disk folder, or a hub dataset name owner/name (needs the hub and a split)
    source: str = ""
    # the loader schema of its rows: trl (prompt/chosen/rejected, text or message lists), prism,
    # ultrafeedback_binarized, ... (raypref.data.loaders.SCHEMAS)
    format: str = "trl"
    split: str = ""  # split of a hub dataset or of a saved DatasetDict ("" = its only split)
    user_column: str = ""  # trl: the column naming each row's user; its values map to ids 1, 2, ...
    survey: str = ""  # prism: the survey.jsonl whose profiles become each user's text
    test_fraction: float = 0.1  # of the valid pairs, held out for evaluation (seeded shuffle)

    def validate(self, where: str) -> None:
        if not self.source:
            return
        if self.format not in SCHEMAS:
            raise ValueError(f"{where}.format={self.format!r}: one of {sorted(SCHEMAS)}")
        if self.user_column and self.format != "trl":
            raise ValueError(f"{where}.user_column={self.user_column!r}: only the trl format has a user column")
        if self.survey and self.format != "prism":
            raise ValueError(f"{where}.survey={self.survey!r}: only the prism format has a survey")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"{where}.test_fraction={self.test_fraction}: must be in [0, 1)")

    @property
    def has_users(self) -> bool:
        """Whether its rows name users (else every pair belongs to the unknown user 0)."""
        return SCHEMAS[self.format].uses_user_map and (self.format != "trl" or bool(self.user_column))

    def loader_options(self) -> dict:
        options = {}
        if self.user_column:
            options["user_column"] = self.user_column
        if self.survey:
            options["survey_path"] = self.survey
        return options


def load_source(src: PreferenceSource, *, quarantine_path: str | Path, max_quarantine_fraction: float,
                max_chars: int, user_ids_path: str | Path | None = None) -> tuple[list[PreferenceRecord], dict]:
    """Every valid pair of `src` and the quarantine summary (`loaders.load_validated`); user
    keys map to ids through `user_ids_path` (kept, so a rerun gives the same ids)."""
    return load_validated(src.source, schema=src.format, split=src.split or None,
                          quarantine_path=quarantine_path, max_quarantine_fraction=max_quarantine_fraction,
                          max_chars=max_chars,
                          user_map_path=user_ids_path if src.has_users else None,
                          **src.loader_options())


@dataclass
class SourcePairs:
    """A source read for one run: its pairs split, the quarantine summary, who its users are."""
    train: list[PreferenceRecord]
    test: list[PreferenceRecord]
    quarantine: dict
    users: dict[int, str]  # user id -> the source's user key ({} for a source without users)


def read_source(src: PreferenceSource, out: Path, *, seed: int, max_quarantine_fraction: float = 0.05,
                max_chars: int = 20000, log=print) -> SourcePairs:
    """`src` read for the run in folder `out`: bad rows to `out/quarantine_source.jsonl`, user
    ids kept in `out/data/user_ids.json`, the valid pairs split by `split_pairs`."""
    user_ids = out / "data" / USER_IDS_FILE
    log(f"reading {src.source} as {src.format}" + (f" (split {src.split})" if src.split else ""))
    records, summary = load_source(src, quarantine_path=out / QUARANTINE_FILE,
                                   max_quarantine_fraction=max_quarantine_fraction, max_chars=max_chars,
                                   user_ids_path=user_ids)
    log(f"source: {summary['rows_valid']}/{summary['rows_total']} rows valid, {summary['rows_quarantined']} "
        f"quarantined {summary['by_reason']} -> {summary['path']}")
    train, test = split_pairs(records, src.test_fraction, seed)
    users = {uid: key for key, uid in UserIdMap.load(user_ids).ids.items()} if src.has_users else {}
    return SourcePairs(train, test, summary, users)


def split_pairs(records: list[PreferenceRecord], test_fraction: float,
                seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, test): a seeded shuffle, the first round(n * test_fraction) held out."""
    order = np.random.default_rng(seed).permutation(len(records))
    n_test = int(round(len(records) * test_fraction))
    shuffled = [records[i] for i in order]
    return shuffled[n_test:], shuffled[:n_test]


def write_pairs(records: list[PreferenceRecord], path: Path) -> Path:
    """The pairs as one parquet shard of `to_row` rows (what the Ray Data pipeline reads)."""
    table = pa.Table.from_pylist([r.to_row() for r in records], schema=ROW_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


ROW_SCHEMA = pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
                        ("user_id", pa.int64()), ("user_text", pa.string()), ("chosen_scores", pa.string()),
                        ("rejected_scores", pa.string()), ("source", pa.string()), ("context", pa.string())])
