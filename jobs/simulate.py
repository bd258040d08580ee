"""Simulate the preference world's user populations and write them as parquet + jsonl shards.

    python jobs/simulate.py                          # every population, difficulty 0
    python jobs/simulate.py --difficulty 0.5 --populations '[psoups]'

Per population: <out>/<population>/ (train prompts), <out>/<population>_test/ (held-out
prompts) and <out>/analysis/<population>/; everything logged to one MLflow run.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.simulate import SimulateConfig, run_simulate

main = job_main(SimulateConfig, run_simulate, __doc__)

if __name__ == "__main__":
    run_job(main)
