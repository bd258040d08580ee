"""Hyperparameter sweeps over raypref jobs: Ray Tune + Optuna (seeded TPE) + ASHA, in MLflow.

space.py  YAML search spaces, checked against the job's config dataclass before any trial
(what can be swept, each job with its own config: raypref.experiments.sweep)
run.py    the Tuner (new or restored by name), concurrency, scheduler, retries
report.py live progress table, MLflow child run per trial, closing summary and plots
"""
