"""Loaders that map public preference datasets onto `PreferenceRecord`.

Each schema is a `Schema` entry of the `SCHEMAS` registry: a factory
`mapper(**options) -> map_row`, where `map_row(row)` yields a `PreferenceRecord` or an
`InvalidRecord` per comparison it finds in one source row, and what loading it needs
(a user-id map, the hub config name, the columns it needs). `load_records` reads the rows
(local jsonl, jsonl.gz, json or parquet file or folder, a `datasets` save_to_disk folder, or a
hub name through `datasets.load_dataset`), checks each file's columns first (`WrongColumns`:
one error naming the file, the columns found and expected), maps the rows, validates every
record, and sends whatever cannot be mapped to the quarantine: nothing is dropped silently.
Schema `trl` reads TRL's preference formats (your own data); `load_sft_examples` reads
prompt / response (or messages) rows for SFT the same way. `load_validated` does the same into a fresh quarantine file
and applies its limit, for callers outside Ray Data.

Files are read by `read_shard`, which never raises for a file's content: a file that
cannot be read (at all, or from some point on) ends with one `UNREADABLE_SHARD` error
for the unread part, so it is quarantined by name instead of stopping the pass.
"""
from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow.parquet as pq

from raypref import atomic
from raypref.data.quarantine import UNREADABLE_SHARD, Quarantine
from raypref.data.records import (ROLES, UNKNOWN_USER, InvalidRecord, PreferenceRecord, check_context,
                                  check_text, is_blank, render_context, validate_row)

MapRow = Callable[[dict], Iterable["PreferenceRecord | InvalidRecord"]]


# ---------------------------------------------------------------- reading rows

Row = tuple[int, "dict | InvalidRecord", object]  # (line or row index, row or error, raw)

# The longest jsonl line read as a row (bytes, without its newline). A preference row holds
# three texts of at most max_chars (20,000 by default) and a few scores; a PRISM conversation
# a few dozen messages. Longer lines are quarantined without being held in memory.
MAX_LINE_BYTES = 4 * 2**20
_TAIL_CHUNK = 2**20  # how much of an over-long line's rest is read at a time to skip it


def _lines(stream, limit: int) -> Iterator[tuple[int, bytes, int | None]]:
    """`(number, line, None)` per line, or `(number, head, length)` for a line longer than
    `limit` bytes: its first `limit` bytes and its full length; the rest is read in chunks
    and dropped, so no line is ever held whole."""
    number = 0
    while raw := stream.readline(limit + 1):
        number += 1
        if raw.endswith(b"\n") or len(raw) <= limit:
            yield number, raw, None
            continue
        length = len(raw)
        while (rest := stream.readline(_TAIL_CHUNK)) and not rest.endswith(b"\n"):
            length += len(rest)
        length += len(rest.rstrip(b"\n"))
        yield number, raw[:limit], length


def iter_jsonl_rows(stream, max_line_bytes: int | None = None) -> Iterator[Row]:
    """Yield `(line_number, row_or_error, raw_text)` for a binary jsonl stream.

    Line numbers are 1-based; blank lines are not rows. A line that is not UTF-8 or not
    a JSON object comes back as an `InvalidRecord("undecodable_line", ...)`, one longer than
    `max_line_bytes` (default MAX_LINE_BYTES) as `InvalidRecord("line_too_long", ...)` with
    its start as raw text. A NUL byte raises `ValueError`: JSON text never holds one raw, so
    the file is binary (or UTF-16), and going on would quarantine its bytes line by line as
    if they were rows.
    """
    limit = MAX_LINE_BYTES if max_line_bytes is None else max_line_bytes
    if not isinstance(stream, (io.BufferedReader, gzip.GzipFile)):
        stream = io.BufferedReader(stream)  # pyarrow input streams cannot readline()
    for number, raw, length in _lines(stream, limit):
        if length is not None:
            head = raw.decode("utf-8", errors="replace")
            yield number, InvalidRecord("line_too_long", f"line {number} has {length} bytes > "
                                        f"max_line_bytes={limit}"), head
            continue
        if not raw.strip():
            continue
        if b"\x00" in raw:
            raise ValueError(f"line {number} holds a NUL byte: binary data, not JSON lines")
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            text = raw.decode("utf-8", errors="replace").rstrip("\n")
            yield number, InvalidRecord("undecodable_line", f"line {number}: {type(err).__name__}: {err}"), text
            continue
        if not isinstance(row, dict):
            yield number, InvalidRecord("undecodable_line", f"line {number}: JSON {type(row).__name__}, not an object"), row
            continue
        yield number, row, row


def iter_parquet_rows(source, batch_size: int = 1024) -> Iterator[Row]:
    """Yield `(row_index, row, row)` of a parquet file (path or stream), batch by batch."""
    index = 0
    for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            yield index, row, row
            index += 1


def iter_json_list_rows(stream) -> Iterator[Row]:
    """Yield `(index, row, row)` of a JSON file holding one list of objects (P-Soups)."""
    rows = json.load(stream)
    if not isinstance(rows, list):
        raise ValueError(f"expected a JSON list of rows, got {type(rows).__name__}")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            row = InvalidRecord("wrong_type", f"row {index} is a {type(row).__name__}, not an object")
        yield index, row, row


def _iter_gzip_jsonl_rows(stream) -> Iterator[Row]:
    yield from iter_jsonl_rows(gzip.GzipFile(fileobj=stream))


# shard suffix -> (rows of a binary stream, number of its first row); longest suffix first
SHARD_READERS: dict[str, tuple[Callable[..., Iterator[Row]], int]] = {
    ".jsonl.gz": (_iter_gzip_jsonl_rows, 1),
    ".parquet": (iter_parquet_rows, 0),
    ".jsonl": (iter_jsonl_rows, 1),
    ".json": (iter_json_list_rows, 0),
}


def shard_suffix(name: str) -> str | None:
    """The `SHARD_READERS` suffix that `name` ends with, or None."""
    return next((suffix for suffix in SHARD_READERS if name.endswith(suffix)), None)


def read_shard(shard: str, open_binary: Callable[[], BinaryIO]) -> Iterator[Row]:
    """Rows of one shard, read by its suffix from the stream `open_binary()` returns; the
    content never makes it raise (see `guard_rows`)."""
    suffix = shard_suffix(shard)
    if suffix is None:
        raise ValueError(f"{shard}: unsupported file type (use one of {sorted(SHARD_READERS)})")
    reader, first = SHARD_READERS[suffix]

    def rows():
        with open_binary() as stream:  # opened lazily, so a failing open is guarded too
            yield from reader(stream)
    return guard_rows(shard, rows(), first)


def guard_rows(shard: str, rows: Iterator[Row], first: int) -> Iterator[Row]:
    """Pass `rows` through; if reading them raises (a truncated parquet or gzip, binary
    data, an I/O error, at the start or part-way), end with one
    `InvalidRecord(UNREADABLE_SHARD, ...)` naming the shard, the cause and the first line
    (jsonl, 1-based) or row (0-based; `first` says which) that was not read."""
    unread = first
    try:
        for item in rows:
            unread = item[0] + 1
            yield item
    except Exception as err:  # whatever the reader raises, it is about this shard
        where = "line" if first == 1 else "row"
        detail = f"unreadable from {where} {unread} on: {type(err).__name__}: {err}"
        yield unread, InvalidRecord(UNREADABLE_SHARD, detail), None


def _shard_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted(p for p in path.rglob("*") if shard_suffix(p.name) and not p.is_dir())
    if not files:
        raise FileNotFoundError(f"no {'/'.join(SHARD_READERS)} files under {path} "
                                "(nor a folder written by datasets' save_to_disk)")
    return files


# ---------------------------------------------------------------- columns

class WrongColumns(ValueError):
    """A file (or dataset) whose columns do not fit its schema: one error for the whole
    source, before any row is read, instead of every row quarantined."""


# how many jsonl rows are read to learn a file's columns (rows may leave out optional keys)
COLUMN_SAMPLE_ROWS = 100


def file_columns(file: Path) -> tuple[list[str] | None, dict | None]:
    """The columns of one shard and its first row; (None, None) where they cannot be known
    up front (a .json list, a file with no readable row: its rows are quarantined instead)."""
    suffix = shard_suffix(file.name)
    if suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(file)
            first = next(parquet.iter_batches(batch_size=1), None)
        except Exception:  # unreadable: read_shard quarantines it by name
            return None, None
        return parquet.schema_arrow.names, (first.to_pylist()[0] if first is not None and first.num_rows else None)
    if suffix not in (".jsonl", ".jsonl.gz"):
        return None, None
    columns: dict[str, None] = {}  # ordered union of the keys
    sample, seen = None, 0
    for _, row, _ in read_shard(str(file), lambda: file.open("rb")):
        if isinstance(row, dict):
            sample = row if sample is None else sample
            columns.update(dict.fromkeys(row))
            seen += 1
        if seen >= COLUMN_SAMPLE_ROWS:
            break
    return (list(columns), sample) if sample is not None else (None, None)


def check_columns(where: str, columns: list[str] | None, sample: dict | None, schema: "Schema",
                  options: dict) -> None:
    """Raise `WrongColumns` naming `where`, the columns found and those `schema` expects,
    if `columns` lacks one that `schema` needs (given its first row and options)."""
    if columns is None or schema.columns is None:
        return
    needed = [name for name in schema.columns(sample or {}, options) if name]
    missing = [name for name in needed if name not in columns]
    if missing:
        raise WrongColumns(f"{where}: wrong columns for schema {schema.name!r}: found {list(columns)}, "
                           f"missing {missing}; expected {schema.columns_hint or needed}")


# ---------------------------------------------------------------- sources

def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists())


def _load_saved_dataset(path: Path, split: str | None):
    """The rows of a save_to_disk folder; a DatasetDict needs `split` unless it has one split."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in loaded:
            raise ValueError(f"{path}: a saved DatasetDict with splits {splits}; pass one as split=..."
                             + (f" (not {split!r})" if split is not None else ""))
        return loaded[split], f"{path}:{split}"
    return loaded, str(path)


def _load_hub_dataset(source: str, config: str | None, split: str):
    """A hub dataset's split; offline, or if the hub cannot be reached, one error that says so."""
    how = ("it needs the Hugging Face hub; where the hub is unreachable, save the dataset with "
           "`datasets.load_dataset(...).save_to_disk(folder)` on a machine that reaches it and pass the folder")
    if _hub_offline():
        raise RuntimeError(f"{source!r} is no local file or folder, so it is read as a hub dataset, but "
                           f"HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: {how}")
    import datasets

    try:
        return datasets.load_dataset(source, name=config, split=split)
    except Exception as err:
        raise RuntimeError(f"hub dataset {source!r} (config {config!r}, split {split!r}) could not be "
                           f"loaded ({type(err).__name__}: {err}); {how}") from err


def _iter_source(source: str, *, config: str | None, split: str | None,
                 on_shard: Callable[[str], None] | None = None,
                 check: Callable[[str, list[str] | None, dict | None], None] | None = None):
    """Yield `(shard, line, row_or_error, raw)` from a local file / folder of shards, a
    save_to_disk folder or a hub dataset; `on_shard(name)` is called as each shard starts
    (so empty shards count too); `check(where, columns, first_row)` on every shard (or the
    dataset) before any row is yielded, so wrong columns stop the load before it starts."""
    on_shard = on_shard or (lambda name: None)
    check = check or (lambda where, columns, sample: None)
    path = Path(source)
    if _is_saved_dataset(path):
        rows, shard = _load_saved_dataset(path, split)
    elif path.exists() or path.is_symlink():
        files = _shard_files(path)
        for file in files:
            check(str(file), *file_columns(file))
        for file in files:
            on_shard(str(file))
            for line, row, raw in read_shard(str(file), lambda file=file: file.open("rb")):
                yield str(file), line, row, raw
        return
    else:
        if source.count("/") != 1 or source.startswith((".", "/")):
            raise FileNotFoundError(f"{source!r} is neither an existing path nor a hub dataset name 'owner/name'")
        if split is None:
            raise ValueError(f"hub dataset {source!r}: pass split=... (e.g. 'train')")
        shard = f"{source}:{config or 'default'}:{split}"
        rows = _load_hub_dataset(source, config, split)  # a missing dataset raises here
    check(shard, list(rows.column_names), rows[0] if len(rows) else None)
    on_shard(shard)
    for index, row, raw in guard_rows(shard, ((i, row, row) for i, row in enumerate(rows)), 0):
        yield shard, index, row, raw


# ---------------------------------------------------------------- user ids

class UserIdMap:
    """Stable map from a source's user key (worker id, PRISM user id, preference name) to
    the integer `user_id` of raypref; 0 stays UNKNOWN_USER, new keys get the next id.

    Persist it (`save` / `load`) so ids stay the same across runs and data splits.
    """

    def __init__(self, ids: dict[str, int] | None = None):
        self.ids: dict[str, int] = dict(ids or {})

    def __call__(self, key) -> int:
        key = str(key)
        if key not in self.ids:
            self.ids[key] = max(self.ids.values(), default=UNKNOWN_USER) + 1
        return self.ids[key]

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, json.dumps(self.ids, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str | Path) -> "UserIdMap":
        path = Path(path)
        return cls(json.loads(path.read_text())) if path.exists() else cls()


# ---------------------------------------------------------------- schemas

ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


def _ultrafeedback_ratings(completion: dict) -> dict[str, float]:
    """Numeric aspect ratings of one completion; "N/A" and missing aspects are left out."""
    ratings = {}
    for aspect, note in (completion.get("annotations") or {}).items():
        rating = note.get("Rating") if isinstance(note, dict) else None
        try:
            value = float(rating)
        except (TypeError, ValueError):  # "N/A" or absent
            continue
        if math.isfinite(value):
            ratings[aspect] = value
    return ratings


def ultrafeedback(*, weights: dict[str, float] | None = None, user_id: int = UNKNOWN_USER,
                  user_text: str | None = None) -> MapRow:
    """openbmb/UltraFeedback: one pair per instruction, chosen = argmax and rejected =
    argmin of `w·ratings` over the completions (weights default to equal on the four
    aspects). A completion missing a rating that has a non-zero weight cannot be scored
    and is left out of the pair choice; a tie between best and worst is quarantined.
    """
    weights = dict(weights or {aspect: 1.0 for aspect in ULTRAFEEDBACK_ASPECTS})
    needed = [aspect for aspect, w in weights.items() if w != 0]

    def map_row(row: dict):
        scored = []
        for completion in row.get("completions") or []:
            ratings = _ultrafeedback_ratings(completion)
            if all(aspect in ratings for aspect in needed) and isinstance(completion.get("response"), str):
                utility = sum(weights[a] * ratings[a] for a in needed)
                scored.append((utility, completion["response"], ratings))
        if len(scored) < 2:
            yield InvalidRecord("unmappable", f"{len(scored)} completion(s) rated on {needed}; need 2")
            return
        best = max(scored, key=lambda s: s[0])  # max/min keep the first of equals
        worst = min(scored, key=lambda s: s[0])
        if best[0] == worst[0]:
            yield InvalidRecord("tie", f"all rated completions have utility {best[0]}")
            return
        yield PreferenceRecord(
            prompt=row.get("instruction"), chosen=best[1], rejected=worst[1], user_id=user_id,
            user_text=user_text, chosen_scores=best[2], rejected_scores=worst[2],
            source=f"ultrafeedback:{row.get('source', '')}")
    return map_row


HELPSTEER_ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
HELPSTEER_QUALITY = {"helpfulness": 1.0, "correctness": 1.0, "coherence": 1.0}


def _pairable_text(row: dict, name: str) -> str:
    """`row[name]` if it is text that can be paired, else the InvalidRecord to quarantine."""
    value = row.get(name)
    if value is None:
        raise InvalidRecord("missing_field", f"{name!r} is missing: the row cannot be paired")
    if not isinstance(value, str):
        raise InvalidRecord("wrong_type", f"{name!r} must be str, got {type(value).__name__}")
    if is_blank(value):
        raise InvalidRecord("empty_text", f"{name!r} is empty, whitespace or invisible characters")
    return value


def helpsteer(*, weights: dict[str, float] | None = None, user_id: int = UNKNOWN_USER,
              user_text: str | None = None, max_pairs_per_prompt: int = 10) -> MapRow:
    """nvidia/HelpSteer: one row per response (`prompt`, `response`, and the five attributes
    rated 0-4). The dataset lists a prompt's responses on consecutive rows, so the mapper
    keeps the run of rows of the current prompt and pairs each new response with every
    earlier one: chosen = the higher `w·ratings` (weights default to equal on helpfulness,
    correctness and coherence; complexity and verbosity are styles, not quality). Every
    pair carries all five ratings as scores.

    Quarantined, each once: a row with a missing or out-of-range rating, or without a
    prompt or response (before pairing: it joins no run), a pair of equal utility (a tie),
    and a row whose pairing would take its prompt past `max_pairs_per_prompt` comparisons
    (pairs and ties; 10 pairs all of 5 responses). So a source row gives at most as many
    outcomes as its prompt has earlier responses, and a prompt at most the cap.
    """
    weights = dict(weights or HELPSTEER_QUALITY)
    unknown = sorted(set(weights) - set(HELPSTEER_ATTRIBUTES))
    if unknown:
        raise ValueError(f"helpsteer: weights name unknown attribute(s) {unknown}; "
                         f"known: {HELPSTEER_ATTRIBUTES}")
    if isinstance(max_pairs_per_prompt, bool) or not isinstance(max_pairs_per_prompt, int) \
            or max_pairs_per_prompt < 1:
        raise ValueError(f"helpsteer: max_pairs_per_prompt must be an int >= 1, got {max_pairs_per_prompt!r}")
    run: list[tuple[str, dict[str, float], float]] = []  # (response, ratings, utility) of the current prompt
    state = {"prompt": None, "comparisons": 0}

    def map_row(row: dict):
        ratings = {}
        for name in HELPSTEER_ATTRIBUTES:
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 4:
                yield InvalidRecord("unmappable", f"{name}={value!r}: HelpSteer ratings are 0-4")
                return
            ratings[name] = float(value)
        prompt, response = _pairable_text(row, "prompt"), _pairable_text(row, "response")
        if prompt != state["prompt"]:
            state["prompt"], state["comparisons"] = prompt, 0
            run.clear()
        if state["comparisons"] + len(run) > max_pairs_per_prompt:
            yield InvalidRecord("too_many_pairs", f"the prompt has {len(run)} responses paired in "
                                f"{state['comparisons']} comparisons; pairing this one would pass "
                                f"max_pairs_per_prompt={max_pairs_per_prompt}")
            return
        utility = sum(w * ratings[a] for a, w in weights.items())
        state["comparisons"] += len(run)
        for earlier, earlier_ratings, other in run:
            if other == utility:
                yield InvalidRecord("tie", f"two responses of one prompt both have utility {utility}")
                continue
            (chosen, cs), (rejected, rs) = (((response, ratings), (earlier, earlier_ratings)) if utility > other
                                            else ((earlier, earlier_ratings), (response, ratings)))
            yield PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, user_id=user_id,
                                   user_text=user_text, chosen_scores=dict(cs),
                                   rejected_scores=dict(rs), source="helpsteer")
        run.append((response, ratings, utility))
    return map_row


def _last_assistant_text(messages, field: str) -> str:
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
        raise InvalidRecord("unmappable", f"{field!r} is not a non-empty list of messages")
    if messages[-1].get("role") != "assistant":
        raise InvalidRecord("unmappable", f"{field!r} does not end with an assistant message")
    return messages[-1].get("content")


def ultrafeedback_binarized(*, user_id: int = UNKNOWN_USER) -> MapRow:
    """HuggingFaceH4/ultrafeedback_binarized: the last assistant message of `chosen` /
    `rejected` against `prompt`; `score_chosen` / `score_rejected` become {"score": s}.
    Equal scores carry no preference and are quarantined as a tie."""

    def map_row(row: dict):
        try:
            chosen = _last_assistant_text(row.get("chosen"), "chosen")
            rejected = _last_assistant_text(row.get("rejected"), "rejected")
        except InvalidRecord as err:
            yield err
            return
        score_c, score_r = row.get("score_chosen"), row.get("score_rejected")
        if score_c is not None and score_c == score_r:
            yield InvalidRecord("tie", f"score_chosen == score_rejected == {score_c}")
            return
        yield PreferenceRecord(
            prompt=row.get("prompt"), chosen=chosen, rejected=rejected, user_id=user_id,
            chosen_scores={} if score_c is None else {"score": score_c},
            rejected_scores={} if score_r is None else {"score": score_r},
            source="ultrafeedback_binarized")
    return map_row


TRL_COLUMNS_HINT = ("standard: 'prompt', 'chosen', 'rejected' as text; or conversational: 'chosen' and "
                    "'rejected' as lists of {'role', 'content'} messages ending with the assistant's "
                    "response, with an optional 'prompt' (text or messages); optional 'score_chosen', "
                    "'score_rejected'")


def _messages(value, field: str) -> list[dict]:
    """`value` checked as a non-empty list of {"role": system|user|assistant, "content": str}."""
    if not isinstance(value, list) or not value:
        raise InvalidRecord("unmappable", f"{field!r} is not a non-empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise InvalidRecord("unmappable", f"{field}[{i}] is not a message "
                                f"{{'role': {'|'.join(ROLES)}, 'content': str}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _trl_conversation(prompt, chosen, rejected) -> tuple[list[dict], str, str]:
    """(context, chosen, rejected) of a conversational row: the last assistant turn of each
    side is its response; the turns before it (equal on both sides), or else `prompt`, are
    the context (messages)."""
    chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise InvalidRecord("unmappable", f"{field!r} does not end with an assistant message")
    context = chosen[:-1]
    if context != rejected[:-1]:
        raise InvalidRecord("unmappable", "'chosen' and 'rejected' differ before their last assistant message")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is not None:
        prompt = _messages(prompt, "prompt")
    if not context:  # explicit prompt: the responses hold only the assistant's turn
        if prompt is None:
            raise InvalidRecord("missing_field", "no prompt: 'prompt' is absent and 'chosen' has no "
                                "turn before its response")
        context = prompt
    elif prompt is not None and prompt != context[:len(prompt)] \
            and prompt != [m for m in context if m["role"] == "user"][:1]:
        # implicit prompt: a given prompt must be the start of the conversation (or, as in
        # binarized UltraFeedback, its first user turn)
        raise InvalidRecord("unmappable", "'prompt' disagrees with the turns before the response in 'chosen'")
    if context[-1]["role"] == "assistant":
        raise InvalidRecord("unmappable", "the context ends with an assistant turn: nothing asks for the response")
    return context, chosen[-1]["content"], rejected[-1]["content"]


def trl(*, user_map: UserIdMap | None = None, user_column: str | None = None) -> MapRow:
    """TRL's preference formats (the DPO/reward trainers' datasets): standard rows of text
    `prompt` / `chosen` / `rejected`, or conversational rows whose `chosen` / `rejected` are
    message lists (see `_trl_conversation`): the turns before the response are the record's
    `context` and their transcript (`render_context`) its prompt. `score_chosen` /
    `score_rejected`, if present, become {"score": s}; equal scores carry no preference and
    are quarantined as a tie.
    With `user_column`, that column's value (a user or preference name) is the row's user,
    mapped to a stable id through `user_map`; a row without it is quarantined."""
    if user_column and user_map is None:
        raise ValueError("trl: user_column needs a user_map")

    def map_row(row: dict):
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        context = None
        if isinstance(chosen, list) or isinstance(rejected, list):
            context, chosen, rejected = _trl_conversation(prompt, chosen, rejected)
        elif isinstance(prompt, list):
            context = _messages(prompt, "prompt")
        if context is not None:
            prompt = render_context(context)
        user_id = UNKNOWN_USER
        if user_column:
            key = row.get(user_column)
            if key is None or (isinstance(key, str) and is_blank(key)):
                raise InvalidRecord("missing_field", f"user column {user_column!r} is empty")
            user_id = user_map(key)
        scores = {side: ({} if row.get(f"score_{side}") is None else {"score": row[f"score_{side}"]})
                  for side in ("chosen", "rejected")}
        if scores["chosen"] and scores["chosen"] == scores["rejected"]:  # rated alike: no preference
            raise InvalidRecord("tie", f"score_chosen == score_rejected == {row['score_chosen']}")
        yield PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, user_id=user_id,
                               chosen_scores=scores["chosen"], rejected_scores=scores["rejected"],
                               source="trl", context=context)
    return map_row


def _trl_columns(sample: dict, options: dict) -> tuple:
    # text responses need a prompt column; conversations may carry their context themselves
    text = isinstance(sample.get("chosen"), str)
    return ("prompt" if text else None, "chosen", "rejected", options.get("user_column"))


def psoups(*, preference: str, user_map: UserIdMap) -> MapRow:
    """P-Soups preference file: `completion_a` is preferred to `completion_b` for
    `user_input`; the preference name (e.g. "P1A") is the user text, source and user key."""
    if not preference:
        raise ValueError("psoups: pass preference=<name>, e.g. 'P1A'")

    def map_row(row: dict):
        yield PreferenceRecord(
            prompt=row.get("user_input"), chosen=row.get("completion_a"),
            rejected=row.get("completion_b"), user_id=user_map(preference),
            user_text=preference, source=f"psoups:{preference}")
    return map_row


def _reddit_prompt(info: dict) -> str:
    body = info.get("post") or info.get("article")
    if not isinstance(body, str):
        raise InvalidRecord("unmappable", "info has neither 'post' nor 'article' text")
    head = f"SUBREDDIT: r/{info['subreddit']}\n" if info.get("subreddit") else ""
    title = f"TITLE: {info['title']}\n" if info.get("title") else ""
    return f"{head}{title}POST: {body}\nTL;DR:"


def summarize_from_feedback(*, user_map: UserIdMap) -> MapRow:
    """openai/summarize_from_feedback `comparisons`: summaries[choice] is chosen, the
    other rejected; the labeler (`worker`) becomes a user id through `user_map`."""

    def map_row(row: dict):
        summaries, choice = row.get("summaries"), row.get("choice")
        if choice not in (0, 1) or isinstance(choice, bool):
            yield InvalidRecord("unmappable", f"choice must be 0 or 1, got {choice!r}")
            return
        if not isinstance(summaries, list) or len(summaries) != 2:
            yield InvalidRecord("unmappable", "summaries must be a list of two")
            return
        if not row.get("worker"):
            yield InvalidRecord("unmappable", "worker id is missing")
            return
        try:
            prompt = _reddit_prompt(row.get("info") or {})
        except InvalidRecord as err:
            yield err
            return
        chosen, rejected = summaries[choice], summaries[1 - choice]
        yield PreferenceRecord(
            prompt=prompt, chosen=chosen.get("text"), rejected=rejected.get("text"),
            user_id=user_map(row["worker"]),
            source=f"summarize_from_feedback:{chosen.get('policy')}>{rejected.get('policy')}")
    return map_row


# PRISM fields that describe a user (survey.jsonl); the mapping assumes this layout of
# the dataset card / codebook: survey rows keyed by `user_id` with free-text
# `self_description` and `system_string`, a `stated_prefs` dict of aspect -> rating, and
# demographics such as `age`, `gender`, `education`, `location` (dict or str).
PRISM_PROFILE_FIELDS = ("self_description", "system_string", "age", "gender", "education",
                        "location", "stated_prefs")


def prism_user_text(profile: dict, fields: Iterable[str] = PRISM_PROFILE_FIELDS) -> str | None:
    """One line per present survey field (dicts as `k=v` lists): the user's textual info."""
    lines = []
    for name in fields:
        value = profile.get(name)
        if value in (None, "", {}):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        lines.append(f"{name}: {value}")
    return "\n".join(lines) or None


def load_prism_profiles(survey_path: str | Path) -> dict[str, dict]:
    """Read PRISM's survey.jsonl into {user_id: profile row}."""
    profiles = {}
    # the survey is one file every row depends on: an unreadable one is an error, not a quarantine
    for line, row, _ in read_shard(str(survey_path), lambda: Path(survey_path).open("rb")):
        if isinstance(row, InvalidRecord):
            raise ValueError(f"{survey_path}:{line}: {row}")
        profiles[str(row["user_id"])] = row
    return profiles


def prism(*, user_map: UserIdMap, survey_path: str | Path | None = None,
          max_pairs_per_conversation: int = 64) -> MapRow:
    """PRISM conversations.jsonl: each turn is a comparison (P-RLHF, §5.3).

    Assumes `conversation_history` is a list of messages with `turn`, `role`
    ("user"/"model"), `content`, and for model messages `score` (1-100) and `if_chosen`.
    Per turn: prompt = earlier turns (user text + the chosen reply) and this turn's user
    text; chosen = the model reply with `if_chosen`; one pair per other reply of that
    turn. A reply scored at or above the chosen one (contradictory) is quarantined, and so
    is a conversation with no turn. Past `max_pairs_per_conversation` comparisons (pairs and
    ties; PRISM has a few per turn and a few turns) the rest of the conversation is one
    `too_many_pairs` entry: the prompt grows with every turn, so its pairs would grow as
    the square of its length.
    """
    if isinstance(max_pairs_per_conversation, bool) or not isinstance(max_pairs_per_conversation, int) \
            or max_pairs_per_conversation < 1:
        raise ValueError(f"prism: max_pairs_per_conversation must be an int >= 1, got {max_pairs_per_conversation!r}")
    profiles = load_prism_profiles(survey_path) if survey_path else {}

    def map_row(row: dict):
        history, user_key = row.get("conversation_history"), row.get("user_id")
        if not isinstance(history, list) or user_key is None:
            yield InvalidRecord("unmappable", "conversation needs 'conversation_history' (list) and 'user_id'")
            return
        if not history:
            yield InvalidRecord("unmappable", "'conversation_history' is empty: no turn to compare")
            return
        user_id = user_map(user_key)
        profile = profiles.get(str(user_key))
        user_text = prism_user_text(profile) if profile else None
        turns: dict[int, list[dict]] = {}
        for message in history:
            turns.setdefault(message.get("turn"), []).append(message)
        context, comparisons = [], 0
        for turn in sorted(turns, key=lambda t: (t is None, t)):
            messages = turns[turn]
            user_msgs = [m for m in messages if m.get("role") == "user"]
            replies = [m for m in messages if m.get("role") == "model"]
            chosen = [m for m in replies if m.get("if_chosen") is True]
            if len(user_msgs) != 1 or len(chosen) != 1 or len(replies) < 2:
                yield InvalidRecord("unmappable", f"turn {turn}: need 1 user message, 1 chosen and >= 2 "
                                    f"replies; got {len(user_msgs)}, {len(chosen)}, {len(replies)}")
                break  # later turns build on this one: without its chosen reply there is no context
            context.append(f"User: {user_msgs[0].get('content')}")
            prompt = "\n".join(context) + "\nAssistant:"
            best = chosen[0]
            if comparisons + len(replies) - 1 > max_pairs_per_conversation:
                yield InvalidRecord("too_many_pairs", f"turn {turn}: its {len(replies) - 1} comparisons would take "
                                    f"the conversation past max_pairs_per_conversation="
                                    f"{max_pairs_per_conversation}; this and later turns are left out")
                break
            comparisons += len(replies) - 1
            for other in replies:
                if other is best:
                    continue
                if not other.get("score", -math.inf) < best.get("score", math.inf):
                    yield InvalidRecord("tie", f"turn {turn}: rejected reply scored {other.get('score')} "
                                        f">= chosen {best.get('score')}")
                    continue
                yield PreferenceRecord(
                    prompt=prompt, chosen=best.get("content"), rejected=other.get("content"),
                    user_id=user_id, user_text=user_text,
                    chosen_scores={"score": best["score"]}, rejected_scores={"score": other["score"]},
                    source=f"prism:{row.get('conversation_id', '')}:{turn}")
            context.append(f"Assistant: {best.get('content')}")
    return map_row


@dataclass(frozen=True)
class Schema:
    """One source layout: how to map its rows, and what else loading it needs."""
    name: str
    mapper: Callable[..., MapRow]     # factory(**options) -> map_row
    uses_user_map: bool = False       # mapper takes user_map= (user keys -> stable ids)
    hub_config: str | None = None     # datasets.load_dataset config name of the hub copy
    # options derived from the source path when the caller did not pass them
    source_options: Callable[[str], dict] = lambda source: {}
    # the columns a source must have, given its first row and the options (None: not checked);
    # and how the error describes them
    columns: Callable[[dict, dict], Iterable[str | None]] | None = None
    columns_hint: str = ""


def _psoups_file_options(source: str) -> dict:
    return {"preference": Path(source).stem} if Path(source).is_file() else {}  # P-Soups names files by preference


SCHEMAS: dict[str, Schema] = {schema.name: schema for schema in (
    Schema("ultrafeedback", ultrafeedback),
    Schema("ultrafeedback_binarized", ultrafeedback_binarized,
           columns=lambda sample, options: ("prompt", "chosen", "rejected"),
           columns_hint="'prompt' (text), 'chosen' and 'rejected' (message lists)"),
    Schema("helpsteer", helpsteer),
    Schema("psoups", psoups, uses_user_map=True, source_options=_psoups_file_options,
           columns=lambda sample, options: ("user_input", "completion_a", "completion_b"),
           columns_hint="P-Soups: 'user_input', 'completion_a' (preferred), 'completion_b'"),
    Schema("summarize_from_feedback", summarize_from_feedback, uses_user_map=True, hub_config="comparisons"),
    Schema("prism", prism, uses_user_map=True, hub_config="conversations",
           columns=lambda sample, options: ("conversation_history", "user_id"),
           columns_hint="PRISM conversations: 'conversation_history' (messages) and 'user_id'"),
    Schema("trl", trl, uses_user_map=True, columns=_trl_columns, columns_hint=TRL_COLUMNS_HINT),
)}


def get_schema(name: str) -> Schema:
    """The registered schema `name`; a ValueError lists the known ones."""
    if name not in SCHEMAS:
        raise ValueError(f"unknown schema {name!r}; known: {sorted(SCHEMAS)}")
    return SCHEMAS[name]


# ---------------------------------------------------------------- SFT examples

SFT_EXAMPLES = Schema(
    "sft", lambda **options: None,
    columns=lambda sample, options: ("messages",) if "messages" in sample else ("prompt", "response"),
    columns_hint="'prompt' and 'response' as text, or 'messages': a list of {'role', 'content'} "
                 "messages ending with the assistant's response")


def sft_example(row: dict, max_chars: int) -> tuple[str | list[dict], str]:
    """(prompt, response) of one SFT row: `prompt` / `response` text, or `messages` whose last
    assistant turn is the response; the turns before it are the prompt, as a preference
    record's (`PreferenceRecord.prompt_or_context`): a lone user turn's text, else the message
    list, which models/chat.py renders as turns (or as its transcript, `render_context`,
    without a chat template). Raises InvalidRecord naming the field and the problem."""
    try:
        if row.get("messages") is None:
            return tuple(check_text(row, name, max_chars) for name in ("prompt", "response"))
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise InvalidRecord("unmappable", "'messages' must end with an assistant turn after at least one other")
        if messages[-2]["role"] == "assistant":
            raise InvalidRecord("unmappable", "the context ends with an assistant turn: nothing asks for the response")
        context, response = messages[:-1], check_text({"response": messages[-1]["content"]}, "response", max_chars)
        prompt = check_text({"prompt": render_context(context)}, "prompt", max_chars)
        return check_context({"context": context}, prompt, max_chars) or prompt, response
    except InvalidRecord:
        raise
    except Exception as err:  # as validate_row: an odd row is an entry, never a crash
        raise InvalidRecord("unexpected", f"{type(err).__name__} while validating the row") from err


def source_digest(source: str) -> str:
    """A hash of a local source's files (names and bytes; a folder's, sorted), for cache keys:
    the same data gives the same key wherever it lies. A hub name is its own key."""
    import hashlib

    path = Path(source)
    if not path.exists():
        return source
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():  # a shard's place in the folder is part of the data; a lone file's name is not
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as stream:
            while chunk := stream.read(2**20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def load_sft_examples(source: str, *, quarantine_path: str | Path, split: str | None = None,
                      max_quarantine_fraction: float = 0.05,
                      max_chars: int = 20000) -> tuple[list[tuple[str | list[dict], str]], dict]:
    """Every valid (prompt, response) of `source` (file, folder of shards, save_to_disk folder
    or hub name, as `load_records`) and the quarantine summary: bad rows go to
    `quarantine_path` with reason, file and line; wrong columns raise one `WrongColumns`;
    more than `max_quarantine_fraction` bad rows raise `QuarantineExceeded`."""
    quarantine = Quarantine(quarantine_path, max_fraction=max_quarantine_fraction)
    rows = _iter_source(source, config=None, split=split, on_shard=quarantine.note_shard,
                        check=lambda where, columns, sample: check_columns(where, columns, sample, SFT_EXAMPLES, {}))
    examples = []
    for shard, line, row, raw in rows:
        quarantine.count_rows()
        try:
            if isinstance(row, InvalidRecord):
                raise row
            examples.append(sft_example(row, max_chars))
        except InvalidRecord as err:
            quarantine.add(reason=err.code, detail=err.detail, shard=shard, line=line, raw=raw)
            continue
        quarantine.count_valid()
    return examples, quarantine.check()


# ---------------------------------------------------------------- dispatch

def load_records(source: str, *, schema: str, split: str | None = None,
                 quarantine: Quarantine | None = None, max_chars: int = 20000,
                 user_map: UserIdMap | None = None, user_map_path: str | Path | None = None,
                 config: str | None = None, **options) -> Iterator[PreferenceRecord]:
    """Yield validated records of `source` (local file / folder, or hub name) in `schema`.

    Rows or comparisons that cannot be mapped or fail `validate_row`, and shards (files)
    that cannot be read, go to `quarantine` with reason, file and line; without a
    quarantine the first one raises `InvalidRecord` naming the file and line. Schemas with
    users (psoups, summarize, prism) map user keys through `user_map`, loaded from and
    saved to `user_map_path` when given (saved when the iteration ends). `options` go to
    the schema factory, e.g. `weights=` (ultrafeedback), `preference=` (psoups),
    `survey_path=` (prism), `max_pairs_per_prompt=` (helpsteer),
    `max_pairs_per_conversation=` (prism), `user_column=` (trl).

    A source whose columns do not fit the schema (every file's, checked before any row is
    read; see `Schema.columns`) raises one `WrongColumns` naming the file, the columns found
    and those expected. A save_to_disk folder is read with `datasets.load_from_disk` (a
    DatasetDict by `split`); a name `owner/name` that is no local path is a hub dataset.
    """
    entry = get_schema(schema)
    if entry.uses_user_map:
        if user_map is None:
            user_map = UserIdMap.load(user_map_path) if user_map_path else UserIdMap()
        options["user_map"] = user_map
    options = {**entry.source_options(source), **options}
    map_row = entry.mapper(**options)
    rows = _iter_source(source, config=config or entry.hub_config, split=split,
                        on_shard=quarantine.note_shard if quarantine is not None else None,
                        check=lambda where, columns, sample: check_columns(where, columns, sample, entry, options))
    try:
        for shard, line, row, raw in rows:
            if quarantine is not None:
                quarantine.count_rows()
            outcomes = [row] if isinstance(row, InvalidRecord) else _map_safely(map_row, row)
            for outcome in outcomes:
                if not isinstance(outcome, InvalidRecord):
                    outcome = _validated(outcome, max_chars)
                if isinstance(outcome, InvalidRecord):
                    if quarantine is None:
                        raise InvalidRecord(outcome.code, f"{shard}:{line}: {outcome.detail}")
                    quarantine.add(reason=outcome.code, detail=outcome.detail, shard=shard, line=line, raw=raw)
                else:
                    if quarantine is not None:
                        quarantine.count_valid()
                    yield outcome
    finally:
        if user_map_path and entry.uses_user_map:
            user_map.save(user_map_path)


def _validated(record: PreferenceRecord, max_chars: int) -> PreferenceRecord | InvalidRecord:
    # the record's fields as they are (not to_row(), whose json.dumps could fail on them)
    try:
        return validate_row(dict(vars(record)), max_chars=max_chars)
    except InvalidRecord as err:
        return err


def _map_safely(map_row: MapRow, row: dict) -> list:
    """Run a schema mapper on one row; whatever a row of unexpected shape makes it raise
    (a missing key, a str where a dict was due, an unorderable turn) becomes an
    InvalidRecord naming the exception, so one odd row cannot stop the load."""
    try:
        return list(map_row(row))
    except InvalidRecord as err:
        return [err]
    except Exception as err:
        return [InvalidRecord("unmappable", f"{type(err).__name__}: {err}")]


def load_validated(source: str, *, schema: str, quarantine_path: str | Path,
                   max_quarantine_fraction: float = 0.05,
                   **loader_kwargs) -> tuple[list[PreferenceRecord], dict]:
    """Every valid record of `source` and the quarantine summary, for callers outside Ray Data.

    Runs `load_records` (so every mapped row goes through `validate_row`) with a fresh
    `Quarantine` at `quarantine_path`: bad rows and unreadable files are written there
    with reason, file and line. Raises `QuarantineExceeded` if more than
    `max_quarantine_fraction` of the rows (or of the files) were bad. `loader_kwargs` go
    to `load_records` (split, max_chars, user_map, user_map_path, config, and the schema's
    options such as `preference=`).
    """
    quarantine = Quarantine(quarantine_path, max_fraction=max_quarantine_fraction)
    records = list(load_records(source, schema=schema, quarantine=quarantine, **loader_kwargs))
    return records, quarantine.check()
