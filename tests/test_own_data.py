"""Bring your own data: TRL's preference formats from jsonl, parquet, save_to_disk folders and
(where reachable) the hub, through the loaders' validation and quarantine. Every file is
written by the test itself."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypref.data.loaders import UserIdMap, WrongColumns, load_records, load_validated
from raypref.data.quarantine import Quarantine

STANDARD = [
    {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."},
    {"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away.", "score_chosen": 8.0, "score_rejected": 2.0},
    {"prompt": "Count to two.", "chosen": "One, two.", "rejected": "Seven."},
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows, extra_lines=()):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(extra_lines))
    return path


def load(path, tmp_path, **options):
    quarantine = Quarantine(tmp_path / "quarantine.jsonl")
    records = list(load_records(str(path), schema="trl", quarantine=quarantine, **options))
    return records, quarantine.summary(), [json.loads(x) for x in (tmp_path / "quarantine.jsonl").read_text().splitlines()] \
        if (tmp_path / "quarantine.jsonl").exists() else []


def test_standard_jsonl_with_malformed_rows_quarantined_and_counted(tmp_path):
    bad = [{"prompt": "Q?", "chosen": "A.", "rejected": "  "},          # blank response
           {"prompt": "Q?", "chosen": "Same.", "rejected": "Same."},     # no preference
           {"prompt": 3, "chosen": "A.", "rejected": "B."}]              # prompt not text
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD + bad, extra_lines=["{not json\n"])
    records, summary, entries = load(path, tmp_path)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        (r["prompt"], r["chosen"], r["rejected"]) for r in STANDARD]
    assert records[1].chosen_scores == {"score": 8.0} and records[1].rejected_scores == {"score": 2.0}
    assert records[0].user_id == 0 and records[0].source == "trl"
    assert summary["rows_total"] == 7 and summary["rows_valid"] == 3 and summary["rows_quarantined"] == 4
    assert summary["by_reason"] == {"empty_text": 1, "identical_responses": 1, "undecodable_line": 1,
                                    "wrong_type": 1}
    assert sorted(e["line"] for e in entries) == [4, 5, 6, 7]
    assert all(e["shard"] == str(path) for e in entries)


def test_conversational_jsonl_last_assistant_turn_is_the_response(tmp_path):
    rows = [
        # implicit prompt: the conversations carry their context
        {"chosen": [user("Hi?"), assistant("Hello.")], "rejected": [user("Hi?"), assistant("Bye.")]},
        # explicit prompt as messages, responses alone
        {"prompt": [user("Capital of France?")], "chosen": [assistant("Paris.")],
         "rejected": [assistant("Rome.")]},
        # a system message and earlier turns: a transcript
        {"prompt": [{"role": "system", "content": "Be brief."}, user("A colour?"), assistant("Red."),
                    user("Another?")], "chosen": [assistant("Blue.")], "rejected": [assistant("Red again.")]},
        # binarized UltraFeedback's layout: prompt text repeating the conversation's first user turn
        {"prompt": "2+2?", "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]},
    ]
    bad = [
        {"chosen": [user("A?"), assistant("x")], "rejected": [user("B?"), assistant("y")]},  # different context
        {"prompt": "Q?", "chosen": [assistant("x"), user("y")], "rejected": [assistant("z")]},  # ends with user
        {"chosen": [assistant("x")], "rejected": [assistant("y")]},  # no context at all
        {"prompt": "Q?", "chosen": [{"role": "robot", "content": "x"}], "rejected": [assistant("y")]},
    ]
    records, summary, entries = load(write_jsonl(tmp_path / "chat.jsonl", rows + bad), tmp_path)
    assert [(r.prompt, r.chosen, r.rejected) for r in records] == [
        ("Hi?", "Hello.", "Bye."),
        ("Capital of France?", "Paris.", "Rome."),
        ("System: Be brief.\nUser: A colour?\nAssistant: Red.\nUser: Another?\nAssistant:", "Blue.", "Red again."),
        ("2+2?", "4", "5"),
    ]
    # the conversation before the response stays turns (for a chat template); a lone user turn needs none
    assert [r.context for r in records] == [None, None, rows[2]["prompt"], None]
    assert summary["by_reason"] == {"missing_field": 1, "unmappable": 3}
    details = sorted(e["detail"] for e in entries)
    assert any("differ before their last assistant message" in d for d in details)
    assert any("does not end with an assistant message" in d for d in details)
    assert any("chosen[0] is not a message" in d for d in details)


def test_binarized_ultrafeedback_reads_the_same_as_trl_conversations(tmp_path):
    from pathlib import Path

    fixture = str(Path(__file__).parent / "fixtures" / "ultrafeedback_binarized.parquet")
    quarantine = Quarantine(tmp_path / "a.jsonl")
    as_trl = list(load_records(fixture, schema="trl", quarantine=quarantine))
    assert quarantine.summary()["by_reason"] == {"identical_responses": 1, "tie": 1, "unmappable": 1}
    as_own = list(load_records(fixture, schema="ultrafeedback_binarized", quarantine=Quarantine(tmp_path / "b.jsonl")))
    assert len(as_trl) == 2  # of 5 rows: one tie, one identical pair, one not ending with the assistant
    assert [(r.prompt, r.chosen, r.rejected, r.chosen_scores) for r in as_trl] == [
        (r.prompt, r.chosen, r.rejected, r.chosen_scores) for r in as_own]


def test_parquet_file_and_folder_of_shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(STANDARD[:2]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(STANDARD[2:]), folder / "part-1.parquet")
    records, summary, _ = load(folder / "part-0.parquet", tmp_path)
    assert [r.chosen for r in records] == ["An apple.", "Hello!"]
    records, summary, _ = load(folder, tmp_path)
    assert [r.chosen for r in records] == ["An apple.", "Hello!", "One, two."]
    assert summary["shards_total"] == 2 and summary["rows_quarantined"] == 0


def test_conversational_parquet(tmp_path):
    rows = [{"chosen": [user(f"Q{i}?"), assistant(f"good {i}")], "rejected": [user(f"Q{i}?"), assistant(f"bad {i}")]}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    records, _, _ = load(tmp_path / "chat.parquet", tmp_path)
    assert [(r.prompt, r.chosen) for r in records] == [(f"Q{i}?", f"good {i}") for i in range(3)]


def test_save_to_disk_folders(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(STANDARD).save_to_disk(str(tmp_path / "one"))
    records, summary, _ = load(tmp_path / "one", tmp_path)
    assert [r.chosen for r in records] == ["An apple.", "Hello!", "One, two."] and summary["shards_total"] == 1

    chat = [{"chosen": [user("Hi?"), assistant("Hello.")], "rejected": [user("Hi?"), assistant("")]},
            {"chosen": [user("Yo?"), assistant("Hey.")], "rejected": [user("Yo?"), assistant("No.")]}]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(chat),
                                   "test": datasets.Dataset.from_list(STANDARD)})
    splits.save_to_disk(str(tmp_path / "dict"))
    records, summary, entries = load(tmp_path / "dict", tmp_path, split="train")
    assert [r.chosen for r in records] == ["Hey."]
    assert summary["by_reason"] == {"empty_text": 1} and entries[0]["shard"].endswith("dict:train")
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]; pass one as split="):
        list(load_records(str(tmp_path / "dict"), schema="trl"))


def test_wrong_columns_one_error_naming_file_found_and_expected(tmp_path):
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q?", "completion": "A.", "label": True}] * 3)
    with pytest.raises(WrongColumns) as err:
        load_validated(str(kto), schema="trl", quarantine_path=tmp_path / "q.jsonl")
    message = str(err.value)
    assert str(kto) in message
    assert "found ['prompt', 'completion', 'label']" in message and "missing ['chosen', 'rejected']" in message
    assert "'prompt', 'chosen', 'rejected' as text" in message  # what is expected
    assert (tmp_path / "q.jsonl").read_text() == ""  # no row was read, so none quarantined

    # text responses without a prompt column; a folder names the offending file, not its first
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", STANDARD)
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("chosen", "rejected")} for r in STANDARD]),
                   folder / "b.parquet")
    with pytest.raises(WrongColumns, match=r"b\.parquet: .*found \['chosen', 'rejected'\], missing \['prompt'\]"):
        list(load_records(str(folder), schema="trl", quarantine=Quarantine(tmp_path / "q2.jsonl")))

    # a named user column the data does not have
    with pytest.raises(WrongColumns, match=r"missing \['annotator'\]"):
        list(load_records(str(folder / "a.jsonl"), schema="trl", user_column="annotator"))

    # SFT-style messages are no preference data
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"messages": [user("Hi"), assistant("Hello")]}]).save_to_disk(str(tmp_path / "sft"))
    with pytest.raises(WrongColumns, match=r"found \['messages'\], missing \['chosen', 'rejected'\]"):
        list(load_records(str(tmp_path / "sft"), schema="trl"))


def test_user_column_maps_to_stable_user_ids(tmp_path):
    rows = [dict(r, annotator=name) for r, name in zip(STANDARD, ["ann", "bob", "ann"])]
    rows.append({"prompt": "Q?", "chosen": "A.", "rejected": "B."})  # no user: quarantined
    user_map = UserIdMap({"bob": 1})
    records, summary, _ = load(write_jsonl(tmp_path / "users.jsonl", rows), tmp_path,
                               user_column="annotator", user_map=user_map)
    assert [r.user_id for r in records] == [2, 1, 2] and user_map.ids == {"bob": 1, "ann": 2}
    assert summary["by_reason"] == {"missing_field": 1}


def test_hub_name_offline_says_it_needs_the_hub(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"'someone/prefs' is no local file or folder.*needs the Hugging Face hub"):
        list(load_records("someone/prefs", schema="trl", split="train"))


# ---------------------------------------------------------------- the DPO job on your own data

def tiny_base(folder):
    """An untrained tiny GPT-2 over the world's words, saved as a base policy (no SFT run)."""
    from raypref.data.world import World
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer, save_pretrained_safetensors

    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=128)
    tokenizer = build_tokenizer(cfg, World(seed=0).vocabulary())
    return str(save_pretrained_safetensors(build_policy(cfg, tokenizer), tokenizer, folder))


def own_data_job(tmp_path, source, base_policy="", **data):
    from raypref.experiments.preference import DPOJobConfig, PreferenceSource
    from raypref.recipes.dpo import DPOConfig
    from raypref.train.runner import Resources

    return DPOJobConfig(
        data=PreferenceSource(source=str(source), **data), output_dir=str(tmp_path / "dpo"), run_name="mine",
        base_policy=base_policy, max_quarantine_fraction=0.1,
        training=DPOConfig(steps=4, micro_batch_size=4, warmup_steps=1, max_length=64),
        resources=Resources(num_workers=1, cpus_per_worker=1.0, checkpoint_every=4), shuffle_buffer=0,
        data_cpus=0.5)


def test_dpo_job_wrong_columns_stop_before_ray_and_training(tmp_path, monkeypatch):
    from raypref.experiments import preference
    from raypref.experiments.run import Run

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(preference.ray_session, "init", no_ray)
    monkeypatch.setattr(preference.ray, "is_initialized", lambda: False)
    bad = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Q?", "good": "A.", "bad": "B."}] * 4)
    cfg = own_data_job(tmp_path, bad)
    cfg.validate()
    # the job's first step (run_experiment calls it before the base policy and the runner)
    with pytest.raises(WrongColumns, match=r"mine\.jsonl: wrong columns for schema 'trl': found "
                                           r"\['question', 'good', 'bad'\], missing \['chosen', 'rejected'\]"):
        preference.PreferenceExperiment().prepare(Run(cfg, "mine", tmp_path / "dpo" / "mine"))
    assert not (tmp_path / "dpo" / "mine" / "data").exists()


def test_dpo_job_data_section_from_the_command_line():
    from raypref.config import parse_args
    from raypref.experiments.preference import DPOJobConfig

    cfg = parse_args(DPOJobConfig, ["--data.source", "prefs.jsonl", "--data.format", "trl",
                                    "--data.user_column", "annotator", "--data.test_fraction", "0.2"])
    assert (cfg.data.source, cfg.data.format, cfg.data.user_column, cfg.data.test_fraction) == (
        "prefs.jsonl", "trl", "annotator", 0.2)
    for flags, message in ((["--data.format", "hh"], r"data\.format='hh'"),
                           (["--data.user_column", "u", "--data.format", "prism"], r"only the trl format"),
                           (["--data.test_fraction", "1"], r"data\.test_fraction=1\.0")):
        with pytest.raises(ValueError, match=message):
            parse_args(DPOJobConfig, ["--data.source", "x.jsonl", *flags])


@pytest.mark.slow  # ~30 s on 2 cores: one 4-step Ray Train DPO run on a saved tiny base (no SFT)
def test_dpo_job_trains_on_a_users_trl_jsonl_file(ray_local, tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    from raypref.data.world import World
    from raypref.experiments.preference import train_dpo

    pairs = World(seed=0).pairs_for_preference("P1A", 20, np.random.default_rng(0))
    rows = [{"chosen": [user(p.prompt), assistant(p.chosen)], "rejected": [user(p.prompt), assistant(p.rejected)]}
            for p in pairs]
    rows.insert(5, {"chosen": [user("hi")], "rejected": [user("hi"), assistant("x")]})  # no response
    path = write_jsonl(tmp_path / "mine.jsonl", rows, extra_lines=['{"chosen": [\n'])
    cfg = own_data_job(tmp_path, path, base_policy=tiny_base(tmp_path / "base"), test_fraction=0.2)
    result = train_dpo(cfg)  # user_ids stays [1]: no users here

    source = result.summary["quarantine"]["source"]
    assert (source["rows_total"], source["rows_valid"], source["rows_quarantined"]) == (22, 20, 2)
    assert source["by_reason"] == {"undecodable_line": 1, "unmappable": 1}
    entries = [json.loads(x) for x in (result.output_dir / "quarantine_source.jsonl").read_text().splitlines()]
    assert sorted(e["line"] for e in entries) == [6, 22]
    assert result.summary["train_pairs"] == 16 and result.summary["eval"]["pairs"] == 4
    assert result.summary["steps"] == 4
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # trained: LoRA B starts at 0


# ---------------------------------------------------------------- the other jobs' data sections

def test_prism_through_the_data_section_keeps_its_users_and_their_text(tmp_path):
    from pathlib import Path

    from raypref.data.source import PreferenceSource, read_source

    fixtures = Path(__file__).parent / "fixtures"
    src = PreferenceSource(source=str(fixtures / "prism_conversations.jsonl"), format="prism",
                           survey=str(fixtures / "prism_survey.jsonl"), test_fraction=0.0)
    assert src.has_users
    pairs = read_source(src, tmp_path, seed=0, max_quarantine_fraction=1.0, log=lambda m: None)
    assert len(pairs.train) == 4 and pairs.test == []  # as test_loaders' PRISM test: 4 pairs
    assert pairs.users == {1: "user17", 2: "user42"}
    assert {r.user_id for r in pairs.train} == {1, 2}
    assert any("self_description: I am a teacher" in (r.user_text or "") for r in pairs.train)
    assert pairs.quarantine["by_reason"] == {"tie": 1, "unmappable": 1}  # the fixture's own bad turns
    assert (tmp_path / "quarantine_source.jsonl").exists() and (tmp_path / "data" / "user_ids.json").exists()


def test_pdpo_needs_users_and_reads_them_before_the_base(tmp_path):
    from raypref.data.source import PreferenceSource
    from raypref.experiments.pdpo import PDPOExperiment, PDPOJobConfig
    from raypref.experiments.run import Run

    path = write_jsonl(tmp_path / "mine.jsonl", [dict(r, annotator=a) for r, a in zip(STANDARD * 2, "ababab")])
    with pytest.raises(ValueError, match=r"PDPOJobConfig.data: P-DPO learns each user.*data.user_column"):
        PDPOJobConfig(data=PreferenceSource(source=str(path))).validate()
    cfg = PDPOJobConfig(data=PreferenceSource(source=str(path), user_column="annotator", test_fraction=0.5))
    cfg.validate()
    run = Run(cfg, "mine", tmp_path / "run")
    PDPOExperiment().prepare(run)
    train, held_out, groups = run.data["pairs"]
    assert len(train) == 3 and len(held_out) == 3 and groups == {}
    assert run.data["users"] == {1: "a", 2: "b"}
    run.base_dir = str(tmp_path / "base")  # the spec only names it; the workers load it
    spec = PDPOExperiment().spec(run)
    assert sorted(spec.seen_users) == sorted({r.user_id for r in train}) and spec.groups == {}

    bad = write_jsonl(tmp_path / "bad.jsonl", STANDARD)  # no annotator column
    cfg = PDPOJobConfig(data=PreferenceSource(source=str(bad), user_column="annotator"))
    with pytest.raises(WrongColumns, match=r"missing \['annotator'\]"):
        PDPOExperiment().prepare(Run(cfg, "bad", tmp_path / "bad"))


def test_reward_data_reads_trl_pairs_per_user(tmp_path):
    from raypref.recipes.reward import RewardConfig
    from raypref.recipes.reward_data import RewardDataConfig, build_pairs

    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}", "who": who}
            for i, who in enumerate(["ann"] * 12 + ["bob"] * 4)]
    path = write_jsonl(tmp_path / "rm.jsonl", rows)
    data = RewardDataConfig(source=str(path), schema="trl", user_column="who", test_pairs_per_user=3,
                            n_demos=2, demo_pool=5, train_pairs_per_user=5)
    pairs = build_pairs(data)
    assert sorted(pairs) == [1]  # bob's 4 pairs cannot give 3 test pairs and 2 demonstrations
    assert len(pairs[1].test) == 3 and len(pairs[1].train) == 5
    assert {r.chosen for r in pairs[1].test + pairs[1].train} <= {f"good {i}" for i in range(12)}
    RewardConfig(method="bt", data=data).validate()
    with pytest.raises(ValueError, match=r"preference pairs carry no per-attribute ratings"):
        RewardConfig(method="multi_objective", data=data).validate()
    with pytest.raises(ValueError, match=r"data.user_column='who': only the trl schema"):
        RewardDataConfig(source=str(path), schema="prism", user_column="who").validate()


def test_soups_reads_a_trl_file_per_preference(tmp_path):
    from types import SimpleNamespace

    from raypref.experiments.soups.preferences import _user_id, file_data

    rows = [{"prompt": f"Q{i}?", "chosen": [assistant(f"good {i}")], "rejected": [assistant(f"bad {i}")]}
            for i in range(20)]
    files = {"P1A": str(write_jsonl(tmp_path / "p1a.jsonl", rows)),
             "P2B": str(write_jsonl(tmp_path / "p2b.jsonl", rows[:10] + [{"prompt": "x", "chosen": "", "rejected": "y"}]))}
    cfg = SimpleNamespace(preferences=["P1A", "P2B"], psoups_files=files, psoups_format="trl", psoups_split="",
                          output_dir=str(tmp_path / "soups"), max_quarantine_fraction=0.1,
                          training=SimpleNamespace(micro_batch_size=2), resources=SimpleNamespace(num_workers=1))
    data = file_data(cfg, log=lambda m: None)
    assert (len(data.train["P1A"]), len(data.held_out["P1A"]), len(data.train["P2B"])) == (18, 2, 9)
    first = data.train["P2B"][0]
    assert (first.prompt, first.chosen, first.user_id, first.user_text) == ("Q0?", "good 0", _user_id("P2B"), "P2B")
    entries = (tmp_path / "soups" / "quarantine" / "P2B.jsonl").read_text().splitlines()
    assert [json.loads(e)["reason"] for e in entries] == ["empty_text"]
    cfg.psoups_format = "psoups"  # a TRL file read as P-Soups': one error naming the columns
    with pytest.raises(WrongColumns, match=r"p1a\.jsonl: wrong columns for schema 'psoups'"):
        file_data(cfg, log=lambda m: None)


# ---------------------------------------------------------------- SFT examples

def test_sft_examples_prompt_response_or_messages_with_quarantine(tmp_path):
    from raypref.data.loaders import load_sft_examples

    rows = [{"prompt": "Say hi.", "response": "Hello!"},
            {"messages": [{"role": "system", "content": "Be kind."}, user("Help?"), assistant("Sure.")]},
            {"messages": [user("Hi?"), assistant("Hey.")]},
            {"prompt": "Empty?", "response": " "},                       # blank response
            {"messages": [user("Only a question?")]}]                    # no response
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    examples, summary = load_sft_examples(str(path), quarantine_path=tmp_path / "q.jsonl", max_quarantine_fraction=0.5)
    # earlier turns stay turns (models/chat.py renders them); a lone user turn is its text
    assert examples == [("Say hi.", "Hello!"), ([{"role": "system", "content": "Be kind."}, user("Help?")], "Sure."),
                        ("Hi?", "Hey.")]
    from raypref.data.world import World
    from raypref.recipes.sft import corpus_vocabulary

    # the tiny model reads a conversation's transcript: its words are in the vocabulary
    assert {"System:", "kind.", "User:", "Help?", "Assistant:", "Sure."} <= set(corpus_vocabulary(World(seed=0), examples))
    assert summary["by_reason"] == {"empty_text": 1, "unmappable": 1} and summary["rows_total"] == 5
    wrong = write_jsonl(tmp_path / "pairs.jsonl", STANDARD)
    with pytest.raises(WrongColumns, match=r"pairs\.jsonl: wrong columns for schema 'sft': found \['prompt', 'chosen', "
                                           r"'rejected', 'score_chosen', 'score_rejected'\], missing \['response'\]; "
                                           r"expected 'prompt' and 'response' as text, or 'messages'"):
        load_sft_examples(str(wrong), quarantine_path=tmp_path / "q2.jsonl")


def test_sft_config_reads_own_data_and_keys_the_cache_by_its_content(tmp_path):
    from raypref.data.world import World
    from raypref.recipes.sft import SFTConfig, corpus_vocabulary, sft_cache_key, sft_corpus

    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "zebra question", "response": "quokka answer"}])
    world_key = sft_cache_key(SFTConfig())
    cfg = SFTConfig(data=str(path), output_dir=str(tmp_path / "sft"))
    corpus = sft_corpus(cfg, World(seed=0))
    assert corpus == [("zebra question", "quokka answer")]
    assert {"zebra", "quokka"} <= set(corpus_vocabulary(World(seed=0), corpus))  # the tiny model can read them
    key = sft_cache_key(cfg)
    assert key != world_key and (tmp_path / "sft" / "quarantine" / f"sft-{key}.jsonl").exists()
    moved = tmp_path / "elsewhere.jsonl"
    moved.write_bytes(path.read_bytes())
    assert sft_cache_key(SFTConfig(data=str(moved), output_dir=str(tmp_path / "sft"))) == key  # content, not place
    write_jsonl(path, [{"prompt": "zebra question", "response": "another answer"}])
    assert sft_cache_key(cfg) != key


def test_shards_with_the_wrong_columns_are_one_error_before_any_row_is_read(tmp_path):
    from raypref.data.pipeline import read_preference_shards

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(STANDARD), folder / "a.parquet")
    write_jsonl(folder / "b.jsonl", [{"question": "Q?", "answer": "A."}])
    # raised before the quarantine actor or any Ray task is made: no Ray needed here
    with pytest.raises(WrongColumns, match=r"b\.jsonl: wrong columns for schema 'preference shards': found "
                                           r"\['question', 'answer'\], missing \['prompt', 'chosen', 'rejected'\].*"
                                           r"go through a job's data\.source"):
        read_preference_shards(str(folder), quarantine_path=str(tmp_path / "q.jsonl"), suffixes=(".parquet", ".jsonl"))


def test_dpo_own_data_becomes_the_runs_shards_and_user_selection(tmp_path, monkeypatch):
    from raypref.data.pipeline import check_shard_columns, list_shards
    from raypref.data.records import validate_row
    from raypref.experiments import preference

    monkeypatch.setattr(preference.tracking, "log_metrics", lambda *a, **k: None)  # no MLflow run here
    monkeypatch.setattr(preference.tracking, "log_artifact", lambda *a, **k: None)
    rows = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}", "who": "ab"[i % 2]} for i in range(10)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)

    cfg, quarantine = preference.own_data(own_data_job(tmp_path, path, test_fraction=0.2), tmp_path / "run")
    assert cfg.user_ids == [] and quarantine["rows_valid"] == 10  # no user column: every row is kept
    assert cfg.shard_formats == ["parquet"] and cfg.test_data.endswith("test.parquet")
    filesystem, shards = list_shards(cfg.train_data)
    check_shard_columns(filesystem, shards)  # the written shard is what the pipeline reads
    train = [validate_row(r) for r in pq.read_table(cfg.train_data).to_pylist()]
    test = [validate_row(r) for r in pq.read_table(cfg.test_data).to_pylist()]
    assert len(train) == 8 and len(test) == 2
    assert sorted(r.chosen for r in train + test) == sorted(r["chosen"] for r in rows)

    cfg, _ = preference.own_data(own_data_job(tmp_path, path, user_column="who"), tmp_path / "users")
    assert cfg.user_ids == [1]  # the job's default: the first user of the source
    train = [validate_row(r) for r in pq.read_table(cfg.train_data).to_pylist()]
    assert {r.user_id for r in train} == {1, 2}
    assert json.loads((tmp_path / "users" / "data" / "user_ids.json").read_text()) == {"a": 1, "b": 2}


def test_dpo_data_path_keeps_a_conversations_turns_for_a_chat_template(smollm2_tokenizer, tmp_path, monkeypatch):
    """Two-turn TRL conversations through the DPO job's own-data path: the run's shard, the
    pipeline's validation and tokenization (as its Ray Data tasks run them), and the held-out
    pairs' encoding: every side is SmolLM2's template over the earlier turns, then the response."""
    import numpy as np

    from raypref.data.pipeline import PairTokenizer
    from raypref.data.records import validate_row
    from raypref.experiments import preference
    from raypref.models.factory import encode_example
    from raypref.recipes.dpo import encode_pairs

    monkeypatch.setattr(preference.tracking, "log_metrics", lambda *a, **k: None)
    monkeypatch.setattr(preference.tracking, "log_artifact", lambda *a, **k: None)
    tok = smollm2_tokenizer

    def turns(i):
        return [{"role": "system", "content": "Be brief."}, user(f"Colour {i}?"), assistant("Red."), user("Another?")]

    rows = [{"chosen": turns(i) + [assistant(f"Blue {i}.")], "rejected": turns(i) + [assistant(f"Red {i}.")]}
            for i in range(5)]
    cfg, _ = preference.own_data(own_data_job(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows), test_fraction=0.2),
                                 tmp_path / "run")
    shard = pq.read_table(cfg.train_data)
    assert "context" in shard.column_names
    valid = [validate_row(row).to_row() for row in shard.to_pylist()]  # as the pipeline's validation task
    batch = {name: np.array([row[name] for row in valid]) for name in valid[0]}
    out = PairTokenizer(lambda: tok, 96, encode=encode_example)(batch)
    for i, row in enumerate(valid):
        i_row = int(row["chosen"].split()[1].rstrip("."))
        before = tok.apply_chat_template(turns(i_row), add_generation_prompt=True)["input_ids"]
        response = tok(row["chosen"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        n = len(before) + len(response)
        assert out["chosen_input_ids"][i, :n].tolist() == before + response
        assert out["chosen_labels_mask"][i].tolist() == [0] * len(before) + [1] * len(response) + [0] * (96 - n)
    # the held-out pairs (read back in the driver) are encoded the same way for accuracy
    held_out = [validate_row(row) for row in pq.read_table(cfg.test_data).to_pylist()]
    (c_ids, c_prompt, _, r_prompt), = encode_pairs(tok, held_out, 96)
    assert c_prompt == r_prompt and tok.decode(c_ids[:c_prompt]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nColour ")
    # a shard written before the context column still reads: its prompt text is one user turn
    old = shard.drop(["context"]).to_pylist()
    assert validate_row(old[0]).context is None
    old_batch = {name: np.array([row[name] for row in old]) for name in old[0]}
    ids = PairTokenizer(lambda: tok, 96, encode=encode_example)(old_batch)["chosen_input_ids"][0].tolist()
    assert "<|im_start|>user\nSystem: Be brief.\nUser: Colour" in tok.decode(ids)
