"""Quarantine: where rows that fail validation go, with the reason and where they came from.

No row is dropped silently: every row read is counted either as valid or as quarantined,
and each quarantined row is appended to a jsonl file with `reason`, `detail`, `shard`,
`line` (1-based line of a jsonl shard, row index of a parquet shard) and `raw`.
The same class runs in-process (loaders) or as a Ray actor (the Ray Data pipeline).

Whatever a bad row holds (lone surrogates, ints past Python's 4300-digit limit, bytes,
NaN, non-str keys, numpy values, deep nesting), its entry is written: `raw` is stored as
the nearest strict-JSON value (see `_safe`), and a line that cannot be UTF-8 falls back
to ASCII escapes, which read back exactly.

Unreadable shards. A shard that cannot be opened or decoded (a truncated parquet or
gzip, binary data, an I/O error), at its start or part-way, gets one entry with reason
`UNREADABLE_SHARD` for the part that could not be read; its rows before that point are
counted as usual. That entry is one quarantined unit in the row counts (its row count is
unknown), so `rows_total == rows_valid + rows_quarantined` holds, and the shard is named
in `summary()["bad_shards"]`. Because one unit understates a lost shard, the limit is
checked twice: the share of quarantined units among all units, and the share of bad
shards among all shards seen; either above `max_fraction` raises `QuarantineExceeded`.
"""
from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from pathlib import Path

UNREADABLE_SHARD = "unreadable_shard"
_MAX_DEPTH = 32  # deeper raw values are summarized: repr() and json.dumps would recurse past Python's limit


class QuarantineExceeded(RuntimeError):
    """More rows (or shards) were quarantined than the configured fraction allows."""


def _safe(value, depth: int = 0):
    """`value` as strict-JSON data: containers and strings kept, what JSON cannot hold
    (bytes, huge ints, NaN, non-str keys, objects) replaced by a readable string."""
    if value is None or isinstance(value, (bool, str)):
        return value  # strings with lone surrogates are handled when the line is written
    if isinstance(value, numbers.Integral):
        value = int(value)
        if -2**63 <= value < 2**63:  # what JSON readers outside Python hold exactly
            return value
        return str(value) if value.bit_length() <= 4000 else f"<int of {value.bit_length()} bits>"
    if isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:
            return "<number too large for a float>"
        return number if math.isfinite(number) else str(number)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="backslashreplace")
    if depth >= _MAX_DEPTH and isinstance(value, (dict, list, tuple, set)):
        return f"<{type(value).__name__} nested deeper than {_MAX_DEPTH} levels>"
    if isinstance(value, dict):
        return {_safe_key(k): _safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_safe(v, depth + 1) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        try:
            return _safe(value.tolist(), depth + 1)
        except Exception:
            pass
    try:
        return f"<{type(value).__name__}: {repr(value)[:1000]}>"
    except Exception:
        return f"<{type(value).__name__}>"


def _safe_key(key) -> str:
    key = _safe(key)
    return key if isinstance(key, str) else json.dumps(key)


def entry_line(entry: dict) -> str:
    """One jsonl line for a quarantine entry; never raises for any raw value."""
    safe = _safe(entry)
    line = json.dumps(safe, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: ASCII escapes keep them and read back exactly
        line = json.dumps(safe, allow_nan=False)
    return line


class Quarantine:
    """Counts valid / quarantined rows and appends quarantined ones to a jsonl file.

    `max_fraction` is the largest allowed share of quarantined rows (and of bad shards);
    `check()` raises `QuarantineExceeded` above it.
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
        self.shards: set[str] = set()
        self.bad_shards: dict[str, str] = {}
        self._finished_shards: set[str] = set()

    def add(self, *, reason: str, detail: str, shard: str, line: int, raw) -> None:
        """Quarantine one row (or, with reason UNREADABLE_SHARD, the unreadable part of a shard)."""
        self.add_many([dict(reason=reason, detail=detail, shard=shard, line=line, raw=raw)])

    def add_many(self, entries: list[dict]) -> None:
        """Quarantine several rows with one file write (entries as in `add`)."""
        if not entries:
            return
        lines = [entry_line(entry) for entry in entries]
        with self.path.open("a", encoding="utf-8") as out:
            out.writelines(line + "\n" for line in lines)
        for entry in entries:
            self.by_reason[entry["reason"]] += 1
            self.note_shard(entry["shard"])
            if entry["reason"] == UNREADABLE_SHARD:
                self.bad_shards[str(entry["shard"])] = str(entry["detail"])

    def note_shard(self, shard: str) -> None:
        """Count `shard` among the shards read (for the bad-shard fraction)."""
        self.shards.add(str(shard))

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
        self.note_shard(shard)
        self.count_valid(rows_valid)
        self.add_many(entries)

    def summary(self) -> dict:
        """`{"rows_total", "rows_valid", "rows_quarantined", "by_reason", "shards_total",
        "bad_shards" ({shard: detail}), "path"}`."""
        quarantined = sum(self.by_reason.values())
        return {
            "rows_total": self.rows_valid + quarantined,
            "rows_valid": self.rows_valid,
            "rows_quarantined": quarantined,
            "by_reason": dict(sorted(self.by_reason.items())),
            "shards_total": len(self.shards),
            "bad_shards": dict(sorted(self.bad_shards.items())),
            "path": str(self.path),
        }

    def check(self) -> dict:
        """Return the summary, or raise `QuarantineExceeded` if too many rows were bad."""
        return check_fraction(self.summary(), self.max_fraction)


def check_fraction(summary: dict, max_fraction: float) -> dict:
    """Raise `QuarantineExceeded` if `summary` (as from `Quarantine.summary`) holds more
    quarantined rows than `max_fraction` of all rows, or more bad shards than
    `max_fraction` of all shards; else return it."""
    total = summary["rows_total"]
    fraction = summary["rows_quarantined"] / total if total else 0.0
    bad, shards = summary.get("bad_shards", {}), summary.get("shards_total", 0)
    bad_fraction = len(bad) / shards if shards else 0.0
    if fraction > max_fraction:
        raise QuarantineExceeded(
            f"{summary['rows_quarantined']} of {total} rows quarantined "
            f"(fraction {fraction:.3f} > max_quarantine_fraction {max_fraction}); "
            f"reasons {summary['by_reason']}; bad shards {sorted(bad)}; see {summary['path']}"
        )
    if bad_fraction > max_fraction:
        raise QuarantineExceeded(
            f"{len(bad)} of {shards} shards unreadable (fraction {bad_fraction:.3f} > "
            f"max_quarantine_fraction {max_fraction}): "
            + "; ".join(f"{name}: {detail}" for name, detail in bad.items())
            + f"; see {summary['path']}"
        )
    return summary
