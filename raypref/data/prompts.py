"""Prompt sets for runs on real text: the project's questions, or any prompts file a user gives.

The default, ``questions.jsonl`` beside this module, holds 360 everyday questions written in
the project (18 topics: science, cooking, history, health, money, programming, travel,
language, ...), each with a fixed ``split``: 4 of every 20 per topic are ``test``.

A user's file (e.g. the 50 Koala prompts of P-Soups App. F) is either JSON lines (``.jsonl``), one
object per line with a non-empty string ``prompt`` (or ``instruction``, as P-Soups files name
it) and optionally ``split`` ("train" or "test"), or plain text (``.txt``), one prompt per
line. Blank lines are skipped. A file without ``split`` fields is split
by a hash of each prompt's text (`TEST_SHARE` of them in test), so the split is fixed and the
same prompt never lands in both. Duplicate prompts are refused: they would weigh one question
twice, or put it on both sides of the split.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROMPTS = Path(__file__).with_name("questions.jsonl")
SPLITS = ("train", "test")
TEST_SHARE = 0.2
PROMPT_FIELDS = ("prompt", "instruction")  # the first one a row has is its prompt


@dataclass(frozen=True)
class Prompt:
    text: str
    split: str
    line: int  # 1-based line in its file


class PromptFileError(ValueError):
    """A prompts file that cannot be read as prompts; the message names the file and line."""


def read_prompts(path: str | Path | None = None) -> list[Prompt]:
    """Every prompt of ``path`` (default: the project's questions) with its split."""
    path = Path(path) if path is not None else DEFAULT_PROMPTS
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise PromptFileError(f"{path}: use a .jsonl (a 'prompt' field a line) or .txt "
                              "(one prompt a line) file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptFileError(f"{path}: not UTF-8 text ({err})") from None
    parse = _parse_json_line if suffix == ".jsonl" else _parse_text_line
    rows = [(n, *parse(path, n, line)) for n, line in enumerate(lines, 1) if line.strip()]
    if not rows:
        raise PromptFileError(f"{path}: no prompts (the file is empty or blank)")
    with_split = [n for n, _, split in rows if split is not None]
    if with_split and len(with_split) != len(rows):
        missing = next(n for n, _, split in rows if split is None)
        raise PromptFileError(f"{path}:{missing}: no 'split' field, but other lines have one "
                              "(give every line a split, or none)")
    prompts = [Prompt(text, split or _hash_split(text), n) for n, text, split in rows]
    _refuse_duplicates(path, prompts)
    return prompts


def load_prompts(path: str | Path | None = None, split: str | None = None) -> list[str]:
    """Prompt texts of ``path`` (default: the project's questions), in file order; only those
    of ``split`` ("train" or "test") when given."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"load_prompts: split must be one of {SPLITS} or None, got {split!r}")
    prompts = read_prompts(path)
    chosen = [p.text for p in prompts if split is None or p.split == split]
    if not chosen:
        raise PromptFileError(f"{path or DEFAULT_PROMPTS}: no prompts in split {split!r}")
    return chosen


def _parse_json_line(path: Path, n: int, line: str) -> tuple[str, str | None]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise PromptFileError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise PromptFileError(f"{path}:{n}: expected a JSON object with a 'prompt' field, "
                              f"got {type(row).__name__}")
    key = next((k for k in PROMPT_FIELDS if k in row), None)
    if key is None:
        raise PromptFileError(f"{path}:{n}: no 'prompt' field (has {sorted(row)})")
    text = row[key]
    if not isinstance(text, str) or not text.strip():
        raise PromptFileError(f"{path}:{n}: {key!r} must be a non-empty string, got {text!r}")
    split = row.get("split")
    if split is not None and split not in SPLITS:
        raise PromptFileError(f"{path}:{n}: 'split' must be one of {SPLITS}, got {split!r}")
    return text.strip(), split


def _parse_text_line(path: Path, n: int, line: str) -> tuple[str, None]:
    return line.strip(), None


def _hash_split(text: str) -> str:
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return "test" if digest / 2**64 < TEST_SHARE else "train"


def _refuse_duplicates(path: Path, prompts: list[Prompt]) -> None:
    first: dict[str, int] = {}
    for p in prompts:
        key = " ".join(p.text.lower().split())  # case and spacing do not make a new question
        if key in first:
            raise PromptFileError(f"{path}:{p.line}: duplicate of the prompt on line {first[key]}: "
                                  f"{p.text!r}")
        first[key] = p.line
