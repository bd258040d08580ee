"""Ray Data pipeline: shards -> validation + quarantine -> DPO tensors -> Train workers."""
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from raypref.data.pipeline import (ExactSplitDataConfig, PairTokenizer, list_shards,
                                   read_preference_shards, tokenize_pairs)
from raypref.data.quarantine import QuarantineExceeded, check_fraction
from raypref.data.records import PreferenceRecord

# Ray workers cannot import this test module by name: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

WORDS = "what is the answer to question yes no maybe good bad long short reply about topic".split()


def word_tokenizer():
    """A tiny word-level HF tokenizer (no download): picklable zero-arg factory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]")


def row(i: int) -> dict:
    """A valid row whose user_id is unique, so it can identify the row downstream."""
    return PreferenceRecord(prompt=f"what is the answer to question {i}", chosen="yes good reply",
                            rejected="no bad long reply about topic", user_id=i,
                            chosen_scores={"h": 1.0}, source="t").to_row()


def write_shards(folder: Path, n_valid: int = 11) -> dict:
    """Two parquet shards and one jsonl shard; the jsonl holds bad rows and a broken line."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row(i) for i in range(1, n_valid + 1)]
    pq.write_table(pa.Table.from_pylist(rows[:4]), folder / "part-0.parquet")
    bad_parquet = dict(rows[4], rejected=rows[4]["chosen"])  # chosen == rejected, row index 1
    (folder / "sub").mkdir()
    pq.write_table(pa.Table.from_pylist([rows[5], bad_parquet, rows[6]]), folder / "sub" / "part-1.parquet")
    lines = [json.dumps(r) for r in rows[7:9]]
    lines.append('{"prompt": "cut off')  # line 3: undecodable
    lines.append(json.dumps(dict(row(99), chosen_scores='{"h": NaN}')))  # line 4: non-finite
    lines += [json.dumps(r) for r in rows[9:]]
    lines.append(json.dumps(dict(row(98), user_id=-2)))  # last line: bad user id
    (folder / "part-2.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "notes.txt").write_text("not a shard")
    valid_ids = {r["user_id"] for r in rows} - {5}
    return {"valid_ids": valid_ids, "n_lines": len(lines)}


def test_list_shards_local_and_uri(tmp_path):
    write_shards(tmp_path / "data")
    _, local = list_shards(str(tmp_path / "data"))
    _, uri = list_shards(f"file://{tmp_path / 'data'}")
    assert local == uri and [Path(p).name for p in local] == ["part-0.parquet", "part-2.jsonl", "part-1.parquet"]
    with pytest.raises(FileNotFoundError, match="no such shard folder"):
        list_shards(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a shard")
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet or \*\.jsonl"):
        list_shards(str(tmp_path / "empty"))


@pytest.mark.parametrize("as_uri", [False, True])
def test_quarantine_end_to_end(ray_local, tmp_path, as_uri):
    expected = write_shards(tmp_path / "data")
    uri = f"file://{tmp_path / 'data'}" if as_uri else str(tmp_path / "data")
    ds, report = read_preference_shards(uri, quarantine_path=str(tmp_path / "q.jsonl"),
                                        max_quarantine_fraction=0.5)
    rows = ds.take_all()
    assert {r["user_id"] for r in rows} == expected["valid_ids"] and len(rows) == len(expected["valid_ids"])
    assert set(rows[0]) == set(PreferenceRecord("p", "a", "b").to_row())  # the to_row() schema
    summary = report.check()
    assert summary["rows_total"] == summary["rows_valid"] + summary["rows_quarantined"] == 14
    assert summary["by_reason"] == {"identical_responses": 1, "undecodable_line": 1,
                                    "non_finite_score": 1, "bad_user_id": 1}
    entries = {(Path(e["shard"]).name, e["line"]): e for e in map(json.loads, open(tmp_path / "q.jsonl"))}
    assert set(entries) == {("part-1.parquet", 1), ("part-2.jsonl", 3), ("part-2.jsonl", 4),
                            ("part-2.jsonl", expected["n_lines"])}
    assert entries[("part-2.jsonl", 3)]["raw"] == '{"prompt": "cut off'
    assert "chosen_scores['h']" in entries[("part-2.jsonl", 4)]["detail"]
    # a second pass over the lazy dataset re-reads the shards but must not count twice
    assert ds.count() == len(expected["valid_ids"])
    assert report.summary()["rows_total"] == 14


def test_fraction_limit_raises_after_consumption(ray_local, tmp_path):
    write_shards(tmp_path / "data")
    ds, report = read_preference_shards(str(tmp_path / "data"), quarantine_path=str(tmp_path / "q.jsonl"),
                                        max_quarantine_fraction=0.2)
    ds.take_all()
    with pytest.raises(QuarantineExceeded, match=r"4 of 14 rows quarantined \(fraction 0\.286 > .*0\.2\).*q\.jsonl"):
        report.check()


def test_corrupt_shards_are_quarantined_by_name_and_counted(ray_local, tmp_path):
    write_shards(tmp_path / "data")  # 10 valid rows, 4 bad ones
    folder = tmp_path / "data"
    pq.write_table(pa.Table.from_pylist([row(i) for i in range(200, 260)]), folder / "cut.parquet")
    (folder / "cut.parquet").write_bytes((folder / "cut.parquet").read_bytes()[:300])
    (folder / "garbage.jsonl").write_bytes(bytes(range(256)) * 4)
    whole = gzip.compress("".join(json.dumps(row(i)) + "\n" for i in range(1000, 3000)).encode(), mtime=0)
    (folder / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    ds, report = read_preference_shards(str(folder), quarantine_path=str(tmp_path / "q.jsonl"),
                                        max_quarantine_fraction=0.5)
    rows = ds.take_all()  # no crash: the broken shards become quarantine entries
    summary = report.check()  # 3 of 6 shards bad: at the limit, allowed
    assert sorted(Path(s).name for s in summary["bad_shards"]) == ["cut.jsonl.gz", "cut.parquet", "garbage.jsonl"]
    assert summary["shards_total"] == 6 and summary["by_reason"]["unreadable_shard"] == 3
    from_gzip = [r for r in rows if r["user_id"] >= 1000]
    assert 0 < len(from_gzip) < 2000 and summary["rows_valid"] == len(rows) == 10 + len(from_gzip)
    assert summary["rows_total"] == summary["rows_valid"] + summary["rows_quarantined"] == len(rows) + 4 + 3
    entries = {Path(e["shard"]).name: e for e in map(json.loads, open(tmp_path / "q.jsonl"))
               if e["reason"] == "unreadable_shard"}
    assert entries["cut.jsonl.gz"]["line"] == len(from_gzip) + 1 and "EOFError" in entries["cut.jsonl.gz"]["detail"]
    assert "NUL byte" in entries["garbage.jsonl"]["detail"]
    with pytest.raises(QuarantineExceeded, match=r"3 of 6 shards unreadable.*cut\.parquet"):
        check_fraction(summary, 0.4)


def test_pair_tokenizer_masks_and_truncation():
    tokenize = PairTokenizer(word_tokenizer, max_length=8)
    batch = {"prompt": np.array(["what is the answer", "what is the answer to question about topic"]),
             "chosen": np.array(["yes", "yes good"]), "rejected": np.array(["no bad", "maybe"]),
             "user_id": np.array([3, 4])}
    out = tokenize(batch)
    tok = word_tokenizer()
    assert all(v.shape == (2, 8) and v.dtype == np.int64 for k, v in out.items() if k != "user_id")
    assert out["user_id"].tolist() == [3, 4]
    # short pair: prompt 4 tokens, response + EOS, then padding; labels only on the response
    ids, labels = out["rejected_input_ids"][0], out["rejected_labels_mask"][0]
    assert tok.decode(ids[labels == 1]) == "no bad [EOS]"
    assert out["rejected_attention_mask"][0].tolist() == [1] * 7 + [0]
    assert ids[7] == tok.pad_token_id
    # long prompt (8 words): its last 5 tokens are kept, the same for both sides, so the
    # longer response (2 words + EOS) still fits in 8
    chosen, rejected = out["chosen_input_ids"][1], out["rejected_input_ids"][1]
    assert tok.decode(chosen[out["chosen_labels_mask"][1] == 1]) == "yes good [EOS]"
    assert tok.decode(chosen[:5]) == "answer to question about topic"
    assert chosen[:5].tolist() == rejected[:5].tolist()
    assert out["chosen_labels_mask"][1, :5].sum() == 0 and out["chosen_attention_mask"][1].all()


def test_tokenize_pairs_in_actor_pool(ray_local, tmp_path):
    expected = write_shards(tmp_path / "data")
    ds, _ = read_preference_shards(str(tmp_path / "data"), quarantine_path=str(tmp_path / "q.jsonl"),
                                   max_quarantine_fraction=0.5, num_cpus=0.5)
    tokens = tokenize_pairs(ds, word_tokenizer, max_length=16, num_cpus=0.5).take_all()
    assert {t["user_id"] for t in tokens} == expected["valid_ids"]
    first = tokens[0]
    assert first["chosen_input_ids"].shape == (16,) and first["rejected_labels_mask"].sum() == 7  # 6 words + EOS


def _collect_ids(config):
    """Train worker: iterate this worker's shard and write the row ids it saw."""
    import ray.train

    ids = []
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=3):
        assert batch["chosen_input_ids"].shape[1] == config["max_length"]
        ids += batch["user_id"].tolist()
    rank = ray.train.get_context().get_world_rank()
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(ids))


@pytest.mark.slow  # about 25 s on 2 cores: starting the Train workers dominates
def test_two_train_workers_get_disjoint_shards_covering_all(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # 15 valid rows: an odd count, which Train's default DataConfig (equal=True) would cut to 14
    expected = write_shards(tmp_path / "data", n_valid=16)
    ds, report = read_preference_shards(str(tmp_path / "data"), quarantine_path=str(tmp_path / "q.jsonl"),
                                        max_quarantine_fraction=0.5, num_cpus=0.25)
    # small batches keep one block per shard: streaming_split hands out whole blocks
    ds = tokenize_pairs(ds, word_tokenizer, max_length=16, num_cpus=0.25, batch_size=4)
    (tmp_path / "ids").mkdir()
    TorchTrainer(
        _collect_ids, train_loop_config={"out": str(tmp_path / "ids"), "max_length": 16},
        # 2 x 0.5 CPU for Train leaves Ray Data a budget on 2 cores
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": ds}, dataset_config=ExactSplitDataConfig(),
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name="split"),
    ).fit()
    seen = [json.loads((tmp_path / "ids" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(expected["valid_ids"])  # nothing dropped, nothing twice
    assert report.check()["rows_valid"] == 15


def test_a_shard_of_bad_rows_keeps_a_bounded_part(ray_local, tmp_path):
    from raypref.data.pipeline import MAX_ENTRIES_PER_SHARD
    folder = tmp_path / "data"
    folder.mkdir()
    n_bad = MAX_ENTRIES_PER_SHARD + 200
    bad = [json.dumps(dict(row(i), prompt="\u200b")) for i in range(n_bad)]  # invisible: empty text
    (folder / "bad.jsonl").write_text("\n".join(bad + [json.dumps(row(5000))]) + "\n")
    ds, report = read_preference_shards(str(folder), quarantine_path=str(tmp_path / "q.jsonl"),
                                        max_quarantine_fraction=1.0)
    assert [r["user_id"] for r in ds.take_all()] == [5000]
    summary = report.check()
    assert summary["rows_total"] == n_bad + 1 and summary["by_reason"] == {"empty_text": n_bad}
    assert summary["entries_omitted"] == 200  # counted, not held in the task nor written
    lines = (tmp_path / "q.jsonl").read_text().splitlines()
    assert len(lines) == MAX_ENTRIES_PER_SHARD and json.loads(lines[0])["line"] == 1
