"""Quarantine: where rows that fail validation go, with the reason and where they came from.

No row is dropped silently: every record a row gives is counted either as valid or as
quarantined, and each quarantined one is an entry of a jsonl file with `reason`, `detail`,
`shard`, `line` (1-based line of a jsonl shard, row index of a parquet shard) and `raw`.
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

Counts. `rows_total` counts source rows as read (one per jsonl line, parquet row or
conversation; one per unreadable part of a shard); a source row may give several records
(HelpSteer pairs, PRISM turns) or several entries. `rows_valid` counts valid records,
`rows_quarantined` entries, and the fraction is that of entries among records + entries.

Bounded. Nothing a source holds makes the file grow without limit: an entry's `raw` is the
row as JSON, and when that text is longer than `MAX_RAW_CHARS`, `raw` holds its first
`MAX_RAW_CHARS` characters (a string) and `raw_chars` its full length; `detail` is cut at
`MAX_DETAIL_CHARS`. The file takes at most `max_entries` entries and `max_bytes` bytes,
checked entry by entry as they arrive; past either, entries are still counted (by reason,
and in `rows_quarantined`) but not written, and `entries_omitted` says how many.
"""
from __future__ import annotations

import json
import math
import numbers
from collections import Counter
from pathlib import Path

UNREADABLE_SHARD = "unreadable_shard"
MAX_RAW_CHARS = 64 * 1024
MAX_DETAIL_CHARS = 2000
MAX_ENTRIES = 100_000  # default file limits: enough to study what went wrong, small enough to open
MAX_BYTES = 256 * 2**20
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


def make_entry(*, reason, detail, shard, line, raw, raw_chars: int | None = None) -> dict:
    """A quarantine entry as strict-JSON data of bounded size (see the module notes): `raw`
    truncated to `MAX_RAW_CHARS` with `raw_chars` set, `detail` to `MAX_DETAIL_CHARS`.
    An entry made here passes through again unchanged."""
    entry = {"reason": str(reason), "detail": str(detail), "shard": str(shard), "line": _safe(line)}
    if len(entry["detail"]) > MAX_DETAIL_CHARS:
        entry["detail"] = entry["detail"][:MAX_DETAIL_CHARS] + f"... ({len(entry['detail'])} chars)"
    if raw_chars is not None:  # already truncated
        return {**entry, "raw": raw, "raw_chars": raw_chars}
    raw = _safe(raw)
    text = json.dumps(raw, ensure_ascii=False, allow_nan=False)
    if len(text) <= MAX_RAW_CHARS:
        return {**entry, "raw": raw}
    return {**entry, "raw": text[:MAX_RAW_CHARS], "raw_chars": len(text)}


def entry_line(entry: dict) -> str:
    """One jsonl line for a quarantine entry (from `make_entry`); never raises for any raw value."""
    safe = _safe(entry)
    line = json.dumps(safe, ensure_ascii=False, allow_nan=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: ASCII escapes keep them and read back exactly
        line = json.dumps(safe, allow_nan=False)
    return line


class Quarantine:
    """Counts source rows, valid records and quarantine entries, and appends the entries to a
    jsonl file of bounded size.

    `max_fraction` is the largest allowed share of entries (and of bad shards); `check()`
    raises `QuarantineExceeded` above it. `max_entries` / `max_bytes` bound the file.
    """

    def __init__(self, path: str | Path, *, max_fraction: float = 0.05,
                 max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_quarantine_fraction must be in [0, 1], got {max_fraction}")
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"max_entries and max_bytes must be >= 0, got {max_entries}, {max_bytes}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")  # one file per run: a rerun must not mix in old rows
        self.max_fraction = max_fraction
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.rows_read = 0
        self.rows_valid = 0
        self.entries_written = 0
        self.bytes_written = 0
        self._full = False  # the file reached a limit: it keeps a prefix of the entries
        self.by_reason: Counter[str] = Counter()
        self.shards: set[str] = set()
        self.bad_shards: dict[str, str] = {}
        self._finished_shards: set[str] = set()

    def count_rows(self, n: int = 1) -> None:
        """Count `n` source rows read (see the module notes on counts)."""
        self.rows_read += n

    def add(self, *, reason: str, detail: str, shard: str, line: int, raw) -> None:
        """Quarantine one row (or, with reason UNREADABLE_SHARD, the unreadable part of a shard)."""
        self.add_many([dict(reason=reason, detail=detail, shard=shard, line=line, raw=raw)])

    def add_many(self, entries: list[dict]) -> None:
        """Quarantine several rows (entries as in `add`, or from `make_entry`) with one file
        write; each is counted, and written while the file is within its limits."""
        lines = []
        for entry in entries:
            self.by_reason[entry["reason"]] += 1
            self.note_shard(entry["shard"])
            if entry["reason"] == UNREADABLE_SHARD:
                self.bad_shards[str(entry["shard"])] = str(entry["detail"])
            self._full = self._full or self.entries_written >= self.max_entries
            if self._full:
                continue  # counted, not written (nor serialized)
            line = entry_line(make_entry(**entry)) + "\n"
            size = len(line.encode("utf-8", errors="backslashreplace"))
            if self.bytes_written + size > self.max_bytes:
                self._full = True
                continue
            lines.append(line)
            self.entries_written += 1
            self.bytes_written += size
        if lines:
            with self.path.open("a", encoding="utf-8") as out:
                out.writelines(lines)

    def note_shard(self, shard: str) -> None:
        """Count `shard` among the shards read (for the bad-shard fraction)."""
        self.shards.add(str(shard))

    def count_valid(self, n: int = 1) -> None:
        self.rows_valid += n

    def finish_shard(self, shard: str, rows_valid: int, entries: list[dict],
                     omitted: dict[str, int] | None = None) -> None:
        """Record one whole shard of one-record-per-row data; idempotent per shard.

        `entries` are its quarantined rows, `omitted` counts by reason the ones the reader
        did not keep (it keeps at most as many as the file takes). Ray Data may execute a
        dataset more than once (a retry, or a second pass over a lazy dataset); the outcome
        of a shard is deterministic, so a repeat is ignored instead of double counting.
        """
        if shard in self._finished_shards:
            return
        self._finished_shards.add(shard)
        omitted = dict(omitted or {})
        self.note_shard(shard)
        self.count_rows(rows_valid + len(entries) + sum(omitted.values()))
        self.count_valid(rows_valid)
        self.add_many(entries)
        self.by_reason.update(omitted)

    def summary(self) -> dict:
        """`{"rows_total", "rows_valid", "rows_quarantined", "entries_omitted", "by_reason",
        "shards_total", "bad_shards" ({shard: detail}), "path"}` (counts: see the module notes)."""
        quarantined = sum(self.by_reason.values())
        return {
            "rows_total": self.rows_read,
            "rows_valid": self.rows_valid,
            "rows_quarantined": quarantined,
            "entries_omitted": quarantined - self.entries_written,
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
    entries than `max_fraction` of all records + entries, or more bad shards than
    `max_fraction` of all shards; else return it."""
    total = summary["rows_valid"] + summary["rows_quarantined"]
    fraction = summary["rows_quarantined"] / total if total else 0.0
    bad, shards = summary.get("bad_shards", {}), summary.get("shards_total", 0)
    bad_fraction = len(bad) / shards if shards else 0.0
    if fraction > max_fraction:
        raise QuarantineExceeded(
            f"{summary['rows_quarantined']} of {total} rows quarantined "
            f"(fraction {fraction:.3f} > max_quarantine_fraction {max_fraction}) "
            f"from {summary['rows_total']} source rows; reasons {summary['by_reason']}; "
            f"bad shards {sorted(bad)}; see {summary['path']}"
        )
    if bad_fraction > max_fraction:
        raise QuarantineExceeded(
            f"{len(bad)} of {shards} shards unreadable (fraction {bad_fraction:.3f} > "
            f"max_quarantine_fraction {max_fraction}): "
            + "; ".join(f"{name}: {detail}" for name, detail in bad.items())
            + f"; see {summary['path']}"
        )
    return summary
