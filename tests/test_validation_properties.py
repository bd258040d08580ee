"""Property tests: whatever a row holds, validate_row gives a record or a named InvalidRecord,
and the quarantine file takes the row and gives back its line number."""
import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st

from raypref.data.quarantine import Quarantine
from raypref.data.records import ROW_COLUMNS, ROW_REASONS, InvalidRecord, PreferenceRecord, validate_row

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text that may hold lone surrogates and NULs (st.characters() alone never draws surrogates)
nasty_chars = st.characters() | st.sampled_from(["\ud800", "\udfff", "\x00", "\n", " "])
nasty_text = st.text(nasty_chars, max_size=30)
# a readable text with one NUL or lone surrogate somewhere in it
spoiled_text = st.builds(lambda a, bad, b: a + bad + b, st.text(max_size=8),
                         st.sampled_from(["\ud800", "\udfff", "\x00"]), st.text(max_size=8))
# 10**5000 is built by map: hypothesis cannot repr() an int past 4300 digits as a strategy argument
huge_ints = (st.sampled_from([30, 400, 5000]).map(lambda e: 10**e) | st.sampled_from([-1, 0])
             | st.sampled_from([-10**30, 2**31, 2**31 - 1, 2**63, True, False]))
scalars = (st.none() | st.booleans() | st.integers() | huge_ints | st.floats() | nasty_text
           | st.binary(max_size=8))
json_like = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(nasty_text | st.integers(), inner, max_size=4), max_leaves=12)

GOOD = PreferenceRecord(prompt="Why?", chosen="Because.", rejected="No idea.", user_id=3, user_text="t",
                        chosen_scores={"h": 4.0}, rejected_scores={"h": 1.0}, source="s").to_row()
# one field of a valid row replaced (or removed): the shape most real bad rows have
mutated_rows = st.builds(
    lambda key, value, drop: {k: v for k, v in {**GOOD, key: value}.items() if not (drop and k == key)},
    st.sampled_from(ROW_COLUMNS) | nasty_text, json_like | spoiled_text
    | st.dictionaries(st.sampled_from(["h", "verbosity"]) | nasty_text,
                      st.floats() | huge_ints | st.none() | nasty_text, min_size=1, max_size=3)
    | st.builds(json.dumps, st.dictionaries(st.text(max_size=5), st.floats(), max_size=3)),
    st.booleans())
any_rows = mutated_rows | json_like | st.dictionaries(st.sampled_from(ROW_COLUMNS), json_like, max_size=8)


def check_one(row) -> str:
    """Apply the property to one row; return the outcome code ("valid" or the reason)."""
    try:
        record = validate_row(row)
    except InvalidRecord as err:
        assert err.code in ROW_REASONS and err.code != "unexpected", (err.code, err.detail)
        assert err.detail
        return err.code
    # a valid record must survive everything downstream: to_row, JSON, Arrow, re-validation
    flat = record.to_row()
    pa.Table.from_pylist([flat])
    json.dumps(flat).encode("utf-8")
    assert validate_row(flat) == record
    return "valid"


@FAST
@given(mutated_rows)
def test_rows_with_one_bad_field_are_valid_or_named(row):
    check_one(row)


@FAST
@given(any_rows)
def test_arbitrary_json_like_rows_are_valid_or_named(row):
    check_one(row)


@pytest.mark.parametrize("code", ["valid", "bad_text", "bad_user_id", "wrong_type", "non_finite_score",
                                  "missing_field"])
def test_the_row_strategy_reaches_each_outcome(code):
    """Guard against a vacuous property: the generator must produce valid rows and the
    reasons this module exists for (find() searches until one turns up)."""
    row = find(mutated_rows, lambda row: check_one(row) == code,
               settings=settings(max_examples=3000, deadline=None, database=None))
    assert check_one(row) == code


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(any_rows, min_size=1, max_size=5), st.integers(min_value=0, max_value=2**40))
def test_quarantine_file_takes_every_row_and_keeps_its_line(tmp_path, rows, first_line):
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    for offset, row in enumerate(rows):
        quarantine.add(reason="wrong_type", detail="d\ud800", shard="s.jsonl", line=first_line + offset, raw=row)
    with open(tmp_path / "q.jsonl", encoding="utf-8") as lines:
        entries = [json.loads(line) for line in lines]
    assert [e["line"] for e in entries] == [first_line + i for i in range(len(rows))]
    assert all(e["shard"] == "s.jsonl" and e["reason"] == "wrong_type" for e in entries)
    assert quarantine.summary()["rows_quarantined"] == len(rows)


plain_json = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | nasty_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4), max_leaves=12)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plain_json)
def test_quarantine_keeps_json_raw_rows_exactly_even_with_surrogates(tmp_path, raw):
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    quarantine.add(reason="wrong_type", detail="d", shard="s", line=7, raw=raw)
    entry = json.loads((tmp_path / "q.jsonl").read_text(encoding="utf-8"))
    assert entry["raw"] == raw and entry["line"] == 7
