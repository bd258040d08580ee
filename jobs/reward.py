"""Train a reward model on the simulated world's users and report per-user accuracy.

    python jobs/reward.py --method bt|multi_objective|user_model|vae|few_shot [--sampling adaptive]
        [--contrastive 0] [--gradient pcgrad|mgda] [--data.population cluster]
        [--data.difficulty 0.1] [--head_lr 1e-3] [--training.steps 200] ...

Defaults, measured choices and the few-shot path: raypref/experiments/reward.py.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.reward import RewardJobConfig, run_reward_job

main = job_main(RewardJobConfig, run_reward_job, __doc__)

if __name__ == "__main__":
    run_job(main)
