"""Hyperparameter sweep of a raypref job: Ray Tune + Optuna (seeded TPE) + ASHA, in MLflow.

    python jobs/sweep.py                                  # the default: 8 DPO trials, ASHA
    python jobs/sweep.py --job dpo --space my_space.yaml --name lr-beta --num_samples 32
    python jobs/sweep.py --job soups                      # merge weights on the simplex
    python jobs/sweep.py --job reward                     # VAE RM: sampling ratio, phase, KL beta, ...
    ray job submit -- python jobs/sweep.py --config configs/sweep-gpu.yaml

Rerunning a sweep with the same --name continues it. Prints a live table of trials and the best
trial; everything is also in <output_dir>/<name>/summary.json and in MLflow.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.sweep import SweepConfig, run_sweep

main = job_main(SweepConfig, run_sweep, __doc__)

if __name__ == "__main__":
    run_job(main)
