"""PPO of one LoRA policy, rewarded by a P-Soups preference's attribute judge in the simulated world.

    python jobs/ppo.py                                  # P3A (friendly style) on the SFT warm start
    python jobs/ppo.py --preference P2A --training.steps 96 --training.kl_coef 0.1
    python jobs/ppo.py --config ppo.yaml --run_name my-run   # an existing run name resumes it

Trains through the Ray Train + DeepSpeed runner (actor and critic trainable, reference and reward
frozen; checkpoints in <output_dir>/<run_name>/runs), prints reward / KL progress, the judged
reward of the base and the policy on held-out prompts, and where the policy and MLflow run are.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.config import parse_args
from raypref.experiments.policy import PPOJobConfig, PPOJobResult, train_ppo


def main(argv: list[str] | None = None) -> PPOJobResult:
    result = train_ppo(parse_args(PPOJobConfig, argv, description=__doc__))
    s = result.summary
    print(f"[ppo] {s['preference']} reward {s['reward']}: training reward "
          f"{s['train_reward_first_quarter']:.3f} (first quarter) -> {s['train_reward_last_quarter']:.3f} "
          f"(last quarter), KL/response {s['kl_per_response_last']:.3f}")
    print(f"[ppo] held-out judged reward: base {s['heldout_reward_base']:.3f} -> "
          f"policy {s['heldout_reward_policy']:.3f}")
    print(f"[ppo] policy: {result.policy_dir}")
    print(f"[ppo] summary: {result.output_dir / 'summary.json'}; MLflow run {result.run_id} in "
          f"{result.tracking_uri}")
    return result


if __name__ == "__main__":
    run_job(main)
