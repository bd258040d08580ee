"""MLflow tracking for every raypref job.

One run per job; a job made of several trainings (the soups: one policy per preference,
baselines, seeds) opens a `child_run` for each inside it, so the MLflow UI lists them under
the job's run and compares them side by side. The store is ``$MLFLOW_TRACKING_URI`` when set, else a sqlite database
inside the job's output folder (a plain ``./mlruns`` file store is refused by MLflow >= 3.13).
A run that raises ends FAILED, so a broken job never looks finished in the UI.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow

from raypref.config import flatten, to_dict

_MAX_PARAM_LEN = 6000  # MLflow rejects longer param values
OUTPUT_DIR_TAG = "raypref.output_dir"  # set by start_run: where a job wrote its outputs


def tracking_uri(output_dir: str | Path) -> str:
    """The store a job in ``output_dir`` logs to."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(output_dir).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


@contextlib.contextmanager
def start_run(job: str, config: Any, output_dir: str | Path,
              run_name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open an MLflow run for ``job``; log ``config`` (dataclass or dict) as params + artifact."""
    mlflow.set_tracking_uri(tracking_uri(output_dir))
    mlflow.set_experiment(f"raypref-{job}")
    cfg = to_dict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    run = mlflow.start_run(run_name=run_name)
    try:
        log_params(cfg)
        mlflow.log_dict(cfg, "config.json")
        mlflow.set_tag("raypref.job", job)
        mlflow.set_tag(OUTPUT_DIR_TAG, str(Path(output_dir).resolve()))
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


@contextlib.contextmanager
def child_run(name: str, *, kind: str = "", params: Any = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """A run nested in the active one, named for what it is (e.g. "policy P1A seed 0",
    "baseline P-MORL seed 1"), with its own params (dataclass or dict, flattened), tags and
    ``raypref.kind`` tag (policy / baseline / soup / seed ...). Metrics and artifacts logged
    inside it go to the child; it ends FAILED if the block raises, and the parent is active
    again after it."""
    if mlflow.active_run() is None:
        raise RuntimeError(f"child_run({name!r}): no active parent run; open one with start_run")
    run = mlflow.start_run(run_name=name, nested=True,
                           tags={**(tags or {}), **({"raypref.kind": kind} if kind else {})})
    try:
        if params is not None:
            log_params(to_dict(params) if hasattr(params, "__dataclass_fields__") else params)
        yield run
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def log_params(params: dict[str, Any]) -> None:
    """Log a (nested) dict as flat params ("a.b"); long values are cut to MLflow's limit."""
    items = [(k, _param_text(v)) for k, v in flatten(dict(params)).items()]
    for i in range(0, len(items), 100):  # log_params takes at most 100 params per call
        mlflow.log_params(dict(items[i:i + 100]))


def log_step_metrics(rows: list[dict[str, float]], prefix: str = "") -> None:
    """Per-step metric rows as a runner returns them (each with a "step") into the active run."""
    for i, row in enumerate(rows):
        if "step" not in row:
            raise KeyError(f"log_step_metrics: row {i} has no 'step' (keys {sorted(row)})")
        log_metrics({f"{prefix}{k}": v for k, v in row.items() if k != "step"},
                    step=int(row["step"]))


@dataclass(frozen=True)
class LiveMetrics:
    """Where a training run's rank-0 worker logs its step metrics while it trains: an MLflow run
    of the driver (a worker on another node needs a tracking server URI, not a local sqlite)."""

    tracking_uri: str
    run_id: str
    prefix: str = ""  # put before every metric name (e.g. "train.")


def live_metrics(prefix: str = "") -> LiveMetrics:
    """The active MLflow run as a LiveMetrics target for `train.runner.run`."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("live_metrics: no active MLflow run; open one with start_run")
    return LiveMetrics(mlflow.get_tracking_uri(), run.info.run_id, prefix)


class StepMetricsWriter:
    """Logs a runner's step rows (each with a "step") to a LiveMetrics run as they come.
    A store that fails does not stop training: the writer says so once and stops logging."""

    _BATCH = 1000  # MLflow's log_batch takes at most 1000 metrics

    def __init__(self, target: LiveMetrics, already_logged: int = 0):
        self.target, self.logged = target, already_logged
        self.client: mlflow.MlflowClient | None = None
        self.failed = False

    def write(self, history: list[dict[str, float]]) -> None:
        """Log the rows of ``history`` not logged yet."""
        if self.failed or self.logged >= len(history):
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{self.target.prefix}{k}", float(v), now, int(row["step"]))
                   for row in history[self.logged:] for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        try:
            self.client = self.client or mlflow.MlflowClient(tracking_uri=self.target.tracking_uri)
            for i in range(0, len(metrics), self._BATCH):
                self.client.log_batch(self.target.run_id, metrics=metrics[i:i + self._BATCH])
        except Exception as e:  # noqa: BLE001 - live curves are a convenience; the run's result is not
            self.failed = True
            print(f"[tracking] live metrics to run {self.target.run_id} in {self.target.tracking_uri} "
                  f"stopped: {type(e).__name__}: {e}", flush=True)
            return
        self.logged = len(history)


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM_LEN]


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics (non-numeric values are skipped on purpose: they are not metrics)."""
    numeric = {k: float(v) for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a whole folder."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dict(obj: Any, name: str) -> None:
    """Log a JSON-able object as an artifact file ``name`` (e.g. "summary.json")."""
    mlflow.log_dict(obj, name)


def run_url(run: mlflow.ActiveRun) -> str:
    """How to find a run again: its id and the store it lives in."""
    return f"run {run.info.run_id} in {mlflow.get_tracking_uri()}"


def log_text_file(text: str, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / name
        p.write_text(text)
        mlflow.log_artifact(str(p))


def register_model_dir(path: str | Path, name: str, tags: dict[str, str] | None = None):
    """Log a saved model folder (safetensors + config + tokenizer) as an MLflow LoggedModel of
    the active run and register it under ``name``; returns the ModelVersion."""
    run = mlflow.active_run()
    model = mlflow.initialize_logged_model(name=name, source_run_id=run.info.run_id if run else None,
                                           tags=tags, model_type="raypref-policy")
    try:
        mlflow.MlflowClient().log_model_artifacts(model.model_id, str(path))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    return mlflow.register_model(f"models:/{model.model_id}", name)



def run_output_dir(tracking: str, run_id: str | None = None, registered_model: str | None = None) -> Path:
    """The output folder of a job's MLflow run, given the run id or a registered model version
    (``name/version`` or ``name@alias``) whose source run it is (the soups job registers its
    merged soups from inside its run). Raises ``LookupError`` naming what is missing."""
    if (run_id is None) == (registered_model is None):
        raise ValueError("give exactly one of run_id, registered_model")
    client = mlflow.MlflowClient(tracking_uri=tracking)
    if registered_model is not None:
        name, sep, ref = registered_model.partition("@") if "@" in registered_model \
            else registered_model.rpartition("/")
        if not name or not ref:
            raise LookupError(f"registered model {registered_model!r}: expected 'name/version' or 'name@alias'")
        try:
            version = (client.get_model_version_by_alias(name, ref) if sep == "@"
                       else client.get_model_version(name, ref))
        except mlflow.exceptions.MlflowException as e:
            raise LookupError(f"registered model {registered_model!r} not found in {tracking}: {e.message}") from None
        run_id = version.run_id
        if not run_id:
            raise LookupError(f"registered model {registered_model!r} has no source run in {tracking}")
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise LookupError(f"MLflow run {run_id!r} not found in {tracking}: {e.message}") from None
    out = run.data.tags.get(OUTPUT_DIR_TAG)
    if not out:
        raise LookupError(f"MLflow run {run_id!r} in {tracking} has no {OUTPUT_DIR_TAG!r} tag "
                          "(not a raypref job's run?)")
    return Path(out)
