"""The sweep job (``jobs/sweep.py``) and what it can tune: each job's *own* config, run through
the same experiment function the job runs, on the same data path. A trial is the job config,
plus the sweep's short-trial defaults (`SweepJob.defaults`), plus ``job_config`` overrides, plus
the sampled values; it runs ``run_experiment`` with Tune's report callback, so the metric ASHA
schedules on comes from the job's own training run. (The Tune / Optuna / ASHA machinery:
``raypref.sweep``.)

    dpo     the preference job (experiments/preference.py): any preference-pair method by name
            (job_config: {method: orpo}); metric: held-out accuracy of that method, every
            resources.eval_every steps
    reward  the reward job (experiments/reward.py); metric: the users' mean test accuracy
    soups   merge weights over trained adapters (no training; its own trial config, below)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from raypref import atomic
from raypref.experiments.preference import DPOJobConfig, PreferenceExperiment
from raypref.experiments.reward import RewardExperiment, RewardJobConfig, demo_cache
from raypref.experiments.run import SUMMARY_FILE, run_experiment
from raypref.models.factory import LoraSettings, ModelConfig
from raypref.recipes import recipe
from raypref.recipes.dpo import DPOConfig, DPOSpec
from raypref.recipes.sft import SFTConfig, train_sft
from raypref.sweep.run import SweepConfig, SweepJob, run_sweep as _run_sweep
from raypref.train.runner import HISTORY_FILE, Optimization, Resources, runner_config

SWEEP_SPACES = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
TRIALS_DIR = "trials"  # <sweep>/trials/<trial>: each trial's job run folder


def _tiny_sft() -> SFTConfig:
    """A small SFT base (1 layer x 64): trains in about a minute, cached by config hash."""
    return SFTConfig(model=ModelConfig(n_layer=1, n_embd=64, n_head=2), corpus_size=1000,
                     training=Optimization(steps=120, micro_batch_size=16, lr=2e-3, warmup_steps=20),
                     resources=Resources(num_workers=1, zero_stage=0, checkpoint_every=120),
                     output_dir="outputs/sft")


# ---------------------------------------------------------------- trials of a job's own config


def _trial_run(experiment, cfg, trial_name: str, sweep_dir: Path) -> None:
    """Run the job's experiment as trial ``trial_name`` (its run folder: <sweep>/trials/<trial>),
    reporting to Tune every resources.eval_every steps. A trial that finished before the sweep
    was interrupted (Tune had not recorded it) reports its last row again instead of retraining."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    folder = sweep_dir / TRIALS_DIR / trial_name
    done = folder / HISTORY_FILE
    if done.exists():
        tune.report(json.loads(done.read_text())[-1])
        return
    steps = cfg.training.steps
    # one checkpoint, at the end; no Ray Train restarts inside a trial: Tune's retries do that
    cfg = replace(cfg, output_dir=str(sweep_dir / TRIALS_DIR), run_name=trial_name,
                  resources=replace(cfg.resources, checkpoint_every=steps, max_failures=0))
    every = cfg.resources.eval_every

    class Trial(experiment):  # the job's own experiment; its rows reach Tune every eval_every steps
        def runner_config(self, run):
            return replace(super().runner_config(run), log_every=every)

    result = run_experiment(Trial(callbacks=[TuneReportCallback()]), cfg)
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_text(done, json.dumps(result.metrics))


def model_path(sweep_dir: Path, trial_name: str) -> Path:
    """What a finished trial exported (from its run's summary.json; a missing path if none)."""
    summary = sweep_dir / TRIALS_DIR / trial_name / SUMMARY_FILE
    if summary.exists():
        exported = json.loads(summary.read_text()).get("policy_dir")
        if exported:
            return Path(exported)
    return sweep_dir / TRIALS_DIR / trial_name / "none"


# DPO (or any preference-pair method): short trials on the job's own shards, held-out scores
# every 10 steps. Fractional CPUs: the trial's process, its training worker and Ray Data's
# tokenizer and validation tasks must all fit next to each other (on 2 cores: 1 + 0.5 + 0.25s)
DPO_TRIAL_DEFAULTS = {
    "sft": _tiny_sft(),
    "training": {"steps": 40, "micro_batch_size": 8, "warmup_steps": 4, "lora": {"r": 4, "alpha": 8}},
    "resources": {"eval_every": 10, "cpus_per_worker": 0.5},
    "data_cpus": 0.25,
    "max_eval_pairs": 128,
}


def _dpo_metric(cfg: DPOJobConfig) -> str:
    return f"eval.heldout_{recipe(cfg.method).metric}"


def _dpo_check(cfg: DPOJobConfig) -> None:
    if not cfg.resources.eval_every:
        raise ValueError("job_config.resources.eval_every: must be >= 1 (the held-out scores Tune sees)")
    if not cfg.test_data:
        raise ValueError("job_config.test_data: a sweep scores held-out pairs; name the test shards")
    if cfg.training.grad_accum != 1:
        raise ValueError("job_config.training.grad_accum: must be 1 (held-out scoring counts steps)")


def _dpo_prepare(cfg: DPOJobConfig, sweep_dir: Path) -> dict:
    """The SFT base, once on the driver (the trials find it in the cache)."""
    _dpo_check(cfg)
    if not cfg.base_policy:
        train_sft(cfg.sft)
    return {}


def _dpo_trial(cfg: DPOJobConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    _dpo_check(cfg)
    _trial_run(PreferenceExperiment, cfg, trial_name, sweep_dir)


# reward models: by default the VAE conditional RM with adaptive sampling on Liu 2025's two-user
# conflict; the query encoder frozen (the heads train on cached MiniLM embeddings: seconds per
# trial on CPU); set freeze_query_encoder: false to fine-tune it as Liu 2025 does (a GPU sweep)
REWARD_TRIAL_DEFAULTS = {
    "method": "vae", "sampling": "adaptive", "freeze_query_encoder": True, "contrastive": 0.5,
    "training": {"steps": 100, "warmup_steps": 3},  # Liu 2025 Table 1 trains 200 at lr 1e-4
    "resources": {"eval_every": 20, "num_workers": 1, "zero_stage": 0},
}


def _reward_prepare(cfg: RewardJobConfig, sweep_dir: Path) -> dict:
    """The VAE's frozen demonstration embeddings, once per sweep, where the trials look for them."""
    demo_cache(replace(cfg, output_dir=str(sweep_dir / TRIALS_DIR)))
    return {}


def _reward_trial(cfg: RewardJobConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    if not cfg.resources.eval_every:
        raise ValueError("job_config.resources.eval_every: must be >= 1 (the accuracies Tune sees)")
    _trial_run(RewardExperiment, cfg, trial_name, sweep_dir)


# ---------------------------------------------------------------- soups (merge weights)
# Not yet a trial of the soups job's own config: the soups job trains and evaluates every
# combination at once, while this trial only merges given adapters with sampled weights.


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
    adapter_training: DPOConfig = field(default_factory=lambda: DPOConfig(
        steps=40, micro_batch_size=8, warmup_steps=4, lora=LoraSettings(r=4, alpha=8)))
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
    world = World.from_config(cfg.sft)
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
    world = World.from_config(cfg.sft)
    prompts = world.prompts(cfg.n_prompts, split="test")
    eval_cfg = GenerationSettings(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    rewards: list[float] = []
    for start in range(0, len(prompts), cfg.report_every):
        chunk = prompts[start:start + cfg.report_every]
        _, scores = judged_generations(WorldScorer(world), model, tokenizer, chunk, replace(eval_cfg, seed=cfg.seed + start))
        rewards += [target_score(cfg.target, s) for s in scores]
        tune.report({"prompts": len(rewards), "user_score": float(np.mean(rewards))})


JOBS: dict[str, SweepJob] = {
    "soups": SweepJob(
        name="soups", config=SoupsTrialConfig, metric="user_score", mode="max", time_attr="prompts",
        max_t=lambda cfg: cfg.n_prompts, prepare=_soups_prepare, trial=_soups_trial,
        default_space=SWEEP_SPACES / "soups.yaml", model_path=lambda sweep_dir, trial: None),
    "dpo": SweepJob(
        name="dpo", config=DPOJobConfig, metric=_dpo_metric, mode="max", time_attr="step",
        max_t=lambda cfg: cfg.training.steps, prepare=_dpo_prepare, trial=_dpo_trial,
        default_space=SWEEP_SPACES / "dpo.yaml", defaults=DPO_TRIAL_DEFAULTS, model_path=model_path),
    "reward": SweepJob(
        name="reward", config=RewardJobConfig, metric="eval.acc.mean", mode="max", time_attr="step",
        max_t=lambda cfg: cfg.training.steps, prepare=_reward_prepare, trial=_reward_trial,
        default_space=SWEEP_SPACES / "vae_rm.yaml", defaults=REWARD_TRIAL_DEFAULTS, model_path=model_path),
}


def run_sweep(cfg: SweepConfig) -> dict:
    """Run (or continue) the sweep of ``cfg.job``; returns the summary (also <sweep>/summary.json)."""
    return _run_sweep(cfg, JOBS)
