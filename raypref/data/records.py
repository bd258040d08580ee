"""The one preference record type of raypref and its validation.

Every source (the simulated world, real-dataset loaders, shards on disk) produces
`PreferenceRecord`s; on disk and in Ray Data a record is a flat row (`to_row`) whose
score dicts are JSON text, so parquet and jsonl hold the same columns.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field

UNKNOWN_USER = 0  # user id of an unknown / generic user (seed 004 §4.1)

ROW_COLUMNS = (
    "prompt", "chosen", "rejected", "user_id", "user_text",
    "chosen_scores", "rejected_scores", "source",
)


@dataclass
class PreferenceRecord:
    prompt: str
    chosen: str
    rejected: str
    user_id: int = UNKNOWN_USER
    user_text: str | None = None
    # per-attribute scores of each response, e.g. {"helpfulness": 4.0, "verbosity": 0.7}
    chosen_scores: dict[str, float] = field(default_factory=dict)
    rejected_scores: dict[str, float] = field(default_factory=dict)
    source: str = ""

    def to_row(self) -> dict:
        """Flat row for parquet / jsonl / Ray Data (score dicts as JSON text)."""
        return {
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "user_id": int(self.user_id),
            "user_text": self.user_text or "",
            "chosen_scores": json.dumps(self.chosen_scores, sort_keys=True),
            "rejected_scores": json.dumps(self.rejected_scores, sort_keys=True),
            "source": self.source,
        }


class InvalidRecord(ValueError):
    """A row that cannot become a `PreferenceRecord`.

    `code` is a short category (used to group quarantine counts), `detail` names the
    field and the problem so a reader can fix the source.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


_TEXT_FIELDS = ("prompt", "chosen", "rejected")
_SCORE_FIELDS = ("chosen_scores", "rejected_scores")


def _is_int(value) -> bool:
    # Integral covers numpy ints from parquet/Arrow; bool is Integral too, but True as a
    # user id is a bug in the source
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_text(row: dict, name: str, max_chars: int) -> str:
    if name not in row or row[name] is None:
        raise InvalidRecord("missing_field", f"field {name!r} is missing")
    value = row[name]
    if not isinstance(value, str):
        raise InvalidRecord("wrong_type", f"field {name!r} must be str, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRecord("empty_text", f"field {name!r} is empty or whitespace")
    if len(value) > max_chars:
        raise InvalidRecord("too_long", f"field {name!r} has {len(value)} chars > max_chars={max_chars}")
    return value


def _check_scores(row: dict, name: str) -> dict[str, float]:
    value = row.get(name)
    if value is None or value == "":
        return {}
    if isinstance(value, str):  # the on-disk form is JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise InvalidRecord("bad_scores_json", f"field {name!r} is not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise InvalidRecord("wrong_type", f"field {name!r} must be a dict of scores, got {type(value).__name__}")
    scores = {}
    for attr, score in value.items():
        if not isinstance(score, numbers.Real) or isinstance(score, bool):
            raise InvalidRecord("wrong_type", f"{name}[{attr!r}] must be a number, got {type(score).__name__}")
        if not math.isfinite(score):
            raise InvalidRecord("non_finite_score", f"{name}[{attr!r}] is not finite ({score})")
        scores[str(attr)] = float(score)
    return scores


def _check_optional_str(row: dict, name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise InvalidRecord("wrong_type", f"field {name!r} must be str, got {type(value).__name__}")
    return value


def validate_row(row: dict, *, max_chars: int = 20000) -> PreferenceRecord:
    """Check one flat row (as written by `to_row`, or with dict scores) and build the record.

    Required: `prompt`, `chosen`, `rejected` (non-empty str, at most `max_chars`, chosen !=
    rejected). Optional: `user_id` (int >= 0, default UNKNOWN_USER), `user_text`, `source`,
    `chosen_scores` / `rejected_scores` (dict or JSON text; finite numbers). Extra keys are
    ignored. Raises `InvalidRecord` naming the field and the problem.
    """
    if not isinstance(row, dict):
        raise InvalidRecord("wrong_type", f"row must be a dict, got {type(row).__name__}")
    prompt, chosen, rejected = (_check_text(row, name, max_chars) for name in _TEXT_FIELDS)
    if chosen.strip() == rejected.strip():
        raise InvalidRecord("identical_responses", "fields 'chosen' and 'rejected' are the same text")

    user_id = row.get("user_id", UNKNOWN_USER)
    if user_id is None:
        user_id = UNKNOWN_USER
    if not _is_int(user_id):
        raise InvalidRecord("bad_user_id", f"field 'user_id' must be an int, got {type(user_id).__name__}")
    if user_id < 0:
        raise InvalidRecord("bad_user_id", f"field 'user_id' must be >= 0, got {user_id}")

    user_text = _check_optional_str(row, "user_text")
    if user_text is not None and len(user_text) > max_chars:
        raise InvalidRecord("too_long", f"field 'user_text' has {len(user_text)} chars > max_chars={max_chars}")
    chosen_scores, rejected_scores = (_check_scores(row, name) for name in _SCORE_FIELDS)
    return PreferenceRecord(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        user_id=int(user_id),
        user_text=user_text or None,  # to_row writes "" for "no user text"
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        source=_check_optional_str(row, "source") or "",
    )
