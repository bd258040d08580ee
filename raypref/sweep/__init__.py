"""Hyperparameter sweeps over raypref jobs: Ray Tune + Optuna (seeded TPE) + ASHA, in MLflow.

space.py  YAML search spaces, checked against the job's config dataclass before any trial
jobs.py   what can be swept: each job's trial config, metric, shared preparation and trial
run.py    the Tuner (new or restored by name), concurrency, scheduler, retries
report.py live progress table, MLflow child run per trial, closing summary and plots
"""
