"""Quarantine: where rows that fail validation go, with the reason and where they came from.

No row is dropped silently: every row read is counted either as valid or as quarantined,
and each quarantined row is appended to a jsonl file with `reason`, `detail`, `shard`,
`line` (1-based line of a jsonl shard, row index of a parquet shard) and `raw`.
The same class runs in-process (loaders) or as a Ray actor (the Ray Data pipeline).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


class QuarantineExceeded(RuntimeError):
    """More rows were quarantined than the configured fraction allows."""


def _jsonable(raw):
    """Raw rows may hold bytes or numpy values; keep them readable rather than fail."""
    if isinstance(raw, bytes):
        return raw.decode("utf-8", errors="replace")
    return raw


class Quarantine:
    """Counts valid / quarantined rows and appends quarantined ones to a jsonl file.

    `max_fraction` is the largest allowed share of quarantined rows; `check()` raises
    `QuarantineExceeded` above it.
    """

    def __init__(self, path: str | Path, *, max_fraction: float = 0.05):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_quarantine_fraction must be in [0, 1], got {max_fraction}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")  # one file per run: a rerun must not mix in old rows
        self.max_fraction = max_fraction
        self.rows_valid = 0
        self.by_reason: Counter[str] = Counter()
        self._finished_shards: set[str] = set()

    def add(self, *, reason: str, detail: str, shard: str, line: int, raw) -> None:
        """Quarantine one row."""
        self.add_many([dict(reason=reason, detail=detail, shard=shard, line=line, raw=raw)])

    def add_many(self, entries: list[dict]) -> None:
        """Quarantine several rows with one file write (entries as in `add`)."""
        if not entries:
            return
        with self.path.open("a", encoding="utf-8") as out:
            for entry in entries:
                entry = {**entry, "raw": _jsonable(entry["raw"])}
                out.write(json.dumps(entry, default=repr, ensure_ascii=False) + "\n")
                self.by_reason[entry["reason"]] += 1

    def count_valid(self, n: int = 1) -> None:
        self.rows_valid += n

    def finish_shard(self, shard: str, rows_valid: int, entries: list[dict]) -> None:
        """Record one whole shard's outcome; idempotent per shard.

        Ray Data may execute a dataset more than once (a retry, or a second pass over a
        lazy dataset); the outcome of a shard is deterministic, so a repeat is ignored
        instead of double counting.
        """
        if shard in self._finished_shards:
            return
        self._finished_shards.add(shard)
        self.count_valid(rows_valid)
        self.add_many(entries)

    def summary(self) -> dict:
        """`{"rows_total", "rows_valid", "rows_quarantined", "by_reason", "path"}`."""
        quarantined = sum(self.by_reason.values())
        return {
            "rows_total": self.rows_valid + quarantined,
            "rows_valid": self.rows_valid,
            "rows_quarantined": quarantined,
            "by_reason": dict(sorted(self.by_reason.items())),
            "path": str(self.path),
        }

    def check(self) -> dict:
        """Return the summary, or raise `QuarantineExceeded` if too many rows were bad."""
        return check_fraction(self.summary(), self.max_fraction)


def check_fraction(summary: dict, max_fraction: float) -> dict:
    """Raise `QuarantineExceeded` if `summary` (as from `Quarantine.summary`) holds more
    quarantined rows than `max_fraction` of all rows; else return it."""
    total = summary["rows_total"]
    fraction = summary["rows_quarantined"] / total if total else 0.0
    if fraction > max_fraction:
        raise QuarantineExceeded(
            f"{summary['rows_quarantined']} of {total} rows quarantined "
            f"(fraction {fraction:.3f} > max_quarantine_fraction {max_fraction}); "
            f"reasons {summary['by_reason']}; see {summary['path']}"
        )
    return summary
