"""Sweeps: search spaces checked before any trial, Optuna sampling, status and summary; a real
sweep of DPO trials with ASHA, MLflow child runs, a failing trial and resume after a kill."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from raypref.experiments.preference import DPOJobConfig
from raypref.experiments.sweep import JOBS
from raypref.sweep.report import DONE, FAILED, STOPPED, trial_name, trial_status
from raypref.sweep.run import SweepConfig
from raypref.sweep.run import plan as plan_with
from raypref.sweep.space import SpaceError, parse_space, simplex_weights

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"training.beta": {"distribution": "loguniform", "low": 0.05, "high": 1.0},
        "training.lora.r": {"distribution": "choice", "values": [2, 4]}}


def plan(cfg):
    return plan_with(cfg, JOBS)


def _space(params):
    return parse_space(params, DPOJobConfig, source="space.yaml")


@pytest.mark.parametrize("params, message", [
    ({"training.betta": {"distribution": "uniform", "low": 0.1, "high": 1}}, "unknown parameter"),
    ({"nope.beta": {"distribution": "uniform", "low": 0.1, "high": 1}}, "has no field 'nope'"),
    ({"training.beta": {"distribution": "uniform", "low": 1.0, "high": 1.0}}, "empty range"),
    ({"training.beta": {"distribution": "uniform", "low": 2.0, "high": 1.0}}, "low=2.0 >= high=1.0"),
    ({"training.lora.r": {"distribution": "choice", "values": []}}, "empty range"),
    ({"training.beta": {"distribution": "gaussian", "low": 0, "high": 1}}, "unknown distribution 'gaussian'"),
    ({"training.beta": {"distribution": "loguniform", "low": 0.0, "high": 1}}, "needs low > 0"),
    ({"training.beta": {"distribution": "uniform", "low": 0.0, "high": 1}}, "must be > 0"),  # validate()
    ({"training.lora.r": {"distribution": "uniform", "low": 1, "high": 8}}, "is an integer"),
    ({"training.lora.r": {"distribution": "choice", "values": ["big"]}}, "expected an integer"),
    ({"training.beta": {"distribution": "uniform", "low": 0.1, "high": 1, "step": 2}}, "takes"),
    ({"training.lr": {"distribution": "uniform", "low": "fast", "high": 1}}, "finite number"),
])
def test_invalid_spaces_fail_naming_the_parameter(params, message):
    with pytest.raises(SpaceError, match=message) as err:
        _space(params)
    assert "space.yaml" in str(err.value) and repr(next(iter(params))) in str(err.value)


def test_negative_ratio_in_a_ratio_field_is_refused():
    from dataclasses import dataclass, field

    @dataclass
    class Sampling:
        mix_ratio: float = 1.0
        weights: dict[str, float] = field(default_factory=dict)

    with pytest.raises(SpaceError, match="negative ratio -1"):
        parse_space({"mix_ratio": {"distribution": "uniform", "low": -1, "high": 2}}, Sampling)
    with pytest.raises(SpaceError, match="negative ratio"):
        parse_space({"weights": {"distribution": "choice", "values": [{"a": 1.0, "b": -0.5}]}}, Sampling)
    space = parse_space({"weights": {"distribution": "simplex", "keys": ["a", "b", "c"], "min": 0.1}},
                        Sampling)
    assert space.params[0].keys == ("a", "b", "c")


def test_a_sweep_with_a_bad_space_file_fails_before_ray_starts(tmp_path, monkeypatch):
    import ray

    # Ray may already be up (the suite shares one instance): fail if plan() tries to start it
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("plan() started Ray before validating"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"params": {"training.lr": {"distribution": "uniform",
                                                              "low": -1.0, "high": -2.0}}}))
    with pytest.raises(SpaceError, match="bad.yaml.*training.lr.*low=-1.0 >= high=-2.0"):
        plan(SweepConfig(space=str(bad), output_dir=str(tmp_path)))


def test_built_in_spaces_are_valid():
    for job in ("dpo", "soups", "reward"):
        sweep = plan(SweepConfig(job=job))
        assert sweep.space.params, job


def test_vae_rm_space_samples_seed_001s_knobs_into_the_reward_recipe():
    """Every draw of configs/sweeps/vae_rm.yaml builds a valid VAE RM trial whose adaptive
    sampler runs with the drawn ratio and phase length; a negative ratio is refused."""
    from raypref.experiments.reward import RewardJobConfig, recipe_config
    from raypref.recipes.reward import RewardSpec

    sweep = plan(SweepConfig(job="reward"))
    assert sweep.space.source.endswith("vae_rm.yaml") and sweep.job.metric == "eval.acc.mean"
    assert [p.path for p in sweep.space.params] == ["adaptive_ratio", "phase_steps", "beta",
                                                     "contrastive", "training.lr"]
    ratios = [list(v) for v in sweep.space.params[0].values]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=2))
    drawn = []
    for i in range(6):
        trial = study.ask()
        sweep.space.suggest(trial)
        study.tell(trial, 0.5 + 0.01 * i)
        cfg = sweep.space.apply(RewardJobConfig, sweep.base, trial.params)
        cfg.validate()
        recipe = recipe_config(cfg)  # what the reward job trains: the trial is its own config
        assert recipe.method == "vae" and recipe.sampling == "adaptive"
        assert recipe.adaptive_ratio in ratios and recipe.phase_steps in (10, 20, 30, 40, 50)
        assert 1e-4 <= recipe.beta <= 0.1 and 0 <= recipe.contrastive <= 1
        assert 3e-5 <= recipe.training.lr <= 1e-3
        drawn.append((tuple(recipe.adaptive_ratio), recipe.phase_steps))
    assert len(set(drawn)) > 1
    sampler = RewardSpec(recipe)._batch_sampler(rank=0, grad_accum=1)
    assert sampler.ratio == tuple(recipe.adaptive_ratio) and sampler.phase_steps == recipe.phase_steps
    with pytest.raises(SpaceError, match="adaptive_ratio.*negative ratio -1"):
        parse_space({"adaptive_ratio": {"distribution": "choice", "values": [[1.0, -1.0, 2.0]]}},
                    RewardJobConfig, source="vae.yaml")
    with pytest.raises(SpaceError, match="phase_steps.*must be >= 0"):
        parse_space({"phase_steps": {"distribution": "int", "low": -10, "high": 10}},
                    RewardJobConfig, source="vae.yaml")


def test_optuna_samples_are_seeded_and_build_valid_configs():
    space = _space({**GOOD, "training.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}})

    def draws(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=2))
        out = []
        for i in range(5):
            trial = study.ask()
            space.suggest(trial)
            study.tell(trial, float(i % 3))
            out.append(space.resolve(trial.params))
        return out

    first, again, other = draws(3), draws(3), draws(4)
    assert first == again and first != other
    base = DPOJobConfig()
    from raypref.config import to_dict

    for values in first:
        cfg = space.apply(DPOJobConfig, to_dict(base), {**values, "training.lora.r": 1})
        assert cfg.training.lora.r == 4 and 0.05 <= cfg.training.beta <= 1.0  # index 1 -> 4
        assert 1e-4 <= cfg.training.lr <= 1e-2


def test_simplex_weights_lie_on_the_simplex_above_the_floor():
    weights = simplex_weights({"a": 0.9, "b": 0.2, "c": 1e-9}, floor=0.1)
    assert abs(sum(weights.values()) - 1) < 1e-12
    assert min(weights.values()) >= 0.1 and weights["c"] > weights["b"] > weights["a"]
    assert simplex_weights({"a": 1.0, "b": 1.0}) == {"a": 0.5, "b": 0.5}


def test_soups_space_must_name_the_jobs_preferences_and_target_scores_in_0_1():
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.seed_eval import target_score

    sweep = plan(SweepConfig(job="soups"))  # the soups job's own config with the sweep's defaults
    assert sweep.job.config is SoupsConfig and [p.path for p in sweep.space.params] == ["user_weights"]
    with pytest.raises(SpaceError, match="P2B"):
        parse_space({"user_weights": {"distribution": "simplex", "keys": ["P1A", "P2B"]}}, SoupsConfig,
                    sweep.base)
    with pytest.raises(ValueError, match="user_target.*not in preferences"):
        dataclasses.replace(sweep.base_config, user_target={"P1B": 1.0}).validate()
    with pytest.raises(ValueError, match="user_target.*needs user_weights"):
        dataclasses.replace(sweep.base_config, user_weights={}).validate()
    scores = {"expertise": 0.0, "verbosity": 1.0, "style": 0.0}
    # P1A wants low expertise (reward 1), P2A low verbosity (reward 0)
    assert target_score({"P1A": 1.0}, scores) == pytest.approx(1.0)
    assert target_score({"P1A": 0.5, "P2A": 0.5}, scores) == pytest.approx(0.5)


def test_trial_status_and_names():
    assert trial_status("TERMINATED", {"step": 40}, "step", 40) == DONE
    assert trial_status("TERMINATED", {"step": 10}, "step", 40) == STOPPED
    assert trial_status("TERMINATED", {}, "step", 40) == FAILED
    assert trial_status("ERROR", {"step": 40}, "step", 40) == FAILED
    assert trial_status("RUNNING", {"step": 5}, "step", 40) == "running"

    class Trial:
        experiment_tag = "7_training_beta=0.3,training_lr=0.001"

    assert trial_name(Trial()) == "trial_007"


# ---------------------------------------------------------------- real sweeps (Ray Tune + Ray Train)

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _shards(tmp_path: Path) -> tuple[str, str]:
    """P1A's pairs as the preference job reads them: shards, as jobs/simulate.py writes them."""
    from raypref.data.simulate import write_shards
    from raypref.data.world import World

    world = World(seed=0)
    for name, n, split in (("train", 64, "train"), ("test", 32, "test")):
        pairs = world.pairs_for_preference("P1A", n, np.random.default_rng(0), split=split)
        write_shards([dataclasses.replace(p, user_id=1) for p in pairs], tmp_path / "shards" / name, 1000)
    return str(tmp_path / "shards" / "train"), str(tmp_path / "shards" / "test")


def _tiny_job(tmp_path: Path, steps: int) -> dict:
    """The preference job's config in the tests: its own shards, the cached tiny SFT base, a few steps."""
    train, test = _shards(tmp_path)
    return {"sft": {"output_dir": str(ROOT / "outputs" / "sft")},  # shared cache across tests
            "train_data": train, "test_data": test,
            "training": {"steps": steps}, "resources": {"eval_every": steps // 2}}


def _sweep_args(tmp_path, name, space, steps, samples, extra=()):
    space_file = tmp_path / f"{name}.yaml"
    space_file.write_text(yaml.safe_dump({"params": space}))
    return ["--name", name, "--output_dir", str(tmp_path / "sweeps"), "--space", str(space_file),
            "--num_samples", str(samples), "--grace_period", str(steps // 2),
            "--progress_every_s", "5", "--job_config", json.dumps(_tiny_job(tmp_path, steps)),
            *extra]


def _attempts(sweep_dir: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text().split() for p in sorted((sweep_dir / "attempts").glob("*.txt"))}


@pytest.mark.slow
def test_sweep_retries_a_failing_trial_then_records_it_and_goes_on(tmp_path):
    """3 DPO trials, seeded (1) so one draws a missing shard folder and the others not: the
    failing one is tried 1 + max_failures times, recorded as failed, and the sweep finishes the
    others; MLflow holds a child per trial."""
    import mlflow

    missing = str(tmp_path / "no-shards-here")
    space = {"training.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2},
             "test_data": {"distribution": "choice", "values": [_shards(tmp_path)[1], missing]}}
    args = _sweep_args(tmp_path, "retry", space, steps=4, samples=3,
                       extra=["--max_failures", "1", "--seed", "1", "--scheduler", "fifo"])
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), *args], env=ENV,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sweep_dir = tmp_path / "sweeps" / "retry"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert len(rows) == 3
    failing = {n for n, r in rows.items() if r["params"]["test_data"] == missing}
    assert failing and failing != set(rows), "seed 1 should draw both outcomes"
    attempts = _attempts(sweep_dir)
    for name, row in rows.items():
        if name in failing:
            assert row["status"] == FAILED and "no-shards-here" in row["error"]
            assert len(attempts[name]) == 2  # first try + max_failures=1 retry
        else:
            assert row["status"] == DONE and len(attempts[name]) == 1
            assert (Path(row["model_path"]) / "adapter_model.safetensors").exists()
    assert summary["best"]["trial"] not in failing
    best_config = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert best_config["config"]["training"]["lr"] == pytest.approx(summary["best"]["params"]["training.lr"])
    state = json.loads((sweep_dir / "sweep.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    children = client.search_runs(
        [client.get_run(state["mlflow_parent_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{state['mlflow_parent_run_id']}'")
    by_trial = {r.info.run_name: r for r in children}
    assert set(by_trial) == set(rows)
    for name, run in by_trial.items():
        assert run.data.tags["raypref.status"] == rows[name]["status"]
        assert run.info.status == ("FAILED" if name in failing else "FINISHED")
    done = next(n for n in rows if n not in failing)
    history = client.get_metric_history(by_trial[done].info.run_id, "loss")
    assert [m.step for m in history] == [2, 4]  # every report, at its step
    artifacts = {a.path for a in client.list_artifacts(state["mlflow_parent_run_id"])}
    assert {"summary.json", "best_config.yaml", "plots"} <= artifacts


@pytest.mark.slow
def test_a_killed_sweep_rerun_with_its_name_runs_only_the_remaining_trials(tmp_path):
    """Kill the sweep's process (SIGKILL, no clean-up) once its first trial has ended; the rerun
    with the same name restores the sweep and runs only the trial that had not ended (one trial
    at a time, so exactly one has ended when the kill comes)."""
    space = {"training.lr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}
    args = _sweep_args(tmp_path, "resume", space, steps=4, samples=2,
                       extra=["--scheduler", "fifo", "--max_concurrent", "1"])
    cmd = [sys.executable, str(ROOT / "jobs" / "sweep.py"), *args]
    sweep_dir = tmp_path / "sweeps" / "resume"
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    try:
        deadline, seen = time.time() + 900, []
        for line in first.stdout:
            seen.append(line)
            if "1/" in line and "trials ended" in line:
                break
            assert time.time() < deadline, "the first trial did not end in time"
        else:
            pytest.fail("the sweep ended before its first trial did:\n" + "".join(seen[-40:]))
        time.sleep(8)  # Tune saves its experiment state every 3 s (TUNE_GLOBAL_CHECKPOINT_S)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = _attempts(sweep_dir)
    assert "trial_001" in before and not (sweep_dir / "summary.json").exists()
    first_cluster = before["trial_001"][0]

    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["counts"][DONE] == 2
    after = _attempts(sweep_dir)
    rerun = {name for name, nodes in after.items() if any(n != first_cluster for n in nodes)}
    assert "trial_001" not in rerun and after["trial_001"] == before["trial_001"]
    assert rerun == set(after) - {"trial_001"} == {"trial_002"}  # the one that had not ended


@pytest.mark.slow
def test_soups_trial_scores_the_users_soup_as_the_soups_job_and_reports_per_batch(tmp_path, monkeypatch):
    """A trial is the soups job's config + sampled user_weights: the job's training stage (here
    handing over a tiny base and two random LoRA adapters, as a finished run would), then the
    job's own user-soup scoring, reported after every eval batch. Its score equals that of an
    offline soup with its weights, and another weighting scores differently."""
    import torch
    from ray import tune

    from raypref.data.world import World
    from raypref.experiments.soups import run as soups_run
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.seed_eval import target_score
    from raypref.experiments.sweep import _soups_trial
    from raypref.eval.generation import WorldScorer, judged_generations
    from raypref.models.factory import (LoraSettings, ModelConfig, add_lora, build_policy,
                                        build_tokenizer, save_pretrained_safetensors)

    model_cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2)
    world = World(0, 0.0)
    tokenizer = build_tokenizer(model_cfg, world.vocabulary())
    torch.manual_seed(0)
    base_dir = save_pretrained_safetensors(build_policy(model_cfg, tokenizer), tokenizer, tmp_path / "base")
    adapters = {}
    for i, pref in enumerate(("P1A", "P2A")):
        torch.manual_seed(i + 1)
        peft_model = add_lora(build_policy(model_cfg, tokenizer), LoraSettings(r=2, alpha=4))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)  # a non-zero update to merge
        peft_model.save_pretrained(tmp_path / pref)
        adapters[pref] = tmp_path / pref
    stages = []

    def trained_policies(cfg, out):  # the job's training stage, its runs already finished
        stages.append((out, cfg.sft.output_dir))
        return soups_run.TrainedPolicies(str(base_dir), world, soups_run.ev.eval_prompts(cfg.eval, world),
                                         [], {}, [], {}, [adapters], 0.0)

    monkeypatch.setattr(soups_run, "trained_policies", trained_policies)
    # the world's judges, as ev.make_scorer gives them (which refuses 8 tokens for a verbosity preference)
    monkeypatch.setattr(soups_run.ev, "make_scorer", lambda *args, **kwargs: WorldScorer(world))
    reports = []
    monkeypatch.setattr(tune, "report", lambda metrics: reports.append(dict(metrics)))
    space = tmp_path / "two.yaml"  # configs/sweeps/soups.yaml over two of its preferences
    space.write_text(yaml.safe_dump({"params": {"user_weights": {"distribution": "simplex", "keys": ["P1A", "P2A"]}}}))
    sweep = plan(SweepConfig(job="soups", space=str(space), grace_period=3, job_config={
        "preferences": ["P1A", "P2A"], "user_weights": {"P1A": 0.5, "P2A": 0.5}, "user_target": {"P1A": 1.0},
        "eval": {"n_prompts": 6, "batch_size": 3, "max_new_tokens": 8}}))
    cfg = sweep.space.apply(SoupsConfig, sweep.base, {"user_weights[P1A]": 0.7, "user_weights[P2A]": 0.3})
    weights = cfg.user_weights  # what the simplex made of the draws; jobs/soups.py would read the same
    assert set(weights) == {"P1A", "P2A"} and weights["P1A"] < weights["P2A"] and sum(weights.values()) == pytest.approx(1)
    shared = {"sft_folder": str(tmp_path / "sft")}  # what prepare resolved on the driver
    _soups_trial(cfg, shared, "trial_001", tmp_path)
    # the sweep's runs and SFT cache, where prepare trained them (not the trial's working dir)
    assert stages == [(tmp_path / "soups", str(tmp_path / "sft"))]
    assert [r["prompts"] for r in reports] == [3, 6]
    assert all(0.0 <= r["user_score"] <= 1.0 for r in reports)
    again = []
    monkeypatch.setattr(tune, "report", lambda metrics: again.append(dict(metrics)))
    _soups_trial(cfg, shared, "trial_001", tmp_path)
    assert again == reports  # seeded: a trial's score is reproducible
    # the trial's score is that of an offline soup with its weights (peft-materialized policies,
    # averaged in full), sampled as the soups job samples seed 0's arms, batch by batch
    from peft import PeftModel

    from raypref.models.factory import load_pretrained
    from raypref.models.merge import merge_full

    full = {}
    for pref, path in adapters.items():
        base, _ = load_pretrained(str(base_dir))
        full[pref] = PeftModel.from_pretrained(base, str(path)).merge_and_unload().state_dict()
    prompts = world.prompts(6, split="test")
    settings = dataclasses.replace(cfg.eval, seed=cfg.eval.seed + cfg.seed)

    def offline_score(weights):
        model, tok = load_pretrained(str(base_dir))
        model.load_state_dict(merge_full(full, weights))
        rewards = []
        for start in (0, 3):
            _, scores = judged_generations(WorldScorer(world), model.eval(), tok, prompts[start:start + 3],
                                           dataclasses.replace(settings, seed=settings.seed + start))
            rewards += [target_score({"P1A": 1.0}, s) for s in scores]
        return sum(rewards) / len(rewards)

    assert reports[-1]["user_score"] == pytest.approx(offline_score(weights), abs=1e-6)
    assert reports[-1]["user_score"] != pytest.approx(offline_score({"P1A": 1.0, "P2A": 0.0}), abs=1e-3)


def test_trials_the_time_budget_ended_are_not_called_stopped_early_or_failed():
    from raypref.sweep.report import CUT, BudgetWatch, TrialRow

    class T:  # the two fields of a Tune Trial the watch reads
        def __init__(self, trial_id, status):
            self.trial_id, self.status = trial_id, status

    def row(trial_id, status, error=""):
        return TrialRow(trial_id, trial_id, status, {}, {}, None, None, error=error)

    watch = BudgetWatch(budget_s=3600)
    watch.on_step_end(0, [T("a", "TERMINATED"), T("b", "RUNNING"), T("c", "ERROR"), T("d", "PENDING")])
    rows = [row("a", STOPPED), row("b", STOPPED), row("c", FAILED, "Traceback: boom"),
            row("d", FAILED, "ended without a result"), row("e", DONE)]
    assert [r.status for r in watch.mark_cuts(rows)] == [STOPPED, STOPPED, FAILED, FAILED, DONE]  # budget not spent
    watch.deadline = 0.0  # the budget has run out
    watch.on_step_end(1, [T("b", "TERMINATED")])  # seen ended only after the deadline: not recorded
    assert [r.status for r in watch.mark_cuts(rows)] == [STOPPED, CUT, FAILED, CUT, DONE]
    assert BudgetWatch(budget_s=0).mark_cuts([row("b", STOPPED)])[0].status == STOPPED  # no budget, no cuts


@pytest.mark.slow
def test_a_dpo_sweep_trial_and_jobs_dpo_train_on_the_same_batches(ray_local, tmp_path, monkeypatch):
    """The sweep's DPO trial is the preference job's own config run through the job's own
    experiment: with the same settings, jobs/dpo.py and a trial hand the runner the same spec
    (method, beta, LoRA, seed, shuffle, held-out pairs) and the same tokenized Ray Data rows."""
    import torch

    from raypref.config import to_dict
    from raypref.data.world import World
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer, save_pretrained_safetensors
    from raypref.train import runner

    tokenizer = build_tokenizer(ModelConfig(), World(seed=0).vocabulary())
    torch.manual_seed(0)
    base = save_pretrained_safetensors(build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer),
                                       tokenizer, tmp_path / "base")
    calls = []

    class Captured(Exception):
        pass

    def fake_run(spec, cfg, datasets=None, **kwargs):  # stands in for Ray Train: what it would train on
        rows = sorted(tuple(r["chosen_input_ids"].tolist()) + tuple(r["rejected_input_ids"].tolist())
                      for r in datasets["train"].take_all())
        calls.append((spec, cfg, rows))
        raise Captured

    monkeypatch.setattr(runner, "run", fake_run)
    import ray.tune.integration.ray_train as tune_train  # outside a Tune session: a stand-in callback

    monkeypatch.setattr(tune_train, "TuneReportCallback", lambda: "tune-report-callback")
    job_config = {**_tiny_job(tmp_path, 8), "base_policy": str(base)}
    sweep = plan(SweepConfig(job="dpo", job_config=job_config, output_dir=str(tmp_path / "sweeps"), grace_period=4))
    drawn = {"training.beta": 0.3, "training.lr": 2e-3, "training.lora.r": 1}  # r: index 1 -> 4
    trial_cfg = sweep.space.apply(DPOJobConfig, sweep.base, drawn)
    with pytest.raises(Captured):
        sweep.job.trial(trial_cfg, {}, "trial_000", sweep.path)

    settings = {k: v for k, v in to_dict(trial_cfg).items() if k not in ("output_dir", "run_name")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(settings))
    sys.path.insert(0, str(ROOT))
    from jobs.dpo import main

    with pytest.raises(Captured):
        main(["--config", str(tmp_path / "job.yaml"), "--output_dir", str(tmp_path / "job"), "--run_name", "j"])

    (trial_spec, trial_run, trial_rows), (job_spec, job_run, job_rows) = calls
    assert (trial_spec.beta, trial_spec.lora.r) == (0.3, 4)
    assert {**trial_spec.fingerprint(), "name": ""} == {**job_spec.fingerprint(), "name": ""}
    assert trial_spec.heldout and trial_spec.heldout == job_spec.heldout  # the sweep's metric: job data
    same = ("lr", "max_steps", "micro_batch_size", "grad_accum", "seed", "warmup_steps", "num_workers")
    assert {k: getattr(trial_run, k) for k in same} == {k: getattr(job_run, k) for k in same}
    assert len(trial_rows) == 64 and trial_rows == job_rows


def test_dpo_sweep_resolves_its_paths_on_the_driver_and_stops_on_missing_shards(tmp_path, monkeypatch):
    """A trial runs in its own working directory: the job's relative shard and SFT-cache paths
    reach it as the driver resolved them, and a missing shard folder stops the sweep in prepare."""
    from raypref.experiments.sweep import JOBS, _dpo_paths

    train, test = _shards(tmp_path)
    monkeypatch.chdir(tmp_path)
    job = JOBS["dpo"]
    cfg = DPOJobConfig(train_data=os.path.relpath(train, tmp_path), test_data=os.path.relpath(test, tmp_path),
                       base_policy="unused-here")  # a base policy: prepare trains no SFT
    cfg.sft.output_dir, cfg.resources.eval_every = "outputs/sft", 10
    shared = job.prepare(cfg, tmp_path / "sweeps")
    monkeypatch.chdir(tmp_path / "shards")  # where a trial might run
    resolved = _dpo_paths(cfg, shared)
    assert (Path(resolved.train_data), Path(resolved.test_data)) == (Path(train), Path(test))
    assert Path(resolved.sft.output_dir) == tmp_path / "outputs" / "sft"
    sampled = dataclasses.replace(cfg, test_data="/elsewhere/shards")  # an absolute sampled path stays
    assert _dpo_paths(sampled, shared).test_data == "/elsewhere/shards"
    missing = dataclasses.replace(cfg, train_data="no-shards")
    with pytest.raises(FileNotFoundError, match=r"job_config.train_data: no such shard folder or file: "
                                                r".*no-shards.*jobs/simulate.py"):
        job.prepare(missing, tmp_path / "sweeps")
