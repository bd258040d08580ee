"""jobs/dpo.py: shards -> validation + quarantine -> Ray Data tokens -> Ray Train DPO -> adapter."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from ray import cloudpickle
from safetensors.torch import load_file

from raypref.config import parse_args
from raypref.data.pipeline import PairTokenizer
from raypref.data.quarantine import QuarantineExceeded
from raypref.data.records import PreferenceRecord
from raypref.data.world import World
from raypref.experiments.preference import (DPOJobConfig, SavedTokenizer, quarantine_metrics,
                         train_dpo)
from raypref.models.factory import ModelConfig, build_tokenizer, encode_example
from raypref.recipes.dpo import DPOConfig, DPOSpec, collate_pairs, encode_pairs, shard_batch_to_pairs
from raypref.recipes.sft import SFTConfig, sft_output_dir
from raypref.train.runner import Optimization, Resources

cloudpickle.register_pickle_by_value(sys.modules[__name__])

MAX_LENGTH = 128
BAD_REASONS = {"identical_responses": 1, "empty_text": 1, "bad_user_id": 1, "undecodable_line": 1}


def world_pairs(n: int, seed: int) -> list[PreferenceRecord]:
    return World(seed=0).pairs_for_preference("P1A", n, np.random.default_rng(seed))


def write_shards(folder: Path, records: list[PreferenceRecord], bad: bool = True) -> None:
    """Half the rows as parquet, half as jsonl; with `bad`, four bad rows (one per reason)."""
    folder.mkdir(parents=True)
    rows = [r.to_row() for r in records]
    half = len(rows) // 2
    parquet_rows, lines = rows[:half], [json.dumps(r) for r in rows[half:]]
    if bad:
        parquet_rows.append(dict(rows[0], rejected=rows[0]["chosen"]))  # identical responses
        parquet_rows.append(dict(rows[1], prompt="   "))  # empty text
        lines.insert(3, json.dumps(dict(rows[2], user_id=-5)))  # bad user id
        lines.insert(7, '{"prompt": "truncated')  # undecodable line
    pq.write_table(pa.Table.from_pylist(parquet_rows), folder / "shard-00000.parquet")
    (folder / "shard-00001.jsonl").write_text("\n".join(lines) + "\n")


def tiny_tokenizer():
    return build_tokenizer(ModelConfig(), World(seed=0).vocabulary())


# ---------------------------------------------------------------- unit tests (seconds)

def test_pipeline_tokens_match_the_policy_format_used_by_sft_and_evaluation():
    tokenizer = tiny_tokenizer()
    pairs = world_pairs(3, seed=1)
    batch = {"prompt": np.array([p.prompt for p in pairs]), "chosen": np.array([p.chosen for p in pairs]),
             "rejected": np.array([p.rejected for p in pairs]), "user_id": np.array([p.user_id for p in pairs])}
    for max_length in (MAX_LENGTH, 40):  # 40: every pair is truncated
        rows = PairTokenizer(lambda: tokenizer, max_length, encode=encode_example)(batch)
        got = shard_batch_to_pairs({k: torch.from_numpy(v) for k, v in rows.items()})
        want = collate_pairs(encode_pairs(tokenizer, pairs, max_length), tokenizer.pad_token_id)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (max_length, key)
    # the pipeline's built-in raw-text rule lacks format_prompt's separator: not the policy's tokens
    raw = PairTokenizer(lambda: tokenizer, MAX_LENGTH)(batch)
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    assert sep not in raw["chosen_input_ids"] and sep in want["input_ids"]


def test_shard_batch_needs_the_pipeline_columns():
    with pytest.raises(KeyError, match=r"rejected_input_ids.*tokenize_pairs"):
        shard_batch_to_pairs({f"chosen_{f}": torch.zeros(1, 4) for f in ("input_ids", "attention_mask",
                                                                         "labels_mask")})


def test_saved_tokenizer_factory_pickles_and_loads_the_saved_tokenizer(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    factory = cloudpickle.loads(cloudpickle.dumps(SavedTokenizer(str(tmp_path))))
    loaded = factory()
    text = world_pairs(1, seed=2)[0].prompt
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.pad_token_id == tokenizer.pad_token_id and loaded.eos_token_id == tokenizer.eos_token_id


def test_streamed_spec_needs_no_in_memory_pairs_but_checks_settings():
    spec = DPOSpec(base_dir="x", dataset="train", n_pairs=5)
    assert spec.pairs == [] and spec.policy_info()["n_pairs"] == 5
    with pytest.raises(ValueError, match="beta"):
        DPOSpec(base_dir="x", dataset="train", beta=0.0)
    with pytest.raises(ValueError, match="no preference pairs and no dataset"):
        DPOSpec(base_dir="x")


class FakeShard:
    """Stands in for ray.train.get_dataset_shard: numbered micro-batches of fixed pairs."""

    def __init__(self, n_batches: int):
        self.n_batches = n_batches

    def iter_torch_batches(self, batch_size, **shuffle):
        for i in range(self.n_batches):
            ids = torch.full((batch_size, 4), i)
            ones = torch.ones((batch_size, 4), dtype=torch.long)
            yield {"chosen_input_ids": ids, "rejected_input_ids": ids, "chosen_attention_mask": ones,
                   "rejected_attention_mask": ones, "chosen_labels_mask": ones, "rejected_labels_mask": ones}


def test_streamed_spec_resumes_at_its_data_position(monkeypatch):
    """The state saved in a checkpoint (passes, micro-batches consumed) makes a restarted worker
    continue inside the interrupted pass instead of starting it over."""
    import ray.train

    from raypref.train.spec import StepContext

    monkeypatch.setattr(ray.train, "get_dataset_shard", lambda name: FakeShard(5))
    ctx = StepContext(step=1, max_steps=9, rank=0, world_size=1, micro_batch_size=2, grad_accum=1, seed=0)
    spec = DPOSpec(base_dir="x", dataset="train")
    stream = spec.batches(ctx)
    taken = [int(next(stream)["input_ids"][0, 0]) for _ in range(3)]
    assert taken == [0, 1, 2] and spec.state_dict() == {"passes": 1, "consumed": 3}

    resumed = DPOSpec(base_dir="x", dataset="train")
    resumed.load_state_dict(spec.state_dict())  # what the runner does from the checkpoint
    rest = [int(b["input_ids"][0, 0]) for b in resumed.batches(ctx)]
    assert rest == [3, 4]  # the rest of pass 1, not a new pass from batch 0
    assert resumed.state_dict() == {"passes": 1, "consumed": 0}
    assert [int(b["input_ids"][0, 0]) for b in resumed.batches(ctx)] == [0, 1, 2, 3, 4]
    assert resumed.state_dict()["passes"] == 2


def test_quarantine_metrics_have_totals_and_one_count_per_reason():
    summary = {"rows_total": 10, "rows_valid": 7, "rows_quarantined": 3,
               "by_reason": {"empty_text": 2, "bad_user_id": 1}, "path": "q.jsonl"}
    assert quarantine_metrics(summary, "test.") == {
        "test.rows_total": 10, "test.rows_valid": 7, "test.rows_quarantined": 3,
        "test.quarantine.empty_text": 2, "test.quarantine.bad_user_id": 1}


def test_config_from_cli_and_bad_values_named():
    cfg = parse_args(DPOJobConfig, ["--training.steps", "7", "--user_ids", "[2, 3]", "--test_data", "''"])
    assert (cfg.training.steps, cfg.user_ids, cfg.test_data) == (7, [2, 3], "")
    cfg.validate()
    for field_name, change in [("training.loss_type", lambda c: setattr(c.training, "loss_type", "hinge")),
                               ("training.sft_weight", lambda c: setattr(c.training, "sft_weight", -0.5)),
                               ("max_quarantine_fraction", lambda c: setattr(c, "max_quarantine_fraction", 1.5)),
                               ("run_name", lambda c: setattr(c, "run_name", "a/b")),
                               ("shard_formats", lambda c: setattr(c, "shard_formats", ["csv"]))]:
        bad = DPOJobConfig()
        change(bad)
        with pytest.raises(ValueError, match=f"DPOJobConfig.{field_name}="):
            bad.validate()


# ---------------------------------------------------------------- end to end (Ray)

def tiny_sft(root: Path) -> SFTConfig:
    return SFTConfig(model=ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=MAX_LENGTH),
                     training=Optimization(steps=10, micro_batch_size=8, lr=3e-3, warmup_steps=2),
                     resources=Resources(num_workers=1, zero_stage=0, checkpoint_every=10),
                     corpus_size=200, max_length=MAX_LENGTH, output_dir=str(root / "sft"))


def job_config(tmp_path: Path, sft_root: Path | None = None, **overrides) -> DPOJobConfig:
    """The job on tmp_path's shards; ``sft_root``: where the tiny SFT base is cached (tests that
    train share one, so it is trained once)."""
    base = dict(train_data=str(tmp_path / "train"), test_data=str(tmp_path / "test"), user_ids=[],
                shard_formats=["parquet", "jsonl"],
                output_dir=str(tmp_path / "dpo"), run_name="p1a", sft=tiny_sft(sft_root or tmp_path),
                max_quarantine_fraction=0.1,
                training=DPOConfig(steps=10, micro_batch_size=8, warmup_steps=2, max_length=MAX_LENGTH),
                shuffle_buffer=32, data_cpus=0.5,
                resources=Resources(num_workers=1, cpus_per_worker=1.0, checkpoint_every=10))
    return DPOJobConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def shared_sft(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shared-sft")


def mlflow_run(run_id: str):
    return mlflow.MlflowClient().get_run(run_id)


def artifact_paths(run_id: str, folder: str | None = None) -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}


def train_while_polling(cfg) -> tuple[object, list[int]]:
    """Run ``train_dpo(cfg)`` in a thread and poll its MLflow run meanwhile: (the result, the
    run's train.loss history lengths read while the run was RUNNING)."""
    import concurrent.futures
    import time

    # the store the job logs to (the suite's autouse fixture sets it); a bare MlflowClient() would
    # read a tracking URI an earlier test set in this process
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    seen: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        job = pool.submit(train_dpo, cfg)
        while not job.done():
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                      f"tags.mlflow.runName = '{cfg.run_name}'")
            if runs:
                n = len(client.get_metric_history(runs[0].info.run_id, "train.loss"))
                if client.get_run(runs[0].info.run_id).info.status == "RUNNING":
                    seen.append(n)
            time.sleep(0.05)
        return job.result(), seen


# one job run checks the streamed shards, the quarantine, the export, the MLflow run and the
# live step metrics (two runs cost CI a minute and a half more)
@pytest.mark.slow  # about a minute on 2 cores: two Ray Train runs (SFT, DPO) dominate
def test_job_trains_on_streamed_shards_reports_the_quarantine_and_live_metrics(ray_local, tmp_path, capsys,
                                                                              shared_sft):
    write_shards(tmp_path / "train", world_pairs(64, seed=3))
    write_shards(tmp_path / "test", world_pairs(16, seed=4), bad=False)
    cfg = job_config(tmp_path, shared_sft)
    result, seen = train_while_polling(cfg)

    # the runner's rank 0 logs step rows to the job's run as it reports them (every step here):
    # polled while train_dpo ran, the run was RUNNING and its train.loss history grew
    growing = sorted({n for n in seen if n > 0})
    assert len(growing) >= 2 and growing[0] < 10, f"history lengths seen while training: {growing}"
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train.loss")
    assert sorted(m.step for m in history) == list(range(1, 11)), [m.step for m in history]  # every step once

    quarantine = result.summary["quarantine"]["train"]
    assert (quarantine["rows_total"], quarantine["rows_valid"], quarantine["rows_quarantined"]) == (68, 64, 4)
    assert quarantine["by_reason"] == BAD_REASONS
    entries = [json.loads(line) for line in (result.output_dir / "quarantine.jsonl").read_text().splitlines()]
    assert sorted(e["reason"] for e in entries) == sorted(BAD_REASONS)
    assert {(Path(e["shard"]).name, e["line"]) for e in entries if e["shard"].endswith(".jsonl")} == {
        ("shard-00001.jsonl", 4), ("shard-00001.jsonl", 8)}
    assert result.summary["quarantine"]["test"]["rows_quarantined"] == 0
    assert json.loads((result.output_dir / "summary.json").read_text()) == result.summary

    # the adapter was exported as safetensors and trained (LoRA B starts at zero)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b)
    assert json.loads((result.adapter_dir / "soup_policy.json").read_text())["n_pairs"] == 64
    assert result.summary["steps"] == 10
    assert result.summary["eval"]["pairs"] == 16 and 0.0 <= result.summary["eval"]["reward_accuracy"] <= 1.0

    run = mlflow_run(result.run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    assert (metrics["rows_total"], metrics["rows_valid"], metrics["rows_quarantined"]) == (68, 64, 4)
    assert {k: metrics[f"quarantine.{k}"] for k in BAD_REASONS} == BAD_REASONS
    assert metrics["test.rows_total"] == 16 and "eval.reward_accuracy" in metrics
    assert "quarantine/quarantine.jsonl" in artifact_paths(result.run_id, "quarantine")
    assert "adapter/adapter_model.safetensors" in artifact_paths(result.run_id, "adapter")
    assert "summary.json" in artifact_paths(result.run_id)
    printed = capsys.readouterr().out
    assert str(result.output_dir) in printed and result.run_id in printed


def test_simulate_layout_is_read_once_and_filtered_to_the_selected_users(ray_local, tmp_path):
    from raypref.data.simulate import write_shards as simulate_write_shards
    from raypref.experiments.preference import read_rows

    records = world_pairs(6, seed=6) + [dataclasses.replace(r, user_id=2) for r in world_pairs(4, seed=7)]
    simulate_write_shards(records, tmp_path / "sim", shard_size=5)  # each shard as parquet and jsonl
    cfg = job_config(tmp_path, train_data=str(tmp_path / "sim"), shard_formats=["parquet"], user_ids=[2])
    ds, report = read_rows(cfg, cfg.train_data, tmp_path / "q.jsonl")
    assert sorted(row["user_id"] for row in ds.take_all()) == [2] * 4
    assert report.summary()["rows_total"] == 10  # every row once, whatever the user


def test_too_many_bad_rows_fail_the_job_before_any_training(ray_local, tmp_path):
    write_shards(tmp_path / "train", world_pairs(32, seed=5))  # 4 bad of 36 rows: 0.111
    cfg = job_config(tmp_path, max_quarantine_fraction=0.1, test_data="")
    with pytest.raises(QuarantineExceeded, match=r"4 of 36 rows quarantined \(fraction 0\.111 > "
                                                 r"max_quarantine_fraction 0\.1\).*quarantine\.jsonl"):
        train_dpo(cfg)

    runs = mlflow.search_runs(experiment_names=["raypref-dpo"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert runs[0].data.metrics["rows_quarantined"] == 4
    assert "quarantine/quarantine.jsonl" in artifact_paths(runs[0].info.run_id, "quarantine")
    assert not sft_output_dir(cfg.sft).exists()  # not even the SFT base was trained
    assert not any((tmp_path / "dpo" / "p1a").rglob("checkpoint_*"))


def test_missing_shards_say_which_formats_were_looked_for_and_how_to_ask_for_others(ray_local, tmp_path):
    from raypref.experiments.preference import read_rows

    (tmp_path / "only-jsonl").mkdir()
    (tmp_path / "only-jsonl" / "shard-00000.jsonl").write_text("")
    cfg = job_config(tmp_path, train_data=str(tmp_path / "only-jsonl"), shard_formats=["parquet"])
    with pytest.raises(FileNotFoundError, match=r"no \*\.parquet shards under .*only-jsonl.*"
                                                r"shard_formats=\['parquet'\] were looked for, "
                                                r"read others with --shard_formats jsonl"):
        read_rows(cfg, cfg.train_data, tmp_path / "q.jsonl")


@pytest.mark.slow  # about a minute: the method by name (ORPO, added as a registry entry) on the same path
def test_job_runs_any_pair_method_by_name_with_held_out_scores_during_training(ray_local, tmp_path, shared_sft):
    write_shards(tmp_path / "train", world_pairs(64, seed=3), bad=False)
    write_shards(tmp_path / "test", world_pairs(16, seed=4), bad=False)
    cfg = job_config(tmp_path, shared_sft, method="orpo", run_name="orpo",
                     resources=Resources(num_workers=1, cpus_per_worker=1.0, checkpoint_every=10, eval_every=5))
    result = train_dpo(cfg)
    assert result.summary["method"] == "orpo" and result.summary["steps"] == 10
    assert result.summary["eval"]["pairs"] == 16 and 0.0 <= result.summary["eval"]["odds_accuracy"] <= 1.0
    assert json.loads((result.adapter_dir / "soup_policy.json").read_text())["method"] == "orpo"
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)
    # the held-out pairs scored at steps 5 and 10 (what a sweep's ASHA reads), ORPO's own terms per step
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "train.eval.heldout_odds_accuracy")
    assert [m.step for m in history] == [5, 10]
    assert len(mlflow.MlflowClient().get_metric_history(result.run_id, "train.nll")) == 10
