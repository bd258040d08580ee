"""validate_row: every way a row can be bad is named; Quarantine: nothing is lost."""
import json
import random

import numpy as np
import pytest

from raypref.data.quarantine import Quarantine, QuarantineExceeded
from raypref.data.records import InvalidRecord, PreferenceRecord, validate_row


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


def test_quarantine_accounts_for_every_row(tmp_path):
    rng = random.Random(0)
    rows = [good_row(prompt=f"q{i}") for i in range(200)]
    for i in rng.sample(range(200), 37):  # break a random subset in random ways
        rows[i].update(rng.choice([{"chosen": ""}, {"user_id": -3}, {"rejected_scores": "{"}]))
    quarantine = Quarantine(tmp_path / "q" / "bad.jsonl", max_fraction=1.0)
    for line, row in enumerate(rows):
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
