"""What a person sees of a sweep: a live table of trials, one MLflow child run per trial under
the sweep's parent run, and the closing summary (best trial, its model, early stops, plots).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from ray.tune import Callback

from raypref import atomic
from raypref.config import to_dict

# Tune's own bookkeeping in every result: not metrics of the job
_TUNE_KEYS = {"timestamp", "training_iteration", "time_this_iter_s", "time_total_s", "pid",
              "time_since_restore", "iterations_since_restore", "done", "trial_id", "node_ip",
              "hostname", "date", "experiment_tag", "checkpoint_dir_name", "should_checkpoint"}
DONE, STOPPED, FAILED, CUT = "done", "stopped early", "failed", "cut by budget"
ENDED = (DONE, STOPPED, FAILED, CUT)


def trial_name(trial) -> str:
    """`trial_003` for the sweep's third trial: Tune's counter (the first part of its
    experiment tag), not its random trial id. Also the trial's folder name."""
    return f"trial_{int(trial.experiment_tag.split('_', 1)[0]):03d}"


def trial_status(status: str, last_result: dict, time_attr: str, max_t: int) -> str:
    """running / pending / done / stopped early (before max_t) / failed."""
    if status == "ERROR":
        return FAILED
    if status == "TERMINATED":
        reached = last_result.get(time_attr)
        if reached is None:
            return FAILED  # ended without reporting anything
        return DONE if reached >= max_t else STOPPED
    return status.lower()


@dataclass
class TrialRow:
    name: str
    trial_id: str
    status: str
    params: dict[str, Any]
    raw_config: dict[str, Any]
    step: int | None
    metric: float | None
    error: str = ""
    model_path: str = ""


def row_of(trial, space, metric: str, time_attr: str, max_t: int,
           model_path: Callable[[str], Path] | None = None) -> TrialRow:
    """A Tune Trial as a table row."""
    last = trial.last_result or {}
    status = trial_status(trial.status, last, time_attr, max_t)
    name = trial_name(trial)
    try:
        params = space.resolve(trial.config)
    except KeyError:
        params = {}
    path = model_path(name) if model_path else None
    value = last.get(metric)
    return TrialRow(name, trial.trial_id, status, params, dict(trial.config),
                    last.get(time_attr), float(value) if value is not None else None,
                    error=_error_text(trial) if status == FAILED else "",
                    model_path=str(path) if path is not None and path.exists() else "")


def _error_text(trial) -> str:
    """The last lines of the trial's error file (Tune writes the traceback there)."""
    path = trial.error_file
    if path and Path(path).exists():
        return Path(path).read_text()[-400:]
    return "ended without a result"


def trial_rows(trials, space, metric, time_attr, max_t, model_path=None) -> list[TrialRow]:
    return sorted((row_of(t, space, metric, time_attr, max_t, model_path) for t in trials),
                  key=lambda r: r.name)


class BudgetWatch(Callback):
    """Remembers which trials had ended before the sweep's time budget ran out. When it runs
    out, Tune stops every running trial and drops the pending ones: those read as stopped early
    or as failed without a result, but neither the scheduler nor the trial ended them."""

    def __init__(self, budget_s: float):
        self.deadline = time.time() + budget_s if budget_s else None
        self.ended_before: set[str] = set()

    def on_step_end(self, iteration, trials, **info):
        if self.deadline is not None and time.time() < self.deadline:
            self.ended_before |= {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")}

    def mark_cuts(self, rows: list[TrialRow]) -> list[TrialRow]:
        """Rows of trials the budget ended (not ended before it, no error of their own) as CUT."""
        if self.deadline is None or time.time() < self.deadline:
            return rows
        for row in rows:
            own_error = row.status == FAILED and row.error != "ended without a result"
            if row.status in (STOPPED, FAILED) and not own_error and row.trial_id not in self.ended_before:
                row.status, row.error = CUT, ""
        return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_table(rows: list[TrialRow], metric: str, time_attr: str) -> str:
    """Fixed-width table: trial, params, progress, latest metric, status."""
    header = ["trial", "params", time_attr, metric, "status"]
    body = [[r.name, ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in r.params.items()),
             "-" if r.step is None else str(r.step), "-" if r.metric is None else f"{r.metric:.4f}",
             r.status] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    return "\n".join(lines)


class ProgressTable(Callback):
    """Prints the trial table whenever a trial starts, reports a new step or ends, and at
    least every `every_s` seconds (a heartbeat while trials start up)."""

    def __init__(self, space, metric: str, time_attr: str, max_t: int, every_s: float = 60.0):
        self.space, self.metric, self.time_attr, self.max_t = space, metric, time_attr, max_t
        self.every_s = every_s
        self._last = 0.0
        self._shown: list = []

    def on_step_end(self, iteration, trials, **info):
        if not trials:
            return
        rows = trial_rows(trials, self.space, self.metric, self.time_attr, self.max_t)
        shown = [(r.name, r.status, r.step) for r in rows]
        now = time.time()
        if shown != self._shown or now - self._last >= self.every_s:
            self._shown, self._last = shown, now
            done = sum(r.status in ENDED for r in rows)
            print(f"[sweep {time.strftime('%H:%M:%S')}] {done}/{len(rows)} trials ended\n"
                  + format_table(rows, self.metric, self.time_attr), flush=True)


class MLflowTrials(Callback):
    """A child MLflow run per trial under the sweep's parent run: params, metric history,
    status (done / stopped early / failed). Child runs are found again by trial id, so a
    resumed sweep keeps logging into the same runs."""

    def __init__(self, tracking_uri: str, parent_run_id: str, space, time_attr: str, max_t: int):
        self.tracking_uri, self.parent_run_id = tracking_uri, parent_run_id
        self.space, self.time_attr, self.max_t = space, time_attr, max_t
        self._runs: dict[str, str] = {}

    def setup(self, **info):
        import mlflow

        self._client = mlflow.MlflowClient(self.tracking_uri)
        parent = self._client.get_run(self.parent_run_id)
        self._experiment_id = parent.info.experiment_id
        found = self._client.search_runs(
            [self._experiment_id], f"tags.mlflow.parentRunId = '{self.parent_run_id}'")
        self._runs = {r.data.tags["raypref.trial_id"]: r.info.run_id for r in found
                      if "raypref.trial_id" in r.data.tags}

    def _run_id(self, trial) -> str:
        if trial.trial_id not in self._runs:
            run = self._client.create_run(self._experiment_id, run_name=trial_name(trial), tags={
                "mlflow.parentRunId": self.parent_run_id, "raypref.trial_id": trial.trial_id,
                "raypref.status": "running"})
            self._runs[trial.trial_id] = run.info.run_id
            for key, value in self.space.resolve(trial.config).items():
                self._client.log_param(run.info.run_id, key, json.dumps(value) if isinstance(value, dict)
                                       else value)
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self._client.update_run(run_id, status="RUNNING")
        self._client.set_tag(run_id, "raypref.status", "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        step = int(result.get(self.time_attr, result.get("training_iteration", 0)))
        stamp = int(time.time() * 1000)
        from mlflow.entities import Metric

        metrics = [Metric(k, float(v), stamp, step) for k, v in result.items()
                   if k not in _TUNE_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(float(v))]
        if metrics:
            self._client.log_batch(self._run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        status = trial_status("TERMINATED", trial.last_result or {}, self.time_attr, self.max_t)
        self._end(trial, status)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, FAILED)

    def _end(self, trial, status: str) -> None:
        run_id = self._run_id(trial)
        self._client.set_tag(run_id, "raypref.status", status)
        self._client.set_terminated(run_id, "FAILED" if status == FAILED else "FINISHED")


# ---------------------------------------------------------------- the closing summary

def write_summary(sweep, rows: list[TrialRow], parent_run_id: str, seconds: float) -> dict:
    """summary.json, best_config.yaml and plots in the sweep folder, logged to the parent run;
    prints the table, the best trial and its model, and which trials stopped early."""
    import mlflow

    metric, mode = sweep.job.metric, sweep.job.mode
    scored = [r for r in rows if r.metric is not None and r.status == DONE] or \
             [r for r in rows if r.metric is not None]
    best = (min if mode == "min" else max)(scored, key=lambda r: r.metric) if scored else None
    summary = {
        "sweep": sweep.path.name, "job": sweep.cfg.job, "folder": str(sweep.path),
        "metric": metric, "mode": mode, "scheduler": sweep.cfg.scheduler,
        "seconds": round(seconds, 1), "trials": len(rows),
        "counts": {s: sum(r.status == s for r in rows) for s in ENDED},
        "stopped_early": [r.name for r in rows if r.status == STOPPED],
        "failed": {r.name: r.error for r in rows if r.status == FAILED},
        "best": None, "rows": [r.__dict__ for r in rows],
        # interrupted (Ctrl-C, ray job stop): trials left pending / running; rerun to continue
        "unfinished": [r.name for r in rows if r.status not in ENDED],
    }
    client = mlflow.MlflowClient()
    if best is not None:
        job_config = to_dict(sweep.space.apply(sweep.job.config, sweep.base, best.raw_config))
        summary["best"] = {"trial": best.name, "metric": best.metric, "params": best.params,
                           "model_path": best.model_path, "status": best.status}
        atomic.write_text(sweep.path / "best_config.yaml", yaml.safe_dump(
            {"trial": best.name, metric: best.metric, "params": best.params,
             "model_path": best.model_path, "job": sweep.cfg.job, "config": job_config},
            sort_keys=False))
        client.log_artifact(parent_run_id, str(sweep.path / "best_config.yaml"))
        client.log_metric(parent_run_id, f"best_{metric}", best.metric)
    atomic.write_text(sweep.path / "summary.json", json.dumps(summary, indent=2, default=str))
    client.log_artifact(parent_run_id, str(sweep.path / "summary.json"))
    for path in plots(sweep, rows):
        client.log_artifact(parent_run_id, str(path), "plots")
    for key, value in {"trials": len(rows), "seconds": seconds, **{
            f"trials_{k.replace(' ', '_')}": v for k, v in summary["counts"].items()}}.items():
        client.log_metric(parent_run_id, key, value)
    client.set_terminated(parent_run_id, "KILLED" if summary["unfinished"] else "FINISHED")
    _print(summary, rows, sweep)
    return summary


def _print(summary: dict, rows: list[TrialRow], sweep) -> None:
    print(format_table(rows, summary["metric"], sweep.job.time_attr))
    c = summary["counts"]
    print(f"[sweep] {summary['trials']} trials in {summary['seconds']:.0f} s: {c[DONE]} done, "
          f"{c[STOPPED]} stopped early, {c[FAILED]} failed"
          + (f", {c[CUT]} cut by the time budget (running or pending when it ran out)" if c[CUT] else ""))
    if summary["stopped_early"]:
        print(f"[sweep] stopped early by {summary['scheduler'].upper()}: {', '.join(summary['stopped_early'])}")
    for name, error in summary["failed"].items():
        print(f"[sweep] {name} failed: {error.strip().splitlines()[-1] if error.strip() else '?'}")
    best = summary["best"]
    if best:
        print(f"[sweep] best: {best['trial']} {summary['metric']}={best['metric']:.4f} "
              f"{_fmt(best['params'])}")
        print(f"[sweep] best model: {best['model_path'] or '(no final model: the trial did not finish)'}")
        print(f"[sweep] best config: {sweep.path / 'best_config.yaml'}")
    if summary["unfinished"]:
        print(f"[sweep] interrupted with {len(summary['unfinished'])} trial(s) unfinished: rerun "
              f"with --name {sweep.path.name} to continue")
    print(f"[sweep] summary: {sweep.path / 'summary.json'}", flush=True)


def plots(sweep, rows: list[TrialRow]) -> list[Path]:
    """Optimization history and parameter importances (Optuna's matplotlib plots of a study
    rebuilt from the trials' last metric); importances need >= 2 scored trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    scored = [r for r in rows if r.metric is not None]
    if not scored:
        return []
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # its matplotlib plots
    study = optuna.create_study(direction="minimize" if sweep.job.mode == "min" else "maximize")
    distributions = sweep.space.optuna_distributions()
    for row in scored:
        params = {k: row.raw_config[k] for k in distributions if k in row.raw_config}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=row.metric))
    out = []
    makers = {"optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history}
    if len(scored) >= 2:
        makers["param_importances.png"] = optuna.visualization.matplotlib.plot_param_importances
    for name, make in makers.items():
        try:
            make(study)
        except (ValueError, RuntimeError) as err:  # e.g. every trial scored the same
            print(f"[sweep] {name} not drawn: {err}")
            continue
        path = sweep.path / name
        plt.gcf().set_size_inches(8, 5)
        plt.tight_layout()
        plt.savefig(path, dpi=100)
        plt.close("all")
        out.append(path)
    return out
