"""The training core: step context, parameter groups, evaluation reported between checkpoints,
run fingerprints, RNG state, storage URIs, recipe registry and import contract."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ray import cloudpickle

from raypref.train import storage
from raypref.train.fingerprint import RunMismatch, check_fingerprint, run_fingerprint
from raypref.train.runner import RunnerConfig, _rng_state, _set_rng_state, deepspeed_config, run
from raypref.train.spec import LoopSpec, Role, digest

cloudpickle.register_pickle_by_value(sys.modules[__name__])
REPO = Path(__file__).resolve().parents[1]


class TwoGroupSpec(LoopSpec):
    """A linear model whose weight and bias are two parameter groups with their own rates; it
    records the step context in its metrics, counts micro-batches in its state and reports an
    evaluation metric."""

    def __init__(self, bias_lr: float, events: str):
        self.bias_lr, self.events, self.seen = bias_lr, events, 0

    def build_model(self, role="policy"):
        return torch.nn.Linear(4, 1)

    def param_groups(self, role, model):
        return [{"params": [model.weight]}, {"params": [model.bias], "lr": self.bias_lr}]

    def batches(self, ctx):
        while True:
            gen = torch.Generator().manual_seed(ctx.step * 100 + self.seen)
            yield torch.randn(ctx.micro_batch_size, 4, generator=gen)

    def loss(self, batch, ctx):
        self.seen += 1
        target = batch.sum(dim=1, keepdim=True) + 3.0
        loss = ((ctx.model(batch) - target) ** 2).mean()
        return loss, {"ctx_step": float(ctx.step), "ctx_batch": float(batch.shape[0] * ctx.grad_accum),
                      "ctx_world": float(ctx.world_size), "seen": float(self.seen)}

    def evaluate(self, ctx):
        return {"bias": float(ctx.model.bias.item()), "max_steps": float(ctx.max_steps)}

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class RecordReports:
    """A Ray Train callback (runs in the controller): appends every report to a file."""

    def __new__(cls, path: str):
        from ray.train import UserCallback

        class _Recorder(UserCallback):
            def after_report(self, run_context, metrics, checkpoint):
                with open(path, "a") as f:
                    f.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint is not None}) + "\n")

        return _Recorder()


@pytest.mark.slow
def test_groups_context_evaluation_between_checkpoints_and_spec_state(ray_local, tmp_path):
    events = tmp_path / "reports.jsonl"
    cfg = RunnerConfig(num_workers=1, zero_stage=0, lr=5e-2, warmup_steps=0, schedule="warmup_constant",
                       max_steps=6, micro_batch_size=4, grad_accum=2, checkpoint_every=100,
                       eval_every=2, log_every=3, storage_path=str(tmp_path / "runs"), name="groups")
    result = run(TwoGroupSpec(bias_lr=1e-9, events=str(events)), cfg,
                 callbacks=[RecordReports(str(events))])
    rows = result.metrics
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["ctx_step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the step reaches loss()
    assert all(r["ctx_batch"] == 8 and r["ctx_world"] == 1 for r in rows)
    assert rows[-1]["seen"] == pytest.approx(11.5)  # mean of micro-batches 11 and 12: state kept count
    # the bias group's own tiny rate kept it where it started; the weight group learned
    from safetensors.torch import load_file

    weights = load_file(str(result.export_path / "model.safetensors"))
    torch.manual_seed(0)
    init = torch.nn.Linear(4, 1)
    assert torch.allclose(weights["bias"], init.bias, atol=1e-6)
    assert not torch.allclose(weights["weight"], init.weight, atol=1e-2)

    reports = [json.loads(line) for line in events.read_text().splitlines()]
    between = [r["metrics"] for r in reports if not r["checkpoint"]]
    # evaluations at steps 2 and 4 and the log step 3 reached Ray before the only checkpoint (6)
    assert [m["step"] for m in between] == [2, 3, 4]
    assert "eval.bias" in between[0] and "eval.bias" not in between[1]
    assert reports[-1]["checkpoint"] and reports[-1]["metrics"]["step"] == 6
    assert reports[-1]["metrics"]["eval.max_steps"] == 6


def test_deepspeed_config_gives_each_parameter_group_its_peak_rate():
    ds = deepspeed_config(RunnerConfig(lr=1e-3), group_lrs=[1e-3, 1e-4])
    assert ds["scheduler"]["params"]["warmup_max_lr"] == [1e-3, 1e-4]
    assert deepspeed_config(RunnerConfig(lr=1e-3))["scheduler"]["params"]["warmup_max_lr"] == 1e-3


# ---------------------------------------------------------------- fingerprints

class ConfigSpec(LoopSpec):
    def __init__(self, pairs):
        self.pairs = pairs

    def fingerprint(self):
        return {"pairs": digest(self.pairs)}


def test_a_changed_run_refuses_to_resume_and_names_what_changed(tmp_path):
    cfg = RunnerConfig(name="r", storage_path=str(tmp_path))
    data = {"shards": {"a.parquet": {"bytes": 10}}}
    check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 2]), cfg, data))
    check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 2]), cfg, data))  # same: fine

    changed = RunnerConfig(name="r", storage_path=str(tmp_path), lr=2e-3)
    with pytest.raises(RunMismatch, match=r"config\.lr: 0\.001 -> 0\.002"):
        check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 2]), changed, data))
    with pytest.raises(RunMismatch, match=r"spec\.pairs"):
        check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 3]), cfg, data))
    with pytest.raises(RunMismatch, match=r"data\.shards\.a\.parquet\.bytes: 10 -> 11"):
        check_fingerprint(str(tmp_path), "r", run_fingerprint(
            ConfigSpec([1, 2]), cfg, {"shards": {"a.parquet": {"bytes": 11}}}))
    layout = RunnerConfig(name="r", storage_path=str(tmp_path), num_workers=2)
    with pytest.raises(RunMismatch, match=r"layout\.num_workers: 1 -> 2"):
        check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 2]), layout, data))
    # how it is run (logging, failures) is not part of what is trained
    relaxed = RunnerConfig(name="r", storage_path=str(tmp_path), log_every=1, max_failures=5)
    check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 2]), relaxed, data))

    (tmp_path / "r" / "checkpoint_000002").mkdir()
    check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1, 3]), cfg, data), restart=True)
    assert not (tmp_path / "r" / "checkpoint_000002").exists()  # restart deleted the old run
    saved = json.loads((tmp_path / "r" / "raypref_fingerprint.json").read_text())
    assert saved["spec"]["pairs"] == digest([1, 3])


def test_a_code_only_change_resumes_with_a_warning_unless_strict(tmp_path, monkeypatch, capsys):
    cfg = RunnerConfig(name="r", storage_path=str(tmp_path))
    check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1]), cfg))
    old = json.loads((tmp_path / "r" / "raypref_fingerprint.json").read_text())["code"]
    monkeypatch.setattr("raypref.train.fingerprint.code_version", lambda: "0.1.0+changed")
    with pytest.raises(RunMismatch, match=r"trained by raypref .* this is 0\.1\.0\+changed; strict_code"):
        check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1]), cfg), strict_code=True)
    check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1]), cfg))
    warning = capsys.readouterr().out
    assert "WARNING r: resuming a run trained by raypref" in warning
    assert old in warning and "0.1.0+changed" in warning
    saved = json.loads((tmp_path / "r" / "raypref_fingerprint.json").read_text())
    assert saved["code"] == "0.1.0+changed" and saved["code_history"] == [old, "0.1.0+changed"]
    with pytest.raises(RunMismatch, match=r"config\.lr"):  # code and config changed: refused
        check_fingerprint(str(tmp_path), "r", run_fingerprint(ConfigSpec([1]), RunnerConfig(lr=0.5)))


def test_a_run_folder_without_fingerprint_is_not_resumed_blindly(tmp_path):
    (tmp_path / "old" / "checkpoint_000001").mkdir(parents=True)
    with pytest.raises(RunMismatch, match="no raypref_fingerprint.json"):
        check_fingerprint(str(tmp_path), "old", run_fingerprint(ConfigSpec([1]), RunnerConfig()))


# ---------------------------------------------------------------- RNG, storage

def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = _rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    _set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_storage_uri_reaches_ray_train_untouched(monkeypatch, tmp_path):
    assert storage.resolve("s3://bucket/raypref/runs") == "s3://bucket/raypref/runs"
    assert storage.resolve("gs://b/x") == "gs://b/x"
    assert storage.resolve("rel/dir") == str(Path("rel/dir").resolve())
    assert storage.join("s3://bucket/runs/", "r", "final") == "s3://bucket/runs/r/final"

    seen = {}

    class FakeTrainer:
        def __init__(self, *args, run_config, **kwargs):
            seen["storage_path"], seen["name"] = run_config.storage_path, run_config.name
            seen["loop"] = kwargs["train_loop_config"]["storage"]

        def fit(self):
            raise RuntimeError("stop here")

    monkeypatch.setattr("ray.train.torch.TorchTrainer", FakeTrainer)
    monkeypatch.setattr("raypref.train.runner.check_fingerprint", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="stop here"):
        run(ConfigSpec([1]), RunnerConfig(storage_path="s3://bucket/raypref/runs", name="r1"))
    assert seen == {"storage_path": "s3://bucket/raypref/runs", "name": "r1",
                    "loop": "s3://bucket/raypref/runs"}


def test_file_uri_storage_round_trips_small_files(tmp_path):
    uri = f"file://{tmp_path}/runs"
    storage.write_text(storage.join(uri, "r", "f.json"), "{}")
    assert storage.exists(storage.join(uri, "r", "f.json"))
    assert storage.read_text(storage.join(uri, "r", "f.json")) == "{}"
    assert (tmp_path / "runs" / "r" / "f.json").exists()


def test_roles_must_include_a_trainable_one(tmp_path):
    class Frozen(ConfigSpec):
        def roles(self):
            return {"reference": Role(trainable=False)}

    with pytest.raises(ValueError, match="at least one trainable role"):
        run(Frozen([1]), RunnerConfig(storage_path=str(tmp_path)))


# ---------------------------------------------------------------- registries and layout

def test_recipe_registry_is_what_configs_are_checked_against():
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.recipes import RECIPES, recipe

    assert {"sft", "dpo"} <= set(RECIPES)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        recipe("nope")
    with pytest.raises(ValueError, match=r"algo='sft': available per-preference trainers: \['dpo'"):
        SoupsConfig(algo="sft").validate()


def test_import_contract_holds():
    """The one-way arrows of docs/DESIGN.md, enforced by import-linter (pyproject.toml)."""
    linter = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(linter)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize("job, args, message", [
    ("soups", ["--training.lr", "0"], r"training\.lr=0\.0: must be > 0"),
    ("soups", ["--training.loss_type", "hinge"], r"training\.loss_type='hinge'"),
    ("soups", ["--merge_method", "avg"], r"merge_method='avg'"),
    ("soups", ["--training.micro_batch_size", "0"], r"training\.micro_batch_size=0"),
    ("soups", ["--resources.eval_every", "-1"], r"resources\.eval_every=-1"),
    ("soups", ["--eval.temperature", "0"], r"eval\.temperature=0\.0"),
    ("soups", ["--training.lora.r", "0"], r"training\.lora\.r=0"),
    ("dpo", ["--resources.zero_stage", "5"], r"resources\.zero_stage=5"),
    ("dpo", ["--user_ids", "[-1]"], r"user_ids=\[-1\]"),
    ("sft", ["--training.warmup_steps", "-1"], r"training\.warmup_steps=-1"),
    ("sft", ["--model.dropout", "1.5"], r"ModelConfig\.dropout=1\.5"),
])
def test_every_config_value_is_checked_before_any_work(job, args, message):
    """parse_args validates the whole config: a bad value fails before Ray or training starts."""
    from raypref.config import ConfigError, parse_args
    from raypref.experiments.preference import DPOJobConfig
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.recipes.sft import SFTConfig

    cls = {"soups": SoupsConfig, "dpo": DPOJobConfig, "sft": SFTConfig}[job]
    with pytest.raises((ConfigError, ValueError), match=message):
        parse_args(cls, args)


def test_a_records_digest_without_a_context_is_the_digest_from_before_the_field_existed():
    # run folders made before PreferenceRecord.context existed must still resume (same fingerprint)
    import dataclasses

    from raypref.data.records import PreferenceRecord
    from raypref.train.spec import digest

    old_fields = [(f.name, f.type, f) for f in dataclasses.fields(PreferenceRecord) if f.name != "context"]
    Old = dataclasses.make_dataclass("PreferenceRecord", old_fields)
    Old.__qualname__ = PreferenceRecord.__qualname__
    values = dict(user_id=1, prompt="User: hi\nAssistant: hello\nUser: and?\nAssistant:",
                  chosen="yes", rejected="no")
    assert digest(PreferenceRecord(**values)) == digest(Old(**values))
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
             {"role": "user", "content": "and?"}]
    assert digest(PreferenceRecord(**values, context=turns)) != digest(PreferenceRecord(**values))
