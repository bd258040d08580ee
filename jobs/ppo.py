"""PPO of one LoRA policy, rewarded by a P-Soups preference's attribute judge in the simulated world.

    python jobs/ppo.py                                  # P3A (friendly style) on the SFT warm start
    python jobs/ppo.py --preference P2A --training.steps 96 --training.kl_coef 0.1
    python jobs/ppo.py --config ppo.yaml --run_name my-run   # an existing run name resumes it

Prints reward / KL progress, the judged reward of the base and the policy on held-out prompts,
and where the policy and the MLflow run are.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.ppo import PPOJobConfig, train_ppo

main = job_main(PPOJobConfig, train_ppo, __doc__)

if __name__ == "__main__":
    run_job(main)
