"""What a sweep can tune: each job names its trial config (a dataclass the search space is
checked against), the metric it reports, how to prepare what every trial shares (once, on the
driver) and how to run one trial (inside a Tune trial: a real training run reporting to Tune).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raypref.models.factory import LoraSettings, ModelConfig
from raypref.recipes.sft import SFTConfig, _default_runner

SWEEP_SPACES = Path(__file__).resolve().parents[2] / "configs" / "sweeps"


@dataclass
class SweepJob:
    name: str
    config: type  # the trial config dataclass (search-space paths are its fields)
    metric: str
    mode: str  # "min" or "max"
    time_attr: str  # the reported progress counter ASHA schedules on
    max_t: Callable[[Any], int]  # full length of a trial, in time_attr units
    prepare: Callable[[Any, Path], dict]  # (base config, sweep dir) -> inputs every trial shares
    trial: Callable[[Any, dict, str, Path], None]  # (trial config, shared, trial name, sweep dir)
    default_space: Path = Path()


# ---------------------------------------------------------------- DPO


def _tiny_sft() -> SFTConfig:
    """A small SFT base (1 layer x 64): trains in about a minute, cached by config hash."""
    return SFTConfig(model=ModelConfig(n_layer=1, n_embd=64, n_head=2), corpus_size=1000,
                     runner=replace(_default_runner(), max_steps=120, log_every=40),
                     output_dir="outputs/sft")


@dataclass
class DPOTrialTraining:
    """One DPO trial's optimisation: a LoRA policy on the SFT base."""

    steps: int = 40
    micro_batch_size: int = 8
    lr: float = 5e-4
    warmup_steps: int = 4
    beta: float = 0.5
    loss_type: str = "sigmoid"
    max_length: int = 128
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(r=4, alpha=8))


@dataclass
class DPOTrialResources:
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    zero_stage: int = 0
    max_failures: int = 0  # Ray Train restarts inside a trial; Tune's retries come on top


@dataclass
class DPOTrialConfig:
    """A DPO trial: a LoRA on the cached SFT base, trained on simulated pairs of one preference
    (the preference's pairs are drawn once per sweep, so every trial sees the same data)."""

    sft: SFTConfig = field(default_factory=_tiny_sft)
    preference: str = "P1A"
    pairs: int = 256
    seed: int = 0
    report_every: int = 10  # steps between the metrics Tune (and ASHA) sees
    training: DPOTrialTraining = field(default_factory=DPOTrialTraining)
    resources: DPOTrialResources = field(default_factory=DPOTrialResources)

    def validate(self) -> None:
        from raypref.data.users import psoups_profile

        t = self.training
        checks = [("training.steps", t.steps >= 1, "must be >= 1"),
                  ("training.lr", t.lr > 0, "must be > 0"),
                  ("training.beta", t.beta > 0, "must be > 0"),
                  ("training.lora.r", t.lora.r >= 1, "must be >= 1"),
                  ("pairs", self.pairs >= t.micro_batch_size, "must be >= training.micro_batch_size"),
                  ("report_every", 1 <= self.report_every <= t.steps, "must be in [1, training.steps]")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"DPOTrialConfig.{name}: {rule}")
        psoups_profile(self.preference)  # raises on an unknown preference
        self.sft.validate()


def _dpo_prepare(cfg: DPOTrialConfig, sweep_dir: Path) -> dict:
    from raypref.data.world import World
    from raypref.recipes.sft import train_sft

    sft_dir = train_sft(cfg.sft)
    world = World(seed=cfg.sft.world_seed, difficulty=cfg.sft.difficulty)
    pairs = world.pairs_for_preference(cfg.preference, cfg.pairs, np.random.default_rng(cfg.seed))
    return {"sft_dir": str(sft_dir), "pairs": pairs}


def _dpo_trial(cfg: DPOTrialConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    """Train one LoRA through the runner; its reports reach Tune via TuneReportCallback."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypref.recipes.dpo import SoupDPOSpec
    from raypref.train.runner import FINAL_DIR, HISTORY_FILE, run

    t, r = cfg.training, cfg.resources
    runs = sweep_dir / "runs"
    done = runs / trial_name / FINAL_DIR / HISTORY_FILE
    if done.exists():  # finished before the sweep was interrupted, not yet recorded by Tune
        tune.report(json.loads(done.read_text())[-1])
        return
    spec = SoupDPOSpec(sft_dir=shared["sft_dir"], pairs=shared["pairs"], preference=cfg.preference,
                       lora=t.lora, beta=t.beta, loss_type=t.loss_type, max_length=t.max_length,
                       micro_batch_size=t.micro_batch_size, seed=cfg.seed)
    runner_cfg = spec.runner_config(
        lr=t.lr, max_steps=t.steps, warmup_steps=t.warmup_steps, num_workers=r.num_workers,
        cpus_per_worker=r.cpus_per_worker, use_gpu=r.use_gpu, zero_stage=r.zero_stage,
        max_failures=r.max_failures, checkpoint_every=cfg.report_every, keep_checkpoints=1,
        storage_path=str(runs), name=trial_name, seed=cfg.seed, log_every=cfg.report_every)
    result = run(spec, runner_cfg, callbacks=[TuneReportCallback()])
    if result.export_path is not None:  # the history beside the model: the summary reads it
        (result.export_path / HISTORY_FILE).write_text(json.dumps(result.metrics))


def model_path(sweep_dir: Path, trial_name: str) -> Path:
    """Where a trial's trained model is written."""
    from raypref.train.runner import FINAL_DIR

    return sweep_dir / "runs" / trial_name / FINAL_DIR


JOBS: dict[str, SweepJob] = {
    "dpo": SweepJob(
        name="dpo", config=DPOTrialConfig, metric="loss", mode="min", time_attr="step",
        max_t=lambda cfg: cfg.training.steps, prepare=_dpo_prepare, trial=_dpo_trial,
        default_space=SWEEP_SPACES / "dpo.yaml"),
}


def sweep_job(name: str) -> SweepJob:
    if name not in JOBS:
        raise ValueError(f"unknown sweep job {name!r}; known: {sorted(JOBS)}")
    return JOBS[name]
