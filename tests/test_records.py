"""validate_row: every way a row can be bad is named; Quarantine: nothing is lost."""
import json
import random

import numpy as np
import pytest

from raypref.data.quarantine import Quarantine, QuarantineExceeded
from raypref.data.records import InvalidRecord, PreferenceRecord, render_context, validate_row


def good_row(**changes) -> dict:
    row = PreferenceRecord(prompt="Why?", chosen="Because.", rejected="No idea.", user_id=3,
                           user_text="likes short answers", chosen_scores={"helpfulness": 4.0},
                           rejected_scores={"helpfulness": 1.0}, source="test").to_row()
    row.update(changes)
    return row


def test_round_trip_of_to_row():
    record = PreferenceRecord(prompt="p", chosen="a", rejected="b", user_id=2, user_text="t",
                              chosen_scores={"x": 1.5}, rejected_scores={"x": -1.0}, source="s")
    assert validate_row(record.to_row()) == record


def test_scores_as_dicts_and_numpy_ids_are_accepted():
    record = validate_row(good_row(chosen_scores={"h": 2}, rejected_scores=None, user_id=np.int64(7)))
    assert record.chosen_scores == {"h": 2.0} and record.rejected_scores == {}
    assert record.user_id == 7 and type(record.user_id) is int


def test_empty_user_text_means_none_and_defaults_apply():
    record = validate_row({"prompt": "p", "chosen": "a", "rejected": "b", "user_text": ""})
    assert record.user_text is None and record.user_id == 0 and record.source == ""


@pytest.mark.parametrize("changes, code, names", [
    ({"prompt": None}, "missing_field", "'prompt'"),
    ({"chosen": 5}, "wrong_type", "'chosen'"),
    ({"rejected": "   \n"}, "empty_text", "'rejected'"),
    ({"rejected": " Because. "}, "identical_responses", "'chosen' and 'rejected'"),
    ({"chosen_scores": json.dumps({"helpfulness": float("nan")})}, "non_finite_score", "chosen_scores['helpfulness']"),
    ({"rejected_scores": {"verbosity": float("inf")}}, "non_finite_score", "rejected_scores['verbosity']"),
    ({"chosen_scores": '{"h": 1'}, "bad_scores_json", "'chosen_scores'"),
    ({"chosen_scores": "[1, 2]"}, "wrong_type", "'chosen_scores'"),
    ({"chosen_scores": {"h": "high"}}, "wrong_type", "chosen_scores['h']"),
    ({"user_id": -1}, "bad_user_id", ">= 0"),
    ({"user_id": "7"}, "bad_user_id", "int"),
    ({"user_id": True}, "bad_user_id", "int"),
    ({"user_text": 12}, "wrong_type", "'user_text'"),
    # the rules for hostile input: each is a quarantine entry, never a crash
    ({"user_id": 10**30}, "bad_user_id", "<= 2147483647, got 1000000000000000000000000000000"),
    ({"user_id": 2**31}, "bad_user_id", "<= 2147483647"),
    ({"user_id": 10**5000}, "bad_user_id", "an int of 16610 bits"),
    ({"user_id": 1.5}, "bad_user_id", "got float"),
    ({"user_id": 7.0}, "bad_user_id", "got float"),
    ({"prompt": "a\x00b"}, "bad_text", "'prompt' holds a NUL character at index 1"),
    ({"chosen": "ok \ud800"}, "bad_text", "'chosen' holds a lone surrogate at index 3"),
    ({"user_text": "\udfff"}, "bad_text", "'user_text'"),
    ({"source": "s\x00"}, "bad_text", "'source'"),
    ({"chosen_scores": {"h": 10**400}}, "non_finite_score", "chosen_scores['h'] is too large"),
    ({"chosen_scores": '{"h": 1e400}'}, "non_finite_score", "chosen_scores['h'] is not finite (inf)"),
    ({"chosen_scores": '{"h": ' + "9" * 5000 + "}"}, "bad_scores_json", "'chosen_scores'"),
    ({"chosen_scores": "[" * 50000}, "bad_scores_json", "'chosen_scores'"),
    ({"chosen_scores": [1.0, 2.0]}, "wrong_type", "got list"),
    ({"chosen_scores": {"h": {"nested": 1}}}, "wrong_type", "chosen_scores['h'] must be a number, got dict"),
    ({"chosen_scores": {"h": None}}, "wrong_type", "got NoneType"),
    ({"chosen_scores": {3: 1.0}}, "wrong_type", "chosen_scores names must be str, got int"),
    ({"chosen_scores": {"": 1.0}}, "empty_text", "empty score name"),
    ({"chosen_scores": '{"\\ud800": 1}'}, "bad_text", "lone surrogate"),
    ({"rejected_scores": np.array([1.0])}, "wrong_type", "got ndarray"),
    # text that shows nothing is empty text, zero-width characters included
    ({"prompt": "\u200b"}, "empty_text", "'prompt'"),
    ({"chosen": " \u200c\u200d\u2060\ufeff\n"}, "empty_text", "'chosen'"),
    ({"rejected": "\u3164\u2800\u00ad"}, "empty_text", "'rejected'"),
    ({"rejected": "\ufeffBecause.\u200b"}, "identical_responses", "the same text"),
    ({"chosen_scores": {"\u200b": 1.0}}, "empty_text", "empty score name"),
    # caps on scores: a handful of named ratings, not an unbounded dict
    ({"chosen_scores": {f"s{i}": 1.0 for i in range(65)}}, "too_many_scores", "65 scores > 64"),
    ({"chosen_scores": json.dumps({f"s{i}": 1.0 for i in range(65)})}, "too_many_scores", "65 scores"),
    ({"chosen_scores": {"h" * 65: 1.0}}, "too_long", "score name of 65 chars > 64"),
    ({"chosen_scores": '{"h": 1}' + " " * 70000}, "too_long", "chars of JSON > 65536"),
])
def test_invalid_rows_name_the_problem(changes, code, names):
    with pytest.raises(InvalidRecord) as err:
        validate_row(good_row(**changes))
    assert err.value.code == code
    assert names in err.value.detail


def test_missing_field_entirely():
    row = good_row()
    del row["chosen"]
    with pytest.raises(InvalidRecord, match="missing_field: field 'chosen' is missing"):
        validate_row(row)


def test_too_long_names_field_and_length():
    validate_row(good_row(chosen="x" * 50), max_chars=50)
    with pytest.raises(InvalidRecord, match=r"'chosen' has 51 chars > max_chars=50"):
        validate_row(good_row(chosen="x" * 51), max_chars=50)


def test_non_dict_row():
    with pytest.raises(InvalidRecord, match="row must be a dict"):
        validate_row(["p", "a", "b"])
    for row in (None, b"{}", "row", 7, float("nan")):
        with pytest.raises(InvalidRecord, match="wrong_type"):
            validate_row(row)


def test_largest_user_id_and_numpy_scores_are_valid():
    record = validate_row(good_row(user_id=2**31 - 1, chosen_scores={"h": np.float32(0.5)}))
    assert record.user_id == 2**31 - 1 and record.chosen_scores == {"h": 0.5}


def test_unforeseen_failures_still_raise_invalid_record():
    class Hostile(dict):  # a row whose lookups raise something no rule names
        def get(self, *args):
            raise RuntimeError("boom")
    with pytest.raises(InvalidRecord) as err:
        validate_row(Hostile(prompt="p", chosen="a", rejected="b"))
    assert err.value.code == "unexpected" and "RuntimeError" in err.value.detail


def test_quarantine_writes_hostile_raw_rows(tmp_path):
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    hostile = {"prompt": "\ud800", "user_id": 10**5000, "n": 10**30, "x": float("nan"), "b": b"\xff\x00",
               (1, 2): "tuple key", "arr": np.arange(3), "obj": object()}
    quarantine.add(reason="bad_text", detail="d", shard="s", line=12, raw=hostile)
    quarantine.add(reason="wrong_type", detail="d", shard="s", line=13, raw=[[[[["deep"]]]]])
    text = (tmp_path / "q.jsonl").read_text(encoding="utf-8")
    first, second = (json.loads(line) for line in text.splitlines())  # strict JSON: no NaN
    assert first["line"] == 12 and second["raw"] == [[[[["deep"]]]]]
    raw = first["raw"]
    assert raw["prompt"] == "\ud800"  # ASCII-escaped in the file, read back exactly
    assert raw["user_id"] == "<int of 16610 bits>" and raw["n"] == str(10**30) and raw["x"] == "nan"
    assert raw["b"] == "\\xff\x00" and raw["[1, 2]"] == "tuple key" and raw["arr"] == [0, 1, 2]
    assert raw["obj"].startswith("<object: <object object")


def test_quarantine_accounts_for_every_row(tmp_path):
    rng = random.Random(0)
    rows = [good_row(prompt=f"q{i}") for i in range(200)]
    for i in rng.sample(range(200), 37):  # break a random subset in random ways
        rows[i].update(rng.choice([{"chosen": ""}, {"user_id": -3}, {"rejected_scores": "{"}]))
    quarantine = Quarantine(tmp_path / "q" / "bad.jsonl", max_fraction=1.0)
    for line, row in enumerate(rows):
        quarantine.count_rows()
        try:
            validate_row(row)
            quarantine.count_valid()
        except InvalidRecord as err:
            quarantine.add(reason=err.code, detail=err.detail, shard="mem", line=line, raw=row)
    summary = quarantine.check()
    assert summary["rows_total"] == 200 == summary["rows_valid"] + summary["rows_quarantined"]
    assert summary["rows_quarantined"] == 37 == sum(summary["by_reason"].values())
    assert set(summary["by_reason"]) <= {"empty_text", "bad_user_id", "bad_scores_json"}
    entries = [json.loads(x) for x in (tmp_path / "q" / "bad.jsonl").read_text().splitlines()]
    assert len(entries) == 37
    assert all(rows[e["line"]] == e["raw"] and e["shard"] == "mem" for e in entries)


def test_fraction_limit_raises_with_fraction_limit_and_path(tmp_path):
    quarantine = Quarantine(tmp_path / "bad.jsonl", max_fraction=0.25)
    quarantine.count_valid(3)
    quarantine.add(reason="empty_text", detail="d", shard="s", line=1, raw="r")
    assert quarantine.check()["rows_quarantined"] == 1  # 1/4 is at the limit, allowed
    quarantine.add(reason="empty_text", detail="d", shard="s", line=2, raw="r")
    with pytest.raises(QuarantineExceeded, match=r"0\.400 > max_quarantine_fraction 0\.25.*bad\.jsonl"):
        quarantine.check()


def test_finish_shard_counts_each_shard_once(tmp_path):
    quarantine = Quarantine(tmp_path / "bad.jsonl")
    entry = dict(reason="tie", detail="d", shard="a", line=3, raw={})
    quarantine.finish_shard("a", 5, [entry])
    quarantine.finish_shard("a", 5, [entry])  # a retried task
    quarantine.finish_shard("b", 2, [])
    assert quarantine.summary()["rows_total"] == 8
    assert len((tmp_path / "bad.jsonl").read_text().splitlines()) == 1


def test_bad_fraction_and_stale_file(tmp_path):
    with pytest.raises(ValueError, match="max_quarantine_fraction"):
        Quarantine(tmp_path / "q.jsonl", max_fraction=1.5)
    (tmp_path / "q.jsonl").write_text("old run\n")
    Quarantine(tmp_path / "q.jsonl")
    assert (tmp_path / "q.jsonl").read_text() == ""


def test_blank_user_text_means_none():
    assert validate_row(good_row(user_text="\u200b \ufeff")).user_text is None
    assert validate_row(good_row(user_text="\u200bteacher")).user_text == "\u200bteacher"
    assert validate_row(good_row(chosen_scores={"h" * 64: 1.0})).chosen_scores == {"h" * 64: 1.0}


def test_quarantined_rows_are_truncated_with_their_length(tmp_path):
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    huge = {"prompt": "p" * 5_000_000, "chosen": "a"}
    quarantine.add(reason="too_long", detail="d" * 10_000, shard="s", line=1, raw=huge)
    quarantine.add(reason="empty_text", detail="d", shard="s", line=2, raw={"prompt": ""})
    text = (tmp_path / "q.jsonl").read_text()
    assert len(text) < 70_000  # before: the 5 MB row was stored whole
    first, second = map(json.loads, text.splitlines())
    full = json.dumps(huge, ensure_ascii=False)
    assert first["raw"] == full[:64 * 1024] and first["raw_chars"] == len(full)
    assert len(first["detail"]) < 2100 and first["detail"].endswith("(10000 chars)")
    assert second["raw"] == {"prompt": ""} and "raw_chars" not in second  # small rows stay as they are


def test_quarantine_file_stops_growing_at_its_limits(tmp_path):
    entries = [dict(reason="tie", detail="d", shard="s", line=i, raw={"i": i}) for i in range(1000)]
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0, max_entries=10)
    quarantine.add_many(entries)  # one call: the limit holds inside it, entry by entry
    quarantine.add(**entries[0])
    lines = (tmp_path / "q.jsonl").read_text().splitlines()
    assert [json.loads(x)["line"] for x in lines] == list(range(10))
    summary = quarantine.summary()
    assert summary["rows_quarantined"] == 1001 and summary["entries_omitted"] == 991
    assert summary["by_reason"] == {"tie": 1001}  # omitted entries still count
    sized = Quarantine(tmp_path / "b.jsonl", max_fraction=1.0, max_bytes=1000)
    sized.add_many(entries)
    assert 0 < (tmp_path / "b.jsonl").stat().st_size <= 1000
    assert sized.summary()["entries_omitted"] == 1000 - len((tmp_path / "b.jsonl").read_text().splitlines())


# ---------------------------------------------------------------- conversation context

TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A colour?"},
         {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
TRANSCRIPT = "System: Be brief.\nUser: A colour?\nAssistant: Red.\nUser: Another?\nAssistant:"


def test_a_conversation_context_round_trips_as_json_text():
    record = PreferenceRecord(prompt=TRANSCRIPT, chosen="Blue.", rejected="Red again.", context=TURNS)
    row = record.to_row()
    assert json.loads(row["context"]) == TURNS and good_row()["context"] == ""  # none: empty text
    assert validate_row(row) == record and validate_row(row).prompt_or_context == TURNS
    assert validate_row(good_row()).prompt_or_context == "Why?"
    # a lone user turn is the prompt itself: no context kept
    assert validate_row(good_row(context=[{"role": "user", "content": "Why?"}])).context is None


@pytest.mark.parametrize("context, code, detail", [
    ("[not json", "bad_context", "not valid JSON"),
    ([], "bad_context", "non-empty list"),
    ([{"role": "robot", "content": "Why?"}], "bad_context", "context[0] is not a message"),
    ([{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Hm."}], "bad_context",
     "role 'assistant', not 'user'"),
    ([{"role": "system", "content": " "}, {"role": "user", "content": "Why?"}], "empty_text", "context[0]"),
    ([{"role": "user", "content": "How?"}], "bad_context", "not the transcript"),  # disagrees with the prompt
])
def test_a_bad_context_names_the_problem(context, code, detail):
    with pytest.raises(InvalidRecord) as info:
        validate_row(good_row(context=json.dumps(context) if isinstance(context, list) else context))
    assert info.value.code == code and detail in info.value.detail


def test_a_row_written_before_the_context_column_reads_as_before():
    row = good_row()
    del row["context"]
    assert validate_row(row).context is None


def test_a_context_at_the_length_limit_reads_back_whatever_its_characters():
    turns = [{"role": "user", "content": "\U0001F600" * 20}, {"role": "assistant", "content": "\x01" * 10},
             {"role": "user", "content": "?"}]
    record = PreferenceRecord(prompt=render_context(turns), chosen="a", rejected="b", context=turns)
    limit = len(record.prompt)
    assert validate_row(record.to_row(), max_chars=limit) == record
    with pytest.raises(InvalidRecord, match="too_long"):
        validate_row(record.to_row(), max_chars=limit - 1)
