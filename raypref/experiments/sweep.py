"""The sweep job (``jobs/sweep.py``): a hyperparameter sweep of a raypref job with Ray Tune +
Optuna (seeded TPE) + ASHA, tracked in MLflow (the machinery: ``raypref.sweep``)."""
from __future__ import annotations

from raypref.sweep.run import SweepConfig, run_sweep

__all__ = ["SweepConfig", "run_sweep"]
