"""Generate and judge a shared candidate pool of real text once (raypref/recipes/pool.py).

    python jobs/pool.py --config configs/reward-compare-smollm2.yaml   # a job config's data.pool
    python jobs/pool.py --train_prompts 10 --test_prompts 5 --max_new_tokens 48 ...

Writes <dir>/pool-<hash of the settings>/ (pool.jsonl, scores.json, summary.json); an
interrupted run resumes with the same command. Sampling a real model is long on a CPU
(about 26 min for 98k tokens on 2 shared cores).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.experiments.pool import main

if __name__ == "__main__":
    run_job(main)
