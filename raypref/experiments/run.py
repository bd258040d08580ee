"""The skeleton every training job shares: one config base, one result, one `run_experiment`.

    validate -> MLflow run -> (data checks) -> base policy -> spec -> runner -> evaluation
             -> summary.json -> JobResult

An `Experiment` fills in the steps that differ (its data, its spec, its evaluation, its
summary); `run_experiment` runs them in this order inside one MLflow run, so a failure in any
step ends the run FAILED, and every job writes `<run folder>/summary.json` the same way.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

from raypref import atomic, tracking
from raypref.models.factory import LoraSettings, check_lora_targets
from raypref.recipes.sft import SFTConfig, train_sft
from raypref.train import runner, storage
from raypref.train.runner import RunnerConfig, RunResult
from raypref.train.spec import LoopSpec

SUMMARY_FILE = "summary.json"


@dataclass
class RunConfig:
    """The fields every training job has. A job's config subclasses it (and may change a
    default by declaring the field again, e.g. its own output_dir)."""

    output_dir: str = "outputs"  # the run's files go to <output_dir>/<run_name>/; MLflow to <output_dir>/mlflow.db
    run_name: str = ""  # "" = the job's own default name; an existing name resumes that run
    seed: int = 0
    restart: bool = False  # start the run over even if its folder holds one made with other settings
    strict_code: bool = False  # refuse to resume a run trained by another raypref code version (else: a warning)

    def validate_run(self, where: str) -> None:
        if self.run_name and not storage.is_run_name(self.run_name):
            raise ValueError(f"{where}.run_name={self.run_name!r}: {storage.RUN_NAME_RULE}")


@dataclass
class PolicyRunConfig(RunConfig):
    """A job that trains a policy on a base: the SFT warm start, or a saved model."""

    base_policy: str = ""  # "" = the SFT warm start below (cached by config hash); else a saved model folder or HF id
    sft: SFTConfig = field(default_factory=SFTConfig)

    def validate_run(self, where: str) -> None:
        super().validate_run(where)
        if not self.base_policy:
            self.sft.validate()


@dataclass
class JobResult:
    """What a finished job left behind (every job returns this)."""

    output_dir: Path  # the run's folder: summary.json and the job's own files
    policy_dir: Path | None  # what the run exported (an adapter, a policy, a reward model)
    summary: dict
    run_id: str
    tracking_uri: str
    metrics: list[dict] = field(default_factory=list, repr=False)  # the runner's per-step rows

    @property
    def adapter_dir(self) -> Path | None:  # the preference job's name for policy_dir
        return self.policy_dir


@dataclass
class Run:
    """One run in progress: what the skeleton has so far, handed to each Experiment step."""

    cfg: Any
    name: str
    out: Path
    started: float = field(default_factory=time.time)
    base_dir: str = ""
    spec: LoopSpec | None = None
    data: dict = field(default_factory=dict)  # whatever an experiment's steps pass on


class Experiment:
    """One job's pipeline. Override the steps that differ; `run_experiment` calls them in order."""

    job = ""  # the MLflow experiment (raypref-<job>) and the console prefix
    metrics_prefix = ""  # before each per-step metric in MLflow

    def __init__(self, callbacks: list | None = None):
        self.callbacks = list(callbacks or [])  # Ray Train callbacks (a sweep trial: Tune's report callback)

    def run_name(self, cfg) -> str:
        return cfg.run_name or self.job

    def folder(self, cfg, name: str) -> Path:
        return Path(cfg.output_dir).expanduser().resolve() / name

    def prepare(self, run: Run) -> None:
        """Checks and data that must come before the base policy (nothing by default)."""

    def base_policy(self, run: Run) -> str:
        cfg = run.cfg
        return cfg.base_policy or str(train_sft(cfg.sft))

    def spec(self, run: Run) -> LoopSpec:
        raise NotImplementedError

    def runner_config(self, run: Run) -> RunnerConfig:
        cfg = run.cfg
        return runner.runner_config(cfg.training, cfg.resources, name="train", seed=cfg.seed,
                                    storage_path=str(run.out / "runs"))

    def run_kwargs(self, run: Run) -> dict:
        """Extra arguments of `runner.run` (Ray Data sets, their fingerprint)."""
        return {}

    def evaluate(self, run: Run, result: RunResult) -> dict:
        """What the trained model scores (logged to MLflow); goes into the summary."""
        return {}

    def summary(self, run: Run, result: RunResult, evaluation: dict) -> dict:
        return dict(evaluation)

    def report(self, result: JobResult) -> None:
        """Lines for the console once the job is done."""


def _check_lora(cfg) -> None:
    """A LoRA whose targets match no module of the base is refused here, before Ray starts,
    naming the modules the model has (read from the base's config alone)."""
    if not isinstance(cfg, PolicyRunConfig):
        return
    for where in ("training.lora", "lora"):  # the pair methods' section, or P-DPO's own field
        owner, name = (getattr(cfg, "training", None), "lora") if where == "training.lora" else (cfg, "lora")
        lora = getattr(owner, name, None)
        if isinstance(lora, LoraSettings):
            check_lora_targets(cfg.base_policy or cfg.sft.model.name_or_path, lora, f"{type(cfg).__name__}.{where}")
            return


def run_experiment(experiment: Experiment, cfg) -> JobResult:
    """Run `experiment` on `cfg` (see the module docstring)."""
    cfg.validate()
    _check_lora(cfg)
    name = experiment.run_name(cfg)
    out = experiment.folder(cfg, name)
    out.mkdir(parents=True, exist_ok=True)
    with tracking.start_run(experiment.job, cfg, cfg.output_dir, run_name=name) as mlrun:
        run = Run(cfg, name, out)
        print(f"[{experiment.job}] run {name}: {out}; mlflow {tracking.run_url(mlrun)}", flush=True)
        experiment.prepare(run)
        run.base_dir = experiment.base_policy(run)
        mlflow.set_tag("raypref.base_policy", run.base_dir)
        run.spec = experiment.spec(run)
        runner_cfg = experiment.runner_config(run)
        if cfg.strict_code:
            runner_cfg = dataclasses.replace(runner_cfg, strict_code=True)
        result = runner.run(run.spec, runner_cfg, restart=cfg.restart,
                            callbacks=experiment.callbacks or None,
                            live_metrics=tracking.live_metrics(experiment.metrics_prefix),
                            **experiment.run_kwargs(run))
        train_seconds = time.time() - run.started
        evaluation = experiment.evaluate(run, result)
        tracking.log_metrics({k: v for k, v in _flat_numbers(evaluation).items()})
        summary = {"run_name": name, "steps": result.final_step, "train_seconds": round(train_seconds, 1),
                   **experiment.summary(run, result, evaluation),
                   "policy_dir": None if result.export_path is None else str(result.export_path),
                   "base_policy": run.base_dir, "mlflow_run_id": mlrun.info.run_id,
                   "tracking_uri": tracking.tracking_uri(cfg.output_dir)}
        atomic.write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))
        tracking.log_dict(summary, SUMMARY_FILE)
    policy_dir = None if result.export_path is None else Path(result.export_path)
    job_result = JobResult(out, policy_dir, summary, mlrun.info.run_id, summary["tracking_uri"], result.metrics)
    experiment.report(job_result)
    return job_result


def report_paths(job: str, result: JobResult) -> None:
    """The console lines every policy job ends with: where the policy and the MLflow run are."""
    print(f"[{job}] policy: {result.policy_dir}")
    print(f"[{job}] summary: {result.output_dir / SUMMARY_FILE}; MLflow run {result.run_id} in "
          f"{result.tracking_uri}")


def _flat_numbers(d: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested dict as {"a.b": x} (lists and strings are left to the summary)."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat_numbers(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out
