"""Preference optimization (DPO by default) of one LoRA policy on preference shards streamed
through Ray Data into Ray Train.

    python jobs/simulate.py --populations '[psoups]'        # writes outputs/simulate/psoups{,_test}/
    python jobs/dpo.py                                      # P-Soups preference P1A (user 1)
    python jobs/dpo.py --train_data s3://bucket/prefs/ --test_data '' --user_ids '[]'
    python jobs/dpo.py --data.source prefs.jsonl --data.format trl  # your own data (README)
    python jobs/dpo.py --config dpo.yaml --training.steps 500 --resources.num_workers 2

Bad rows go to <output_dir>/<run_name>/quarantine.jsonl; more than max_quarantine_fraction of
them stops the job before training (the MLflow run ends FAILED).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.preference import DPOJobConfig, train_dpo

main = job_main(DPOJobConfig, train_dpo, __doc__)

if __name__ == "__main__":
    run_job(main)
