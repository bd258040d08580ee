"""Hyperparameter sweep of a raypref job: Ray Tune + Optuna (seeded TPE) + ASHA, in MLflow.

    python jobs/sweep.py                                  # the default: 8 DPO trials, ASHA
    python jobs/sweep.py --job dpo --space my_space.yaml --name lr-beta --num_samples 32
    python jobs/sweep.py --job soups                      # merge weights on the simplex
    python jobs/sweep.py --job reward                     # VAE RM: sampling ratio, phase, KL beta, ...
    ray job submit -- python jobs/sweep.py --config configs/sweep-gpu.yaml

Rerunning a sweep with the same --name continues it: finished trials are kept. Prints a live
table of trials and, at the end, the best trial, where its model is and which trials ASHA
stopped early; everything is also in <storage_path>/<name>/summary.json and in MLflow.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.config import parse_args
from raypref.sweep.run import SweepConfig, run_sweep


def main(argv: list[str] | None = None) -> dict:
    return run_sweep(parse_args(SweepConfig, argv, description=__doc__))


if __name__ == "__main__":
    run_job(main)
