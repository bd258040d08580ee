"""SFT warm start on the simulated world (tiny GPT-2 by default, ~2 min on 2 CPU cores).

    python jobs/sft.py [--config sft.yaml] [--resources.num_workers 2] [--training.steps 300] ...

Trains (or reuses: outputs are cached by config hash) the policy, logs per-step metrics and a
few sample generations to MLflow, and prints the model folder.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.sft import SFTConfig, run_sft_job

main = job_main(SFTConfig, run_sft_job, __doc__)

if __name__ == "__main__":
    run_job(main)
