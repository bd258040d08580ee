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
    soups   the soups job (experiments/soups/): the user's merge weights (user_weights) over the
            per-preference policies the sweep trains once; metric: the user's judged score
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from raypref import atomic
from raypref.experiments.preference import DPOJobConfig, PreferenceExperiment
from raypref.experiments.reward import RewardExperiment, RewardJobConfig, demo_cache
from raypref.experiments.run import SUMMARY_FILE, run_experiment
from raypref.experiments.soups.config import SoupsConfig
from raypref.models.factory import ModelConfig
from raypref.recipes import recipe
from raypref.recipes.sft import SFTConfig, train_sft
from raypref.sweep.run import SweepConfig, SweepJob, run_sweep as _run_sweep
from raypref.train import storage
from raypref.train.runner import HISTORY_FILE, Optimization, Resources

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


def _dpo_paths(cfg: DPOJobConfig, shared: dict) -> DPOJobConfig:
    """``cfg`` with its relative shard and SFT-cache paths resolved against the driver's working
    directory (a trial runs in its own, where a relative path names another folder); sampled
    paths are resolved the same way, absolute paths and URIs are left as they are."""
    root = shared.get("cwd")

    def at(path: str) -> str:
        if not root or not path or storage.is_uri(path) or Path(path).expanduser().is_absolute():
            return path
        return str(Path(root) / path)

    return replace(cfg, train_data=at(cfg.train_data), test_data=at(cfg.test_data),
                   sft=replace(cfg.sft, output_dir=at(cfg.sft.output_dir)))


def _dpo_prepare(cfg: DPOJobConfig, sweep_dir: Path) -> dict:
    """The driver's working directory for the trials' relative paths (a missing shard folder
    stops the sweep here, not in every trial), and the SFT base, once on the driver (the trials
    find it in the cache)."""
    _dpo_check(cfg)
    shared = {"cwd": str(Path.cwd())}
    cfg = _dpo_paths(cfg, shared)
    for key in ("train_data", "test_data"):
        path = getattr(cfg, key)
        if not storage.is_uri(path) and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"job_config.{key}: no such shard folder or file: {path} (write the "
                                    f"default shards with jobs/simulate.py, or set job_config.{key})")
    if not cfg.base_policy:
        train_sft(cfg.sft)
    return shared


def _dpo_trial(cfg: DPOJobConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    _dpo_check(cfg)
    _trial_run(PreferenceExperiment, _dpo_paths(cfg, shared), trial_name, sweep_dir)


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
# A trial is the soups job's own config (experiments/soups/config.py) with the sampled
# user_weights: it runs the job's training stage, which reuses the per-preference runs the
# sweep's preparation trained (same fingerprint: nothing is retrained), then the job's own
# scoring of the user's soup (`user_soup_score`), reported after every eval.batch_size prompts.
# `jobs/soups.py` with the same config and user_weights prints the same score.

SOUPS_TRIAL_DEFAULTS = {
    "sft": _tiny_sft(),
    "preferences": ["P1A", "P2A", "P3B"],
    "combinations": [], "baselines": [],  # one user's soup: no comparison arms, no P-MORL
    "user_weights": {"P1A": 1 / 3, "P2A": 1 / 3, "P3B": 1 / 3},  # sampled by the space
    "user_target": {"P1A": 0.6, "P2A": 0.3, "P3B": 0.1},
    "pairs_per_preference": 256,
    "training": {"steps": 40, "micro_batch_size": 8, "warmup_steps": 4,
                 "lora": {"r": 4, "alpha": 8}},
    "resources": {"checkpoint_every": 40},
    "register_models": False,
    # 48 held-out prompts, one sample each, a report every 8 (what ASHA compares trials on)
    "eval": {"n_prompts": 48, "samples_per_prompt": 1, "batch_size": 8, "max_new_tokens": 64},
}


def _soups_folder(sweep_dir: Path) -> Path:
    """Where the sweep's soups runs live: the trained policies under runs/<training key>/."""
    return sweep_dir / "soups"


def _soups_check(cfg: SoupsConfig) -> None:
    if not cfg.user_target:
        raise ValueError("job_config.user_target: the sweep maximizes the user's score; name the user's weights")


def _with_sft_folder(cfg: SoupsConfig, folder: str) -> SoupsConfig:
    """``cfg`` with its SFT cache at ``folder``: a trial runs in its own working directory, where
    the default relative "outputs/sft" would name another cache, another base and so another
    training fingerprint than the runs prepare trained."""
    return replace(cfg, sft=replace(cfg.sft, output_dir=folder))


def _soups_prepare(cfg: SoupsConfig, sweep_dir: Path) -> dict:
    """The soups job's training stage once, on the driver: the SFT base and one policy per
    preference (the trials find them finished and reuse them)."""
    from raypref.experiments.soups.run import trained_policies

    _soups_check(cfg)
    sft_folder = str(Path(cfg.sft.output_dir).expanduser().resolve())  # the driver's, absolute
    stage = trained_policies(_with_sft_folder(cfg, sft_folder), _soups_folder(sweep_dir))
    if stage.failed:
        raise RuntimeError(f"the sweep's policies failed to train: {stage.failed}")
    return {"sft_folder": sft_folder}


def _soups_trial(cfg: SoupsConfig, shared: dict, trial_name: str, sweep_dir: Path) -> None:
    from ray import tune

    from raypref.experiments.soups import evaluate as ev
    from raypref.experiments.soups.run import trained_policies
    from raypref.experiments.soups.seed_eval import Souper, seed_eval_config, user_soup_score

    _soups_check(cfg)
    cfg = _with_sft_folder(cfg, shared["sft_folder"])
    cfg.validate()
    stage = trained_policies(cfg, _soups_folder(sweep_dir))  # reuses the runs prepare trained
    if stage.failed:
        raise RuntimeError(f"trial {trial_name}: policies failed to train: {stage.failed}")
    souper = Souper(cfg, stage.sft_dir, {p: stage.trained[0][p] for p in cfg.user_weights})
    scorer = ev.make_scorer(cfg.eval, stage.world, cfg.preferences, base=stage.sft_dir)
    user_soup_score(cfg, souper, scorer, stage.prompts, seed_eval_config(cfg, 0),
                    report=lambda n, score: tune.report({"prompts": n, "user_score": score}))


JOBS: dict[str, SweepJob] = {
    "soups": SweepJob(
        name="soups", config=SoupsConfig, metric="user_score", mode="max", time_attr="prompts",
        max_t=lambda cfg: cfg.eval.n_prompts, prepare=_soups_prepare, trial=_soups_trial,
        default_space=SWEEP_SPACES / "soups.yaml", defaults=SOUPS_TRIAL_DEFAULTS,
        model_path=lambda sweep_dir, trial: None),
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
