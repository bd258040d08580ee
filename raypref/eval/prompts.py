"""Evaluation prompts from a file the user gives (e.g. the 50 Koala prompts of 002 App. F).

``.txt``: one prompt per non-blank line. ``.jsonl``: one JSON object per non-blank line with
the prompt under ``field`` (default "prompt"; "instruction" is accepted too).
"""
from __future__ import annotations

import json
from pathlib import Path

_FALLBACK_FIELDS = ("prompt", "instruction")


def load_prompts(path: str | Path, field: str = "prompt") -> list[str]:
    """Prompts of ``path`` in file order; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_prompts: no such file {path}")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"load_prompts: {path}: use a .txt (one prompt a line) or .jsonl file")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if suffix == ".txt":
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"load_prompts: {path}:{number}: not JSON ({err.msg})") from None
        keys = [field] + [k for k in _FALLBACK_FIELDS if k != field]
        key = next((k for k in keys if isinstance(row, dict) and k in row), None)
        if key is None:
            raise ValueError(f"load_prompts: {path}:{number}: no {field!r} field "
                             f"(has {sorted(row) if isinstance(row, dict) else type(row).__name__})")
        text = row[key]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"load_prompts: {path}:{number}: {key!r} must be a non-empty string")
        prompts.append(text.strip())
    if not prompts:
        raise ValueError(f"load_prompts: {path} holds no prompts")
    return prompts
