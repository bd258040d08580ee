"""The reward-model comparison table (Liu 2025 Tables 2-4): each arm x each seed trained as the reward
job trains it, then mean ± std test accuracy, converged runs, steps to 95%, the worst user.

    python jobs/reward_compare.py [--arms '[BT, VAE]'] [--seeds '[0, 1, 2]']
        [--training.steps 200] [--data.difficulty 0.1] ...   (any jobs/reward.py flag)

Writes <output_dir>/comparison.md and comparison.json and prints the table.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.reward_comparison import RewardCompareConfig, run_comparison

main = job_main(RewardCompareConfig, run_comparison, __doc__)

if __name__ == "__main__":
    run_job(main)
