"""Personalized Soups: per-preference policies trained concurrently, merged post hoc, evaluated.

    python jobs/soups.py                                  # embedded default, one CPU machine
    python jobs/soups.py --algo ppo                       # any per-preference method by name
    python jobs/soups.py --config configs/soups-7b-8gpu.yaml
    ray job submit --address http://127.0.0.1:8265 -- python jobs/soups.py
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.soups.run import SoupsConfig, run_soups_job

main = job_main(SoupsConfig, run_soups_job, __doc__)

if __name__ == "__main__":
    run_job(main)
