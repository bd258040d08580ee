"""Loaders of public schemas, on fixture files in each schema (tests/fixtures/make_fixtures.py)."""
import json
from pathlib import Path

import pytest

from raypref.data.loaders import UserIdMap, load_records
from raypref.data.quarantine import Quarantine
from raypref.data.records import InvalidRecord

FIXTURES = Path(__file__).parent / "fixtures"


def load(name, schema, tmp_path, **options):
    quarantine = Quarantine(tmp_path / f"{schema}.quarantine.jsonl", max_fraction=1.0)
    records = list(load_records(str(FIXTURES / name), schema=schema, quarantine=quarantine, **options))
    entries = [json.loads(x) for x in quarantine.path.read_text().splitlines()]
    summary = quarantine.summary()
    assert summary["rows_total"] == summary["rows_valid"] + summary["rows_quarantined"]
    assert summary["rows_valid"] == len(records)
    return records, entries


def reasons(entries):
    return sorted((e["reason"], e["line"]) for e in entries)


def test_ultrafeedback_equal_weights(tmp_path):
    records, entries = load("ultrafeedback.jsonl", "ultrafeedback", tmp_path)
    tides, prime = records
    assert tides.chosen.startswith("Tides come from") and tides.rejected == "Tides are waves."
    assert tides.chosen_scores == {"helpfulness": 5, "honesty": 2, "instruction_following": 4, "truthfulness": 4}
    # "Seven." has honesty "N/A": it cannot be scored with equal weights, so it is not chosen
    assert prime.chosen == "Two is the smallest prime." and prime.rejected == "Nine."
    assert tides.source == "ultrafeedback:evol_instruct"
    assert reasons(entries) == [("tie", 3), ("unmappable", 4)]


def test_ultrafeedback_user_weights_choose_the_pair(tmp_path):
    honest = {"honesty": 1.0}
    records, _ = load("ultrafeedback.jsonl", "ultrafeedback", tmp_path, weights=honest, user_id=5,
                      user_text="values honesty")
    assert records[0].chosen.startswith("I am not sure") and records[0].user_id == 5
    helpful = {"helpfulness": 1.0}  # honesty weight 0: "N/A" honesty no longer matters
    records, _ = load("ultrafeedback.jsonl", "ultrafeedback", tmp_path, weights=helpful)
    assert records[0].chosen.startswith("Tides come from")
    assert records[1].chosen == "Seven." and "honesty" not in records[1].chosen_scores


def test_ultrafeedback_binarized_parquet(tmp_path):
    records, entries = load("ultrafeedback_binarized.parquet", "ultrafeedback_binarized", tmp_path)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        ("What is 2+2?", "4.", "5."), ("Capital of France?", "Paris.", "Lyon.")]
    assert records[0].chosen_scores == {"score": 9.0} and records[0].rejected_scores == {"score": 3.0}
    assert reasons(entries) == [("identical_responses", 3), ("tie", 2), ("unmappable", 4)]


def test_psoups_preference_file(tmp_path):
    records, entries = load("P1A.json", "psoups", tmp_path)
    assert len(records) == 2
    assert {r.user_text for r in records} == {"P1A"} and {r.source for r in records} == {"psoups:P1A"}
    assert records[0].chosen == "They train the immune system."  # completion_a is preferred
    assert reasons(entries) == [("empty_text", 2)]


def test_summarize_workers_map_to_stable_ids(tmp_path):
    id_file = tmp_path / "workers.json"
    records, entries = load("summarize_comparisons.jsonl", "summarize_from_feedback", tmp_path,
                            user_map_path=id_file)
    ids = json.loads(id_file.read_text())
    assert ids == {"w_alice": 1, "w_bob": 2}  # w_carol's only row was quarantined before mapping
    assert [r.user_id for r in records] == [1, 2, 1, 2]
    assert records[1].chosen == " The cat is lost, what to do?"  # choice 1
    assert records[0].prompt.startswith("SUBREDDIT: r/advice\nTITLE: Help me\nPOST: ")
    assert records[3].prompt == "POST: Rates rose today.\nTL;DR:"  # news article, no title
    assert reasons(entries) == [("undecodable_line", 5), ("unmappable", 4)]
    # a second run (another split) keeps the ids and extends them
    id_file.write_text(json.dumps({"w_bob": 1, "w_alice": 2, "w_zed": 3}))
    records, _ = load("summarize_comparisons.jsonl", "summarize_from_feedback", tmp_path, user_map_path=id_file)
    assert [r.user_id for r in records] == [2, 1, 2, 1]
    assert json.loads(id_file.read_text())["w_zed"] == 3


def test_prism_turns_become_pairs_with_user_profiles(tmp_path):
    user_map = UserIdMap()
    records, entries = load("prism_conversations.jsonl", "prism", tmp_path, user_map=user_map,
                            survey_path=FIXTURES / "prism_survey.jsonl")
    assert len(records) == 4  # c1: 2 rejected at turn 0 + 1 at turn 1; c2: 1 (one tie quarantined)
    turn0, _, turn1, coffee = records
    assert turn0.prompt == "User: Recommend a book.\nAssistant:" and turn0.chosen == "Try Dune."
    # later turns carry the history of the chosen replies
    assert turn1.prompt == ("User: Recommend a book.\nAssistant: Try Dune.\n"
                            "User: Something shorter?\nAssistant:")
    assert (turn1.chosen_scores, turn1.rejected_scores) == ({"score": 90.0}, {"score": 20.0})
    assert turn0.user_id == user_map.ids["user17"] != coffee.user_id == user_map.ids["user42"]
    assert "self_description: I am a teacher" in turn0.user_text
    assert "stated_prefs: fluency=90, factuality=100" in turn0.user_text
    assert coffee.rejected == "Yes."
    assert reasons(entries) == [("tie", 2), ("unmappable", 3)]


def test_without_quarantine_the_first_bad_row_raises_with_location():
    with pytest.raises(InvalidRecord, match=r"P1A\.json:2: field 'rejected' is empty"):
        list(load_records(str(FIXTURES / "P1A.json"), schema="psoups"))


def test_unknown_schema_and_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown schema 'hh'"):
        list(load_records(str(FIXTURES / "P1A.json"), schema="hh"))
    with pytest.raises(FileNotFoundError, match="neither an existing path"):
        list(load_records(str(tmp_path / "missing.jsonl"), schema="ultrafeedback"))
    with pytest.raises(ValueError, match="pass split="):  # hub names need a split (no download)
        list(load_records("openbmb/UltraFeedback", schema="ultrafeedback"))


def test_rows_of_unexpected_shape_are_quarantined(tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"instruction": "x", "completions": [{"annotations": "not a dict"}]}) + "\n"
                    + json.dumps({"instruction": "y", "completions": 3}) + "\n")
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    assert list(load_records(str(path), schema="ultrafeedback", quarantine=quarantine)) == []
    assert quarantine.summary()["by_reason"] == {"unmappable": 2}
