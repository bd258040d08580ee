"""Run a sweep: Ray Tune with Optuna (seeded TPE) behind a concurrency limit and ASHA on the
job's reported metric; one MLflow parent run with a child per trial; resumable by name.

The sweep lives in `<output_dir>/<name>/`: Tune's experiment state, each trial's training run
(`runs/trial_NNNNN/`, its model in `final/`), `summary.json`, `best_config.yaml` and plots.
Running a sweep whose folder exists continues it (`Tuner.restore`): finished trials are kept,
unfinished ones run again (their training resumes from its last checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from raypref import ray_session
from raypref.config import check_fields, from_dict, to_dict
from raypref.sweep.report import (BudgetWatch, ProgressTable, MLflowTrials, trial_rows, trial_name,
                                  write_summary)
from raypref.sweep.space import SearchSpace, SpaceError, field_type_of, load_space

STATE_FILE = "sweep.json"  # the sweep's own state: MLflow parent run, space, job
ATTEMPTS_DIR = "attempts"  # attempts/<trial>.txt: one line (the Ray node id) per attempt


@dataclass
class SweepJob:
    """What a sweep can tune (the table of them: raypref.experiments.sweep.JOBS)."""

    name: str
    config: type  # the trial config dataclass (search-space paths are its fields)
    metric: str | Callable[[Any], str]  # what the trials report; or (base config) -> it
    mode: str  # "min" or "max"
    time_attr: str  # the reported progress counter ASHA schedules on
    max_t: Callable[[Any], int]  # full length of a trial, in time_attr units
    prepare: Callable[[Any, Path], dict]  # (base config, sweep dir) -> inputs every trial shares
    trial: Callable[[Any, dict, str, Path], None]  # (trial config, shared, trial name, sweep dir)
    default_space: Path = Path()
    defaults: dict = field(default_factory=dict)  # overrides of config's defaults for short trials
    model_path: Callable[[Path, str], Path | None] = lambda sweep_dir, trial: None  # a trial's model


@dataclass
class SweepConfig:
    """A hyperparameter sweep of one raypref job (`python jobs/sweep.py --help`)."""

    job: str = "dpo"  # dpo | reward | soups: see raypref.experiments.sweep
    space: str = ""  # YAML search space; "" = the job's own in configs/sweeps/ (reward: vae_rm.yaml)
    name: str = ""  # "" = "<job>-default"; an existing sweep of this name is resumed
    output_dir: str = "outputs/sweeps"  # the sweep goes to <output_dir>/<name>: a local folder, or a filesystem every node mounts
    num_samples: int = 8  # trials
    max_concurrent: int = 0  # trials at once; 0 = as many as the cluster's CPUs hold
    seed: int = 0  # the Optuna TPE sampler's seed (training seeds: job_config.seed)
    startup_trials: int = 4  # random trials before TPE models the results
    scheduler: str = "asha"  # "asha" or "fifo" (no early stopping)
    grace_period: int = 10  # ASHA: time_attr units (steps) every trial gets
    reduction_factor: float = 2.0  # ASHA: keep the best 1/rf at each rung
    max_failures: int = 1  # retries of a failing trial before it is recorded as failed
    trial_cpus: float = 1.0  # the trial's own process (its training workers come on top)
    time_budget_s: float = 0.0  # stop starting / running trials after this; 0 = no limit
    progress_every_s: float = 60.0  # most seconds between progress tables (also on any change)
    job_config: dict[str, Any] = field(default_factory=dict)  # overrides of the job's config

    def validate(self) -> None:
        checks = [
            ("num_samples", self.num_samples >= 1, "must be >= 1"),
            ("max_concurrent", self.max_concurrent >= 0, "must be >= 0"),
            ("scheduler", self.scheduler in ("asha", "fifo"), "must be 'asha' or 'fifo'"),
            ("grace_period", self.grace_period >= 1, "must be >= 1"),
            ("reduction_factor", self.reduction_factor > 1, "must be > 1"),
            ("max_failures", self.max_failures >= 0, "must be >= 0"),
            ("trial_cpus", self.trial_cpus >= 0, "must be >= 0"),
            ("time_budget_s", self.time_budget_s >= 0, "must be >= 0"),
            ("name", "/" not in self.name, "must be a folder name"),
        ]
        check_fields("SweepConfig", self, checks)


@dataclass
class Sweep:
    """A validated sweep, ready to run: everything is checked before any trial starts."""

    cfg: SweepConfig
    job: SweepJob
    space: SearchSpace
    base: dict  # the job config every trial starts from (as a dict)
    base_config: Any
    path: Path  # <output_dir>/<name>

    @property
    def max_t(self) -> int:
        return self.job.max_t(self.base_config)


def plan(cfg: SweepConfig, jobs: dict[str, SweepJob]) -> Sweep:
    """Validate the sweep config, the job config and the search space (SpaceError / ValueError
    naming the field) without starting Ray. ``jobs``: what can be swept, by name."""
    cfg.validate()
    if cfg.job not in jobs:
        raise ValueError(f"SweepConfig.job={cfg.job!r}: unknown; known: {sorted(jobs)}")
    job = jobs[cfg.job]
    defaults = overridden(job.config, to_dict(job.config()), to_dict_deep(job.defaults))
    base = from_dict(job.config, overridden(job.config, defaults, cfg.job_config), "job_config.")
    if hasattr(base, "validate"):
        base.validate()
    if callable(job.metric):  # e.g. the preference job's: the chosen method's held-out score
        job = dataclasses.replace(job, metric=job.metric(base))
    base_dict = to_dict(base)
    space = load_space(cfg.space or job.default_space, job.config, base_dict)
    name = cfg.name or f"{cfg.job}-default"
    path = Path(cfg.output_dir).expanduser().resolve() / name
    sweep = Sweep(cfg, job, space, base_dict, base, path)
    if cfg.scheduler == "asha" and not 1 <= cfg.grace_period <= sweep.max_t:
        raise ValueError(f"SweepConfig.grace_period={cfg.grace_period}: must be in [1, {sweep.max_t}] "
                         f"(the trial's {job.time_attr}s)")
    return sweep


def overridden(config_cls: type, base: dict, override: dict) -> dict:
    """``base`` (a config as a dict) with ``override``: a config section is overridden field by
    field, any other value (a dict-valued field such as soup weights too) replaced whole."""
    out = dict(base)
    for key, value in override.items():
        try:
            tp = field_type_of(config_cls, key, "job_config")
        except SpaceError:  # not a field: from_dict names it
            tp = None
        if isinstance(value, dict) and isinstance(out.get(key), dict) and dataclasses.is_dataclass(tp):
            out[key] = overridden(tp, out[key], value)
        else:
            out[key] = value
    return out


def to_dict_deep(d: dict) -> dict:
    """``d`` with dataclass values (e.g. a whole SFTConfig) as plain dicts."""
    return {k: to_dict(v) if dataclasses.is_dataclass(v) else to_dict_deep(v) if isinstance(v, dict) else v
            for k, v in d.items()}


def _trial(raw_config: dict, sweep: Sweep, shared: dict) -> None:
    """The Tune trainable: this trial's job config, then the job's training run."""
    from ray import tune

    cfg = sweep.space.apply(sweep.job.config, sweep.base, raw_config)
    import ray

    name = Path(tune.get_context().get_trial_dir()).name  # trial_NNN (trial_dirname_creator)
    attempts = sweep.path / ATTEMPTS_DIR
    attempts.mkdir(exist_ok=True)
    with open(attempts / f"{name}.txt", "a") as log:  # which Ray cluster ran each attempt
        log.write(f"{ray.get_runtime_context().get_node_id()}\n")
    sweep.job.trial(cfg, shared, name, sweep.path)


def _max_concurrent(sweep: Sweep) -> int:
    """As many trials as the cluster holds: each needs its own process (trial_cpus) plus its
    training workers' CPUs, and GPUs when they use them."""
    import ray

    if sweep.cfg.max_concurrent:
        return sweep.cfg.max_concurrent
    cluster = ray.cluster_resources()
    res = getattr(sweep.base_config, "resources", None)
    need = {"CPU": sweep.cfg.trial_cpus + (res.num_workers * res.cpus_per_worker if res else 0.0)}
    if res is not None and res.use_gpu:
        need["GPU"] = float(res.num_workers)
    fits = [int(cluster.get(kind, 0.0) // amount) for kind, amount in need.items() if amount > 0]
    return max(1, min(fits)) if fits else 1


def run_sweep(cfg: SweepConfig, jobs: dict[str, SweepJob]) -> dict:
    """Run (or continue) the sweep; returns the summary (also in <sweep>/summary.json)."""
    import mlflow
    import ray
    from ray import tune

    sweep = plan(cfg, jobs)
    started = time.time()
    # save Tune's experiment state every few seconds (default: >= 10 s), so a killed sweep
    # loses at most that much record of ended trials; trials last minutes, saving is cheap
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "3")
    if not ray.is_initialized():
        # with the dashboard: a trial ASHA stops is torn down with its Ray Train controller, and
        # only Ray Train's PlacementGroupCleaner (which asks the state API) frees its workers' CPUs
        ray_session.init(include_dashboard=True, log_to_driver=False, configure_logging=False)
    sweep.path.mkdir(parents=True, exist_ok=True)
    parent_id = _parent_run(sweep)
    print(f"[sweep] {sweep.path.name}: job {cfg.job}, {cfg.num_samples} trials, metric "
          f"{sweep.job.metric} ({sweep.job.mode}), scheduler {cfg.scheduler}; folder {sweep.path}",
          flush=True)
    try:
        shared = sweep.job.prepare(sweep.base_config, sweep.path)
        trainable = tune.with_resources(tune.with_parameters(_trial, sweep=sweep, shared=shared),
                                        {"CPU": cfg.trial_cpus})
        budget = BudgetWatch(cfg.time_budget_s)
        callbacks = [budget, ProgressTable(sweep.space, sweep.job.metric, sweep.job.time_attr, sweep.max_t,
                                   cfg.progress_every_s),
                     MLflowTrials(mlflow.get_tracking_uri(), parent_id, sweep.space, sweep.job.time_attr,
                                  sweep.max_t)]
        experiment = str(sweep.path)
        tuner = _tuner(sweep, trainable, callbacks)
        with ray_session.watch_resources():  # a trial that cannot start says why, then fails
            tuner.fit()
        trials = tune.ExperimentAnalysis(experiment).trials
        rows = budget.mark_cuts(trial_rows(trials, sweep.space, sweep.job.metric, sweep.job.time_attr,
                                           sweep.max_t, lambda t: sweep.job.model_path(sweep.path, t)))
        return write_summary(sweep, rows, parent_id, time.time() - started)
    except BaseException:
        mlflow.MlflowClient().set_terminated(parent_id, "FAILED")
        raise


def _tuner(sweep: Sweep, trainable, callbacks: list):
    """A new Tuner, or the sweep's own restored when its folder holds Tune state."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = sweep.cfg
    experiment = str(sweep.path)
    if tune.Tuner.can_restore(experiment):
        print(f"[sweep] resuming {experiment}: finished trials are kept", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
        # the restored run config is the pickled one: give it this process's callbacks
        if tuner._local_tuner is not None:  # (None only in Ray Client mode)
            tuner._local_tuner.get_run_config().callbacks = callbacks
    else:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=sweep.job.metric, mode=sweep.job.mode, num_samples=cfg.num_samples,
                search_alg=_searcher(sweep, _max_concurrent(sweep)),
                # stop_last_trials=False: a trial that reaches max_t ends on its own (its Ray
                # Train run shuts down and frees its CPUs) instead of being stopped by Tune
                scheduler=ASHAScheduler(time_attr=sweep.job.time_attr, max_t=sweep.max_t,
                                        grace_period=cfg.grace_period,
                                        reduction_factor=cfg.reduction_factor,
                                        stop_last_trials=False)
                if cfg.scheduler == "asha" else FIFOScheduler(),
                time_budget_s=cfg.time_budget_s or None,
                trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(
                name=sweep.path.name, storage_path=str(sweep.path.parent),
                failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                callbacks=callbacks, verbose=0))
    return tuner


def _searcher(sweep: Sweep, max_concurrent: int):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=sweep.cfg.seed,
                                         n_startup_trials=sweep.cfg.startup_trials)
    search = OptunaSearch(space=sweep.space.suggest, metric=sweep.job.metric, mode=sweep.job.mode,
                          sampler=sampler)
    return ConcurrencyLimiter(search, max_concurrent=max_concurrent)


def _parent_run(sweep: Sweep) -> str:
    """The sweep's MLflow parent run: created once, reopened when the sweep is resumed."""
    import mlflow

    from raypref import tracking

    state_path = sweep.path / STATE_FILE
    mlflow.set_tracking_uri(tracking.tracking_uri(sweep.path.parent))
    experiment = mlflow.set_experiment("raypref-sweep")
    client = mlflow.MlflowClient()
    if state_path.exists():
        run_id = json.loads(state_path.read_text())["mlflow_parent_run_id"]
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(experiment.experiment_id, run_name=sweep.path.name,
                            tags={"raypref.job": "sweep", "raypref.sweep_job": sweep.cfg.job,
                                  "raypref.sweep_dir": str(sweep.path)})
    run_id = run.info.run_id
    for key, value in _flat_params(to_dict(sweep.cfg)).items():
        client.log_param(run_id, key, value)
    client.log_text(run_id, yaml.safe_dump(sweep.space.describe(), sort_keys=False),
                    "search_space.yaml")
    state_path.write_text(json.dumps({"mlflow_parent_run_id": run_id, "job": sweep.cfg.job,
                                      "tracking_uri": mlflow.get_tracking_uri()}, indent=2))
    return run_id


def _flat_params(d: dict) -> dict[str, str]:
    from raypref.config import flatten

    return {k: json.dumps(v) if not isinstance(v, str) else v for k, v in flatten(d).items()}
