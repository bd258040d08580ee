"""Loaders of public schemas, on fixture files in each schema (tests/fixtures/make_fixtures.py)."""
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypref.data.loaders import UserIdMap, get_schema, load_records, load_validated
from raypref.data.quarantine import Quarantine, QuarantineExceeded
from raypref.data.records import InvalidRecord

FIXTURES = Path(__file__).parent / "fixtures"


def load(name, schema, tmp_path, **options):
    quarantine = Quarantine(tmp_path / f"{schema}.quarantine.jsonl", max_fraction=1.0)
    records = list(load_records(str(FIXTURES / name), schema=schema, quarantine=quarantine, **options))
    entries = [json.loads(x) for x in quarantine.path.read_text().splitlines()]
    summary = quarantine.summary()
    # rows_total counts source rows, whatever number of records or entries each gives
    assert summary["rows_total"] == source_rows(FIXTURES / name)
    assert summary["rows_valid"] == len(records) and len(entries) == summary["rows_quarantined"]
    return records, entries


def source_rows(path: Path) -> int:
    if path.suffix == ".parquet":
        return pq.read_metadata(path).num_rows
    if path.suffix == ".json":
        return len(json.loads(path.read_text()))
    return sum(1 for line in path.read_text().splitlines() if line.strip())


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


def psoups_line(i: int) -> str:
    return json.dumps({"user_input": f"question {i}?", "completion_a": f"good {i}", "completion_b": f"bad {i}"})


def write_corrupt_folder(folder: Path) -> None:
    """One good jsonl with a bad-UTF-8 line, and four shards that cannot be read (whole or in part)."""
    folder.mkdir()
    lines = [psoups_line(i).encode() for i in range(3)]
    (folder / "a.jsonl").write_bytes(b"\n".join(lines[:2] + [b'{"user_input": "\xff\xfe"}', lines[2]]) + b"\n")
    whole = gzip.compress("".join(psoups_line(i) + "\n" for i in range(2000)).encode(), mtime=0)
    (folder / "b.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a gzip that ends early
    pq.write_table(pa.Table.from_pylist([{"user_input": "q", "completion_a": "a", "completion_b": "b"}] * 50),
                   folder / "c.parquet")
    (folder / "c.parquet").write_bytes((folder / "c.parquet").read_bytes()[:200])  # truncated: no footer
    (folder / "d.jsonl").write_bytes(bytes(range(256)) * 8)  # binary garbage under a jsonl name
    (folder / "e.jsonl").symlink_to(folder / "gone.jsonl")  # listed, but cannot be opened


def test_unreadable_shards_are_quarantined_by_name(tmp_path):
    write_corrupt_folder(tmp_path / "data")
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    records = list(load_records(str(tmp_path / "data"), schema="psoups", preference="P1A", quarantine=quarantine))
    summary = quarantine.check()
    names = {Path(shard).name: detail for shard, detail in summary["bad_shards"].items()}
    assert set(names) == {"b.jsonl.gz", "c.parquet", "d.jsonl", "e.jsonl"}
    assert "EOFError" in names["b.jsonl.gz"] and "NUL byte" in names["d.jsonl"]
    assert "FileNotFoundError" in names["e.jsonl"] and names["c.parquet"].startswith("unreadable from row 0 on")
    assert summary["shards_total"] == 5
    assert summary["by_reason"] == {"undecodable_line": 1, "unreadable_shard": 4}
    # rows read before the gzip broke are kept; each unreadable part is one quarantined unit
    from_gzip = len(records) - 3  # a.jsonl gives 3
    assert 0 < from_gzip < 2000 and records[3].prompt == "question 0?"
    assert summary["rows_total"] == summary["rows_valid"] + summary["rows_quarantined"] == len(records) + 5
    entries = {Path(e["shard"]).name: e for e in map(json.loads, quarantine.path.read_text().splitlines())
               if e["reason"] == "unreadable_shard"}
    assert entries["b.jsonl.gz"]["line"] == from_gzip + 1  # the first gzip line not read (1-based)
    assert entries["c.parquet"]["line"] == 0 and entries["e.jsonl"]["raw"] is None


def test_unreadable_shards_count_against_the_limit_and_raise_by_name(tmp_path):
    write_corrupt_folder(tmp_path / "data")
    # rows: 5 quarantined units of thousands, far under 0.5; shards: 4 of 5 bad
    with pytest.raises(QuarantineExceeded, match=r"4 of 5 shards unreadable \(fraction 0\.800 > .*0\.5\).*c\.parquet"):
        load_validated(str(tmp_path / "data"), schema="psoups", preference="P1A",
                       quarantine_path=tmp_path / "q.jsonl", max_quarantine_fraction=0.5)
    with pytest.raises(InvalidRecord, match=r"b\.jsonl\.gz:\d+: unreadable from line \d+ on: EOFError"):
        list(load_records(str(tmp_path / "data" / "b.jsonl.gz"), schema="psoups", preference="P1A"))


def test_load_validated_returns_records_and_summary(tmp_path):
    records, summary = load_validated(str(FIXTURES / "P1A.json"), schema="psoups", preference="P1A",
                                      quarantine_path=tmp_path / "q" / "P1A.jsonl", max_quarantine_fraction=0.5)
    assert [r.user_text for r in records] == ["P1A", "P1A"]
    assert summary["rows_total"] == 3 and summary["by_reason"] == {"empty_text": 1}
    assert json.loads((tmp_path / "q" / "P1A.jsonl").read_text())["line"] == 2
    with pytest.raises(QuarantineExceeded, match=r"1 of 3 rows quarantined"):
        load_validated(str(FIXTURES / "P1A.json"), schema="psoups", preference="P1A",
                       quarantine_path=tmp_path / "q.jsonl", max_quarantine_fraction=0.2)


def test_schema_registry_names_the_known_schemas():
    assert get_schema("prism").hub_config == "conversations" and get_schema("prism").uses_user_map
    assert not get_schema("ultrafeedback").uses_user_map
    with pytest.raises(ValueError, match=r"unknown schema 'hh'; known: \['helpsteer', 'prism', 'psoups', 'summarize_from_feedback', "
                                         r"'trl', 'ultrafeedback', 'ultrafeedback_binarized'\]"):
        get_schema("hh")



def test_helpsteer_pairs_responses_of_one_prompt(tmp_path):
    records, entries = load("helpsteer.jsonl", "helpsteer", tmp_path)
    tides = [r for r in records if r.prompt == "Why are there tides?"]
    assert len(tides) == 3  # three responses: every pair once
    assert {(r.chosen[:8], r.rejected[:8]) for r in tides} == {
        ("The moon", "Because "), ("Tides co", "Because "), ("The moon", "Tides co")}
    best = next(r for r in tides if r.rejected.startswith("Tides"))
    assert best.chosen_scores == {"helpfulness": 4.0, "correctness": 4.0, "coherence": 4.0,
                                  "complexity": 1.0, "verbosity": 1.0}
    assert best.rejected_scores["verbosity"] == 2.0 and best.source == "helpsteer"
    add = [r for r in records if r.prompt == "Add 2 and 2."]
    assert [(r.chosen, r.rejected) for r in add] == [("4", "Two plus two is four.")]
    assert len(records) == 10
    assert [e["reason"] for e in sorted(entries, key=lambda e: e["line"])] == ["tie", "unmappable"]
    assert "helpfulness=5" in next(e["detail"] for e in entries if e["reason"] == "unmappable")
    # weights decide: verbosity alone prefers the longer colour answer
    records, _ = load("helpsteer.jsonl", "helpsteer", tmp_path, weights={"verbosity": 1.0})
    colour = [r for r in records if r.prompt == "Name a color."]
    assert [r.chosen for r in colour] == ["Blue is a color of the sky and the sea."]
    with pytest.raises(ValueError, match="unknown attribute.*'length'"):
        load("helpsteer.jsonl", "helpsteer", tmp_path, weights={"length": 1.0})


# ---------------------------------------------------------------- inputs that must not amplify

def helpsteer_row(prompt, response, quality=3):
    return {"prompt": prompt, "response": response, "helpfulness": quality, "correctness": quality,
            "coherence": quality, "complexity": 0, "verbosity": 0}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_file(path: Path, schema, tmp_path, **options):
    quarantine = Quarantine(tmp_path / "q.jsonl", max_fraction=1.0)
    records = list(load_records(str(path), schema=schema, quarantine=quarantine, **options))
    return records, [json.loads(x) for x in quarantine.path.read_text().splitlines()], quarantine.summary()


@pytest.mark.parametrize("prompt", [None, "", "\u200b\u200c\u200d\u2060\ufeff"])
def test_helpsteer_rows_without_a_prompt_are_quarantined_once_each(tmp_path, prompt):
    # before: 400 such rows formed one run and were paired with each other, 79,800 entries
    rows = [helpsteer_row(prompt, f"answer {i}", quality=i % 5) for i in range(400)]
    records, entries, summary = load_file(write_jsonl(tmp_path / "h.jsonl", rows), "helpsteer", tmp_path)
    assert records == [] and len(entries) == 400 == summary["rows_total"]
    assert {e["reason"] for e in entries} == {"missing_field" if prompt is None else "empty_text"}
    assert [e["line"] for e in entries] == list(range(1, 401))


def test_helpsteer_comparisons_per_prompt_are_capped(tmp_path):
    rows = [helpsteer_row("One prompt?", f"answer {i}", quality=i % 5) for i in range(30)]
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    records, entries, summary = load_file(path, "helpsteer", tmp_path)
    # default cap 10: the first 5 responses are compared (10 pairs and ties), the other 25 rows
    # are one entry each; before, all 30 were compared: 435 outcomes
    outcomes = len(records) + sum(e["reason"] == "tie" for e in entries)
    assert outcomes == 10 and sum(e["reason"] == "too_many_pairs" for e in entries) == 25
    assert summary["rows_total"] == 30
    records, entries, _ = load_file(path, "helpsteer", tmp_path, max_pairs_per_prompt=3)
    assert len(records) + sum(e["reason"] == "tie" for e in entries) == 3  # 3 responses, 3 pairs
    assert "max_pairs_per_prompt=3" in next(e["detail"] for e in entries if e["reason"] == "too_many_pairs")
    with pytest.raises(ValueError, match="max_pairs_per_prompt must be an int >= 1"):
        load_file(path, "helpsteer", tmp_path, max_pairs_per_prompt=0)


def prism_turn(turn, n_replies=2):
    replies = [{"turn": turn, "role": "model", "content": f"reply {turn}.{k}", "score": 90 - k,
                "if_chosen": k == 0} for k in range(n_replies)]
    return [{"turn": turn, "role": "user", "content": f"question {turn}"}] + replies


def test_prism_conversation_without_a_pair_is_quarantined_with_its_reason(tmp_path):
    rows = [{"conversation_id": "empty", "user_id": "u1", "conversation_history": []},
            {"conversation_id": "ok", "user_id": "u2", "conversation_history": prism_turn(0, 3)}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    records, entries, summary = load_file(path, "prism", tmp_path, user_map=UserIdMap())
    assert len(records) == 2  # the second conversation: 1 chosen against 2 others
    assert [(e["line"], e["reason"]) for e in entries] == [(1, "unmappable")]  # before: no entry at all
    assert "'conversation_history' is empty" in entries[0]["detail"]
    assert summary["rows_total"] == 2  # source rows; before: 2 (the pairs), the empty one not counted


def test_prism_comparisons_per_conversation_are_capped(tmp_path):
    history = [message for turn in range(100) for message in prism_turn(turn)]
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversation_id": "long", "user_id": "u", "conversation_history": history}])
    records, entries, summary = load_file(path, "prism", tmp_path, user_map=UserIdMap(), max_pairs_per_conversation=5)
    assert len(records) == 5 and records[-1].prompt.count("User:") == 5
    assert [e["reason"] for e in entries] == ["too_many_pairs"] and "turn 5" in entries[0]["detail"]
    records, _, _ = load_file(path, "prism", tmp_path, user_map=UserIdMap())
    assert len(records) == 64  # the default cap; before, 100 pairs with prompts of up to 100 turns


def test_rows_total_counts_source_rows_not_pairs(tmp_path):
    records, entries, summary = load_file(FIXTURES / "prism_conversations.jsonl", "prism", tmp_path,
                                          user_map=UserIdMap())
    # 3 conversations gave 4 pairs and 2 entries; before, rows_total was 6 (pairs + entries)
    assert (summary["rows_total"], summary["rows_valid"], summary["rows_quarantined"]) == (3, 4, 2)


def test_long_jsonl_lines_are_quarantined_without_being_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr("raypref.data.loaders.MAX_LINE_BYTES", 1000)
    long_row = json.dumps({"user_input": "q" * 5000, "completion_a": "a", "completion_b": "b"})
    path = tmp_path / "P1A.jsonl"
    path.write_text(psoups_line(0) + "\n" + long_row + "\n" + psoups_line(1) + "\n" + "x" * 1500)
    records, entries, summary = load_file(path, "psoups", tmp_path, preference="P1A")
    assert [r.prompt for r in records] == ["question 0?", "question 1?"]  # line numbers stay right
    assert [(e["line"], e["reason"]) for e in entries] == [(2, "line_too_long"), (4, "line_too_long")]
    assert f"{len(long_row)} bytes > max_line_bytes=1000" in entries[0]["detail"]
    assert entries[0]["raw"] == long_row[:1000] and "1500 bytes" in entries[1]["detail"]
    assert summary["rows_total"] == 4


@pytest.mark.parametrize("length, refused", [(999, False), (1000, False), (1001, True), (5000, True)])
def test_line_limit_is_exact(length, refused):
    import io

    from raypref.data.loaders import iter_jsonl_rows
    line = json.dumps({"k": "v" * (length - 9)}).encode()
    assert len(line) == length
    rows = list(iter_jsonl_rows(io.BytesIO(line + b'\n{"next": 1}\n'), max_line_bytes=1000))
    assert [number for number, _, _ in rows] == [1, 2] and rows[1][1] == {"next": 1}
    assert isinstance(rows[0][1], InvalidRecord) == refused
    last = list(iter_jsonl_rows(io.BytesIO(line), max_line_bytes=1000))  # a last line without newline
    assert len(last) == 1 and isinstance(last[0][1], InvalidRecord) == refused
