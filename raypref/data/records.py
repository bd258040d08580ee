"""The one preference record type of raypref and its validation.

Every source (the simulated world, real-dataset loaders, shards on disk) produces
`PreferenceRecord`s; on disk and in Ray Data a record is a flat row (`to_row`) whose
score dicts and conversation context are JSON text, so parquet and jsonl hold the same columns.
A shard written before the `context` column existed reads as records without one.
"""
from __future__ import annotations

import json
import math
import numbers
import unicodedata
from dataclasses import dataclass, field

UNKNOWN_USER = 0  # user id of an unknown / generic user (P-RLHF §4.1)
MAX_USER_ID = 2**31 - 1  # ids must fit int32: embedding tables and Arrow columns downstream
# Scores are a handful of named ratings per response (UltraFeedback 4, HelpSteer 5); these caps
# keep a hostile row from carrying an unbounded dict through every copy of the pipeline.
MAX_SCORES = 64
MAX_SCORE_NAME_CHARS = 64
MAX_SCORES_JSON_CHARS = 64 * 1024  # the on-disk JSON text is refused before it is parsed

ROW_COLUMNS = (
    "prompt", "chosen", "rejected", "user_id", "user_text",
    "chosen_scores", "rejected_scores", "source", "context",
)

ROLES = ("system", "user", "assistant")  # the message roles a conversation may hold


def render_context(messages: list[dict]) -> str:
    """The prompt text of the turns before a response: a lone user turn is its own text; a
    longer context (a system message, earlier turns) is a transcript in PRISM's form,
    `System: …` / `User: …` / `Assistant: …` lines ending with `Assistant:`. A tokenizer
    without a chat template reads this; one with a template reads the turns themselves."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


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
    # the conversation before the response ({"role", "content"} messages ending with a user
    # turn) when it is more than one user turn (a system message, earlier turns): a chat
    # template renders each as its own turn (models/chat.py), and `prompt` is its transcript
    # (`render_context`), what a tokenizer without a template and every text reader (judges,
    # reward encoders, logs) sees. None: the prompt is one user turn.
    context: list[dict] | None = field(default=None, metadata={"digest_unless_default": True})

    @property
    def prompt_or_context(self) -> str | list[dict]:
        """What a policy is asked, as models/chat.py takes it: the turns, else the prompt text."""
        return self.context if self.context is not None else self.prompt

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
            # unescaped non-ASCII keeps the text within check_context's length bound
            "context": json.dumps(self.context, ensure_ascii=False) if self.context is not None else "",
        }


class InvalidRecord(ValueError):
    """A row that cannot become a `PreferenceRecord`.

    `code` is a short category (used to group quarantine counts, see `ROW_REASONS`),
    `detail` names the field and the problem so a reader can fix the source.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# The reasons `validate_row` gives, and the rule behind each.
ROW_REASONS = {
    "wrong_type": "the row is not a dict, or a field / score name / score has the wrong type",
    "missing_field": "prompt, chosen or rejected is absent or None",
    "empty_text": "a text field or a score name is empty, or holds only whitespace and invisible "
                  "characters (zero-width spaces and joiners, word joiners, byte-order marks)",
    "too_long": f"a text field is longer than max_chars, a score name longer than "
                f"{MAX_SCORE_NAME_CHARS} characters, or a score field's JSON longer than "
                f"{MAX_SCORES_JSON_CHARS} characters",
    "too_many_scores": f"a score field holds more than {MAX_SCORES} scores",
    "bad_text": "a text field or score name holds a NUL character or a lone surrogate "
                "(neither survives UTF-8 files, Arrow strings or tokenizers)",
    "identical_responses": "chosen and rejected are the same text",
    "bad_user_id": f"user_id is not an int (bool, float and str are refused) in [0, {MAX_USER_ID}]",
    "bad_scores_json": "a score field given as text is not JSON",
    "bad_context": "context (JSON text on disk) is not a list of {'role': system|user|assistant, "
                   "'content': text} messages ending with a user turn, or the prompt is not its "
                   "transcript (render_context)",
    "non_finite_score": "a score is NaN, infinite, or an int too large for a float",
    "unexpected": "a last resort: validation raised something no rule foresaw (a bug to report)",
}

_TEXT_FIELDS = ("prompt", "chosen", "rejected")
# Characters that draw nothing yet are not whitespace to str.isspace(): Hangul fillers, the
# braille blank and the combining grapheme joiner. Format characters (category Cf: zero-width
# space U+200B, joiners U+200C/U+200D, word joiner U+2060, byte-order mark U+FEFF, ...) are
# found by category.
_INVISIBLE = frozenset("\u034f\u115f\u1160\u2800\u3164\uffa0")


def _invisible(char: str) -> bool:
    return char.isspace() or char in _INVISIBLE or unicodedata.category(char) == "Cf"


def is_blank(text: str) -> bool:
    """True if `text` shows nothing: empty, or only whitespace and invisible characters."""
    return all(map(_invisible, text))


def visible_core(text: str) -> str:
    """`text` without invisible characters at its ends: two texts with the same core read the same."""
    start, end = 0, len(text)
    while start < end and _invisible(text[start]):
        start += 1
    while end > start and _invisible(text[end - 1]):
        end -= 1
    return text[start:end]
_SCORE_FIELDS = ("chosen_scores", "rejected_scores")


def _is_int(value) -> bool:
    # Integral covers numpy ints from parquet/Arrow; bool is Integral too, but True as a
    # user id is a bug in the source
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _show_int(value: int) -> str:
    # str() of a huge int is slow and, past 4300 digits, raises ValueError
    return str(value) if value.bit_length() <= 128 else f"an int of {value.bit_length()} bits"


def _check_clean(what: str, value: str) -> None:
    """Refuse NUL characters and lone surrogates, naming `what` and the position."""
    if "\x00" in value:
        raise InvalidRecord("bad_text", f"{what} holds a NUL character at index {value.index(chr(0))}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidRecord("bad_text", f"{what} holds a lone surrogate at index {err.start}") from None


def _check_text(row: dict, name: str, max_chars: int) -> str:
    if name not in row or row[name] is None:
        raise InvalidRecord("missing_field", f"field {name!r} is missing")
    value = row[name]
    if not isinstance(value, str):
        raise InvalidRecord("wrong_type", f"field {name!r} must be str, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidRecord("too_long", f"field {name!r} has {len(value)} chars > max_chars={max_chars}")
    if is_blank(value):  # after the length check: a long text is refused without a scan
        raise InvalidRecord("empty_text", f"field {name!r} is empty, whitespace or invisible characters")
    _check_clean(f"field {name!r}", value)
    return value


def check_text(row: dict, name: str, max_chars: int) -> str:
    """`row[name]` checked as a required text field (the rules of prompt / chosen / rejected)."""
    return _check_text(row, name, max_chars)


def _check_score(name: str, attr, score) -> tuple[str, float]:
    if not isinstance(attr, str):
        raise InvalidRecord("wrong_type", f"{name} names must be str, got {type(attr).__name__}")
    if len(attr) > MAX_SCORE_NAME_CHARS:
        raise InvalidRecord("too_long", f"{name} has a score name of {len(attr)} chars > {MAX_SCORE_NAME_CHARS}")
    if is_blank(attr):
        raise InvalidRecord("empty_text", f"{name} has an empty score name")
    _check_clean(f"{name} name {attr[:40]!r}", attr)
    if not isinstance(score, numbers.Real) or isinstance(score, bool):
        raise InvalidRecord("wrong_type", f"{name}[{attr!r}] must be a number, got {type(score).__name__}")
    try:
        number = float(score)
    except OverflowError:
        raise InvalidRecord("non_finite_score", f"{name}[{attr!r}] is too large for a float") from None
    if not math.isfinite(number):
        raise InvalidRecord("non_finite_score", f"{name}[{attr!r}] is not finite ({number})")
    return attr, number


def _check_scores(row: dict, name: str) -> dict[str, float]:
    value = row.get(name)
    if value is None or (isinstance(value, str) and value == ""):
        return {}
    if isinstance(value, str):  # the on-disk form is JSON text
        if len(value) > MAX_SCORES_JSON_CHARS:
            raise InvalidRecord("too_long", f"field {name!r} has {len(value)} chars of JSON > {MAX_SCORES_JSON_CHARS}")
        try:
            value = json.loads(value)
        # ValueError: JSONDecodeError, or an int literal past Python's 4300-digit limit;
        # RecursionError: absurdly nested brackets
        except (ValueError, RecursionError) as err:
            reason = getattr(err, "msg", None) or type(err).__name__
            raise InvalidRecord("bad_scores_json", f"field {name!r} is not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise InvalidRecord("wrong_type", f"field {name!r} must be a dict of scores, got {type(value).__name__}")
    if len(value) > MAX_SCORES:
        raise InvalidRecord("too_many_scores", f"field {name!r} holds {len(value)} scores > {MAX_SCORES}")
    return dict(_check_score(name, attr, score) for attr, score in value.items())


def _check_optional_str(row: dict, name: str, max_chars: int) -> str | None:
    value = row.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRecord("wrong_type", f"field {name!r} must be str, got {type(value).__name__}")
    if len(value) > max_chars:
        raise InvalidRecord("too_long", f"field {name!r} has {len(value)} chars > max_chars={max_chars}")
    _check_clean(f"field {name!r}", value)
    return value


def check_context(row: dict, prompt: str, max_chars: int) -> list[dict] | None:
    """The row's conversation before the response, or None (absent, empty, or one user turn
    that is the prompt itself). Every message's text is checked as a text field is."""
    value = row.get("context")
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if isinstance(value, str):  # the on-disk form is JSON text
        # the messages' texts are at most the transcript's length (checked below); as to_row
        # writes them, JSON escapes (\uXXXX, control characters only) take at most 6 characters
        # per character and each message's keys less than 6 per character of its transcript line
        if len(value) > 6 * max_chars + 1024:
            raise InvalidRecord("too_long", f"field 'context' has {len(value)} chars of JSON")
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as err:
            reason = getattr(err, "msg", None) or type(err).__name__
            raise InvalidRecord("bad_context", f"field 'context' is not valid JSON ({reason})") from None
    if not isinstance(value, list) or not value:
        raise InvalidRecord("bad_context", "field 'context' must be a non-empty list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise InvalidRecord("bad_context", f"context[{i}] is not a message "
                                f"{{'role': {'|'.join(ROLES)}, 'content': str}}")
        try:
            content = _check_text(message, "content", max_chars)
        except InvalidRecord as err:
            raise InvalidRecord(err.code, f"context[{i}]: {err.detail}") from None
        messages.append({"role": message["role"], "content": content})
    if messages[-1]["role"] != "user":
        raise InvalidRecord("bad_context", f"context ends with a turn of role {messages[-1]['role']!r}, "
                            "not 'user': nothing asks for the response")
    if render_context(messages) != prompt:
        raise InvalidRecord("bad_context", "field 'prompt' is not the transcript of 'context' (render_context)")
    return None if len(messages) == 1 else messages


def _check_user_id(row: dict) -> int:
    user_id = row.get("user_id", UNKNOWN_USER)
    if user_id is None:
        return UNKNOWN_USER
    if not _is_int(user_id):
        raise InvalidRecord("bad_user_id", f"field 'user_id' must be an int, got {type(user_id).__name__}")
    if not 0 <= user_id <= MAX_USER_ID:
        raise InvalidRecord("bad_user_id", f"field 'user_id' must be >= 0 and <= {MAX_USER_ID}, "
                                           f"got {_show_int(int(user_id))}")
    return int(user_id)


def validate_row(row: dict, *, max_chars: int = 20000) -> PreferenceRecord:
    """Check one flat row (as written by `to_row`, or with dict scores) and build the record.

    Required: `prompt`, `chosen`, `rejected` (str, at most `max_chars`, not blank (`is_blank`),
    chosen != rejected up to invisible ends). Optional: `user_id` (int in [0, MAX_USER_ID],
    default UNKNOWN_USER), `user_text` (blank means none), `source`, `chosen_scores` /
    `rejected_scores` (dict or JSON text; at most MAX_SCORES str names of at most
    MAX_SCORE_NAME_CHARS, finite numbers), `context` (a list of messages or its JSON text, see
    `PreferenceRecord.context`; `prompt` must be its transcript). No text may hold a NUL or a
    lone surrogate. Extra keys are ignored.

    Raises `InvalidRecord` naming the field and the problem (codes in `ROW_REASONS`), and
    nothing else, whatever the row holds: one bad row must not stop a validation pass.
    """
    try:
        return _validate(row, max_chars)
    except InvalidRecord:
        raise
    except Exception as err:  # a row no rule foresaw: still a quarantine entry, not a crash
        raise InvalidRecord("unexpected", f"{type(err).__name__} while validating the row") from err


def _validate(row: dict, max_chars: int) -> PreferenceRecord:
    if not isinstance(row, dict):
        raise InvalidRecord("wrong_type", f"row must be a dict, got {type(row).__name__}")
    prompt, chosen, rejected = (_check_text(row, name, max_chars) for name in _TEXT_FIELDS)
    if visible_core(chosen) == visible_core(rejected):
        raise InvalidRecord("identical_responses", "fields 'chosen' and 'rejected' are the same text")
    user_id = _check_user_id(row)
    user_text = _check_optional_str(row, "user_text", max_chars)
    chosen_scores, rejected_scores = (_check_scores(row, name) for name in _SCORE_FIELDS)
    return PreferenceRecord(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        user_id=user_id,
        user_text=None if user_text is None or is_blank(user_text) else user_text,  # to_row writes "" for none
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        source=_check_optional_str(row, "source", max_chars) or "",
        context=check_context(row, prompt, max_chars),
    )
