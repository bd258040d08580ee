"""What a sweep can tune: each job names its trial config (a dataclass the search space is
checked against), the metric it reports, how to prepare what every trial shares (once, on the
driver) and how to run one trial (inside a Tune trial: a real training run reporting to Tune).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from raypref import atomic
from raypref.config import check_fields
from raypref.eval.pairs import evaluate_pairs
from raypref.models.factory import LoraSettings, ModelConfig
from raypref.recipes.dpo import DPOConfig, DPOSpec
from raypref.recipes.reward import (RewardConfig, RewardSpec, RewardTraining,
                                    precompute_demo_embeddings)
from raypref.recipes.sft import SFTConfig
from raypref.train.runner import Optimization, Resources, runner_config

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
                     training=Optimization(steps=120, micro_batch_size=16, lr=2e-3, warmup_steps=20),
                     resources=Resources(num_workers=1, zero_stage=0, checkpoint_every=120),
                     output_dir="outputs/sft")


def _trial_dpo() -> DPOConfig:
    """Short trials: 40 steps of 8 pairs, LoRA r4."""
    return DPOConfig(steps=40, micro_batch_size=8, warmup_steps=4, lora=LoraSettings(r=4, alpha=8))


def _trial_resources() -> Resources:
    # no Ray Train restarts inside a trial: Tune's retries (SweepConfig.max_failures) do that
    return Resources(num_workers=1, zero_stage=0, max_failures=0)


@dataclass
class DPOTrialConfig:
    """A DPO trial: a LoRA on the cached SFT base, trained on simulated pairs of one preference
    (the preference's pairs are drawn once per sweep, so every trial sees the same data)."""

    sft: SFTConfig = field(default_factory=_tiny_sft)
    preference: str = "P1A"
    pairs: int = 256
    heldout_pairs: int = 128  # scored every report_every steps: the sweep's metric
    seed: int = 0
    report_every: int = 10  # steps between the metrics Tune (and ASHA) sees
    fail: bool = False  # testing the retry path: the trial raises before training, every attempt
    training: DPOConfig = field(default_factory=_trial_dpo)
    resources: Resources = field(default_factory=_trial_resources)

    def validate(self) -> None:
        from raypref.data.users import psoups_profile

        t = self.training
        t.validate("training")
        self.resources.validate("resources")
        checks = [("training.grad_accum", t.grad_accum == 1, "must be 1 (held-out scoring counts steps)"),
                  ("pairs", self.pairs >= t.micro_batch_size, "must be >= training.micro_batch_size"),
                  ("heldout_pairs", self.heldout_pairs >= 1, "must be >= 1"),
                  ("report_every", 1 <= self.report_every <= t.steps, "must be in [1, training.steps]")]
        check_fields("DPOTrialConfig", self, checks)
        psoups_profile(self.preference)  # raises on an unknown preference
        self.sft.validate()


@dataclass
class HeldoutDPOSpec(DPOSpec):
    """DPO that scores held-out pairs at every evaluation (`eval.heldout_accuracy`,
    `eval.heldout_margin`, reported to Ray between checkpoints). Held-out accuracy does not
    depend on beta, unlike the DPO loss, so trials with different betas compare fairly."""

    heldout: list = field(default_factory=list)

    def evaluate(self, ctx) -> dict[str, float]:
        scores = evaluate_pairs(ctx.model, self.tokenizer(), self.heldout, self.beta,
                                max_length=self.max_length)
        return {"heldout_accuracy": scores["reward_accuracy"], "heldout_margin": scores["reward_margin"]}


def _dpo_prepare(cfg: DPOTrialConfig, sweep_dir: Path) -> dict:
    from raypref.data.world import World
    from raypref.recipes.sft import train_sft

    sft_dir = train_sft(cfg.sft)
    world = World(seed=cfg.sft.world_seed, difficulty=cfg.sft.difficulty)
    pairs = world.pairs_for_preference(cfg.preference, cfg.pairs + cfg.heldout_pairs,
                                       np.random.default_rng(cfg.seed))
    return {"sft_dir": str(sft_dir), "pairs": pairs[:cfg.pairs], "heldout": pairs[cfg.pairs:]}


def _dpo_trial(cfg: DPOTrialConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    if cfg.fail:
        raise RuntimeError("DPOTrialConfig.fail=true: this trial fails on purpose")
    spec = HeldoutDPOSpec.from_config(cfg.training, shared["sft_dir"], shared["pairs"],
                                      name=cfg.preference, seed=cfg.seed, heldout=shared["heldout"])
    _train_trial(spec, cfg.training, cfg.resources, cfg.report_every, cfg.seed, trial_name, sweep_dir)


def _train_trial(spec, training, resources: Resources, report_every: int, seed: int,
                 trial_name: str, sweep_dir: Path) -> None:
    """Train one trial's model through the runner (Ray Train); its evaluations reach Tune via
    TuneReportCallback every `report_every` steps. The model lands in `model_path`."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypref.train.runner import FINAL_DIR, HISTORY_FILE, run

    runs = sweep_dir / "runs"
    done = runs / trial_name / FINAL_DIR / HISTORY_FILE
    if done.exists():  # finished before the sweep was interrupted, not yet recorded by Tune
        tune.report(json.loads(done.read_text())[-1])
        return
    # evaluated and reported every report_every steps; one checkpoint, at the end
    resources = replace(resources, eval_every=report_every, checkpoint_every=training.steps)
    runner_cfg = runner_config(training, resources, name=trial_name, storage_path=str(runs),
                               seed=seed, log_every=report_every)
    result = run(spec, runner_cfg, callbacks=[TuneReportCallback()])
    if result.export_path is not None:  # the history beside the model: the summary reads it
        atomic.write_text(result.export_path / HISTORY_FILE, json.dumps(result.metrics))


def model_path(sweep_dir: Path, trial_name: str) -> Path:
    """Where a trial's trained model is written."""
    from raypref.train.runner import FINAL_DIR

    return sweep_dir / "runs" / trial_name / FINAL_DIR


# ---------------------------------------------------------------- soups (merge weights)


@dataclass
class SoupsTrialConfig:
    """A soups trial: no training. Merge per-preference LoRA adapters with `weights` (exactly:
    base + sum w_i B_i A_i) and score generations with the world's judges as a target user
    would (the mean over the user's preferences of each preference's 0..1 reward). Reported
    every `report_every` prompts, so ASHA can drop a poor weighting early."""

    sft: SFTConfig = field(default_factory=_tiny_sft)
    preferences: list[str] = field(default_factory=lambda: ["P1A", "P2A", "P3B"])
    # folder with one adapter folder per preference (e.g. a soups run's runs/<key>/<P>/final);
    # "" = train them once per sweep (into <sweep>/adapters/, reused when resumed)
    adapters_dir: str = ""
    adapter_pairs: int = 256
    adapter_training: DPOConfig = field(default_factory=_trial_dpo)
    weights: dict[str, float] = field(default_factory=dict)  # searched; {} = uniform
    target: dict[str, float] = field(default_factory=lambda: {"P1A": 0.6, "P2A": 0.3, "P3B": 0.1})
    merge_method: str = "exact_lora"
    n_prompts: int = 48  # held-out prompts
    report_every: int = 8  # prompts between reports
    max_new_tokens: int = 64
    seed: int = 0

    def validate(self) -> None:
        from raypref.data.users import psoups_profile
        from raypref.models.merge import METHODS, validate_weights

        for name in [*self.preferences, *self.target]:
            psoups_profile(name)  # raises naming an unknown preference
        if self.weights:
            validate_weights(self.weights, self.preferences)
        missing = sorted(set(self.target) - set(self.preferences))
        if missing:
            raise ValueError(f"SoupsTrialConfig.target: {missing} have no adapter (preferences "
                             f"{self.preferences}); the sweep would score what it cannot merge")
        if any(w < 0 for w in self.target.values()) or sum(self.target.values()) <= 0:
            raise ValueError(f"SoupsTrialConfig.target={self.target}: weights must be >= 0, not all 0")
        if self.merge_method not in METHODS:
            raise ValueError(f"SoupsTrialConfig.merge_method={self.merge_method!r}: one of {METHODS}")
        if not 1 <= self.report_every <= self.n_prompts:
            raise ValueError("SoupsTrialConfig.report_every: must be in [1, n_prompts]")


def _soups_prepare(cfg: SoupsTrialConfig, sweep_dir: Path) -> dict:
    """The SFT base and one trained adapter per preference (trained here unless given)."""
    from raypref.data.world import World
    from raypref.recipes.sft import train_sft
    from raypref.train.runner import FINAL_DIR, run

    sft_dir = train_sft(cfg.sft)
    if cfg.adapters_dir:
        adapters = {p: str(Path(cfg.adapters_dir).expanduser().resolve() / p) for p in cfg.preferences}
        missing = [p for p, path in adapters.items() if not (Path(path) / "adapter_config.json").exists()]
        if missing:
            raise FileNotFoundError(f"SoupsTrialConfig.adapters_dir={cfg.adapters_dir}: no adapter for {missing}")
        return {"sft_dir": str(sft_dir), "adapters": adapters}
    world = World(seed=cfg.sft.world_seed, difficulty=cfg.sft.difficulty)
    t, adapters = cfg.adapter_training, {}
    for i, name in enumerate(cfg.preferences):
        final = sweep_dir / "adapters" / name / FINAL_DIR
        if not (final / "adapter_config.json").exists():
            pairs = world.pairs_for_preference(name, cfg.adapter_pairs, np.random.default_rng([cfg.seed, i]))
            spec = DPOSpec.from_config(t, str(sft_dir), pairs, name=name, seed=cfg.seed)
            print(f"[sweep] training the {name} adapter ({t.steps} steps)", flush=True)
            run(spec, runner_config(t, Resources(zero_stage=0, checkpoint_every=t.steps), name=name,
                                    storage_path=str(sweep_dir / "adapters"), seed=cfg.seed))
        adapters[name] = str(final)
    return {"sft_dir": str(sft_dir), "adapters": adapters}


def target_score(target: dict[str, float], scores: dict[str, float]) -> float:
    """The target user's 0..1 reward of one judged text: its preferences' rewards, weighted."""
    from raypref.data.labelling import preference_reward

    total = sum(target.values())
    return sum(w * preference_reward(p, scores) for p, w in target.items()) / total


def _soups_trial(cfg: SoupsTrialConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    from ray import tune

    from raypref.data.world import World
    from raypref.eval.generation import GenerationSettings, WorldScorer, judged_generations
    from raypref.models.factory import load_pretrained
    from raypref.models.merge import LoraAdapter, soup_model

    weights = cfg.weights or {p: 1.0 / len(cfg.preferences) for p in cfg.preferences}
    base, tokenizer = load_pretrained(shared["sft_dir"])
    # merged from the base module: each module's orientation and tied weights are visible
    model = soup_model(cfg.merge_method, base, weights,
                       adapters={p: LoraAdapter.from_dir(shared["adapters"][p]) for p in weights})
    world = World(seed=cfg.sft.world_seed, difficulty=cfg.sft.difficulty)
    prompts = world.prompts(cfg.n_prompts, split="test")
    eval_cfg = GenerationSettings(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    rewards: list[float] = []
    for start in range(0, len(prompts), cfg.report_every):
        chunk = prompts[start:start + cfg.report_every]
        _, scores = judged_generations(WorldScorer(world), model, tokenizer, chunk, replace(eval_cfg, seed=cfg.seed + start))
        rewards += [target_score(cfg.target, s) for s in scores]
        tune.report({"prompts": len(rewards), "user_score": float(np.mean(rewards))})


# ---------------------------------------------------------------- reward models (VAE RM, seed 001)


def _trial_reward_training() -> RewardTraining:
    """Short trials: 100 steps of 8 pairs (001 Table 1 trains 200 at lr 1e-4)."""
    return RewardTraining(steps=100, warmup_steps=3)


@dataclass
class RewardTrialConfig(RewardConfig):
    """A reward-model trial (`raypref.recipes.reward`): by default the VAE conditional RM with
    adaptive sampling on 001's two-user conflict, scored by the users' mean test accuracy.
    The query encoder is frozen (the heads train on cached MiniLM embeddings: seconds per trial
    on CPU); set `freeze_query_encoder: false` to fine-tune it as 001 does (a GPU sweep)."""

    method: str = "vae"
    sampling: str = "adaptive"
    freeze_query_encoder: bool = True
    contrastive: float = 0.5
    seed: int = 0
    report_every: int = 20  # steps between the per-user accuracies Tune (and ASHA) sees
    training: RewardTraining = field(default_factory=_trial_reward_training)
    resources: Resources = field(default_factory=_trial_resources)

    def validate(self) -> None:
        super().validate()
        self.resources.validate("resources")
        if not 1 <= self.report_every <= self.training.steps:
            raise ValueError(f"RewardTrialConfig.report_every={self.report_every}: must be in "
                             f"[1, training.steps={self.training.steps}]")


def _recipe(cfg: RewardTrialConfig) -> RewardConfig:
    return RewardConfig(**{f.name: getattr(cfg, f.name) for f in fields(RewardConfig)})


def _reward_prepare(cfg: RewardTrialConfig, sweep_dir: Path) -> dict:
    """The VAE's frozen demonstration embeddings, once per sweep (a frozen query encoder
    embeds every pair, the pool included, on the trial's worker instead)."""
    if cfg.method != "vae" or cfg.freeze_query_encoder:
        return {"demo_embeddings_path": None}
    path = sweep_dir / "cache" / "demo_embeddings.safetensors"
    if not path.exists():
        print(f"[sweep] embedding the demonstration pools once -> {path}", flush=True)
        precompute_demo_embeddings(_recipe(cfg), path)
    return {"demo_embeddings_path": str(path)}


def _reward_trial(cfg: RewardTrialConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    spec = RewardSpec(_recipe(cfg), demo_embeddings_path=shared["demo_embeddings_path"], seed=cfg.seed)
    _train_trial(spec, cfg.training, cfg.resources, cfg.report_every, cfg.seed, trial_name, sweep_dir)


JOBS: dict[str, SweepJob] = {
    "soups": SweepJob(
        name="soups", config=SoupsTrialConfig, metric="user_score", mode="max", time_attr="prompts",
        max_t=lambda cfg: cfg.n_prompts, prepare=_soups_prepare, trial=_soups_trial,
        default_space=SWEEP_SPACES / "soups.yaml"),
    "dpo": SweepJob(
        name="dpo", config=DPOTrialConfig, metric="eval.heldout_accuracy", mode="max", time_attr="step",
        max_t=lambda cfg: cfg.training.steps, prepare=_dpo_prepare, trial=_dpo_trial,
        default_space=SWEEP_SPACES / "dpo.yaml"),
    "reward": SweepJob(
        name="reward", config=RewardTrialConfig, metric="eval.acc.mean", mode="max", time_attr="step",
        max_t=lambda cfg: cfg.training.steps, prepare=_reward_prepare, trial=_reward_trial,
        default_space=SWEEP_SPACES / "vae_rm.yaml"),
}


def sweep_job(name: str) -> SweepJob:
    if name not in JOBS:
        raise ValueError(f"unknown sweep job {name!r}; known: {sorted(JOBS)}")
    return JOBS[name]
