"""Seconds per PPO iteration, split into generation, scoring and update (in-process, one worker).

    python bench/ppo_timing.py [--base outputs/sft/sft-...] [--iterations 3] [--preference P3A]

One iteration = one rollout (generate with the actor, score with the world judge, then the
log-prob / value / GAE passes that build the buffer) + the optimizer steps it feeds
(ppo_epochs x rollout_size / micro_batch_size micro-batches: actor + critic forward, backward,
AdamW). Uses PPOConfig's defaults; without --base, the default world's SFT warm start (what
jobs/ppo.py trains from; reused from outputs/sft when cached, else trained first, ~2 min), with
--base fresh an untrained tiny GPT-2 of the same shape (its responses run to max length).
Prints each phase's seconds and share of the iteration: generation's share is the figure to beat.
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import raypref.recipes.ppo as ppo  # noqa: E402
from raypref.data.users import psoups_profile  # noqa: E402
from raypref.data.world import World  # noqa: E402
from raypref.models.factory import (ModelConfig, build_policy, build_tokenizer,  # noqa: E402
                                    save_pretrained_safetensors)
from raypref.rewards.world import WeightedJudgeReward  # noqa: E402
from raypref.train.spec import StepContext  # noqa: E402


class Timer:
    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="", help="a saved base policy folder ('' = the SFT warm start, "
                        "'fresh' = an untrained tiny GPT-2)")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--preference", default="P3A")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    world = World(seed=0)
    base = args.base
    if not base:
        from raypref.recipes.sft import SFTConfig, train_sft

        base = str(train_sft(SFTConfig()))
    elif base == "fresh":
        tokenizer = build_tokenizer(ModelConfig(), world.vocabulary())
        torch.manual_seed(0)
        base = str(save_pretrained_safetensors(build_policy(ModelConfig(), tokenizer), tokenizer,
                                               Path(tempfile.mkdtemp(prefix="ppo-bench-")) / "base"))
    cfg = ppo.PPOConfig()
    profile = psoups_profile(args.preference)
    spec = ppo.PPOSpec.from_config(cfg, base, world.prompts(256), functools.partial(
        WeightedJudgeReward, {profile.attribute: profile.direction}), name=args.preference)

    generation, scoring = Timer(), Timer()
    ppo.generate_ids = generation.wrap(ppo.generate_ids)  # the spec calls it through its module
    torch.manual_seed(0)
    models = {role: spec.build_model(role) for role in spec.roles()}
    models["reward"].score = scoring.wrap(models["reward"].score)
    for role in ("reference", "reward"):
        models[role].requires_grad_(False).eval()
    optimizers = {role: torch.optim.AdamW([p for p in models[role].parameters() if p.requires_grad], lr=cfg.lr)
                  for role in ("actor", "critic")}
    ctx = StepContext(step=1, max_steps=10**6, rank=0, world_size=1, micro_batch_size=cfg.micro_batch_size,
                      grad_accum=1, seed=0, models=models)
    steps_per_rollout = cfg.ppo_epochs * cfg.rollout_size // cfg.micro_batch_size
    stream = spec.batches(ctx)
    rows = []
    for iteration in range(args.iterations + 1):  # the first is a warm-up, not reported
        generation.seconds = scoring.seconds = 0.0
        start = time.perf_counter()
        batch = next(stream)  # makes the rollout
        rollout = time.perf_counter() - start
        update_start = time.perf_counter()
        for step in range(steps_per_rollout):
            if step:
                batch = next(stream)
            losses, metrics = spec.loss(batch, ctx)
            for opt in optimizers.values():
                opt.zero_grad()
            (losses["actor"] + losses["critic"]).backward()
            for opt in optimizers.values():
                opt.step()
        update = time.perf_counter() - update_start
        if iteration:
            rows.append({"generation": generation.seconds, "scoring": scoring.seconds,
                         "rollout passes": rollout - generation.seconds - scoring.seconds,
                         "update": update, "reward": metrics["reward/score"]})
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    total = sum(v for k, v in mean.items() if k != "reward")
    print(f"PPO iteration on {base} ({cfg.rollout_size} prompts, {cfg.max_new_tokens} new tokens, "
          f"{steps_per_rollout} optimizer steps of {cfg.micro_batch_size}), mean of {len(rows)} iterations, "
          f"{torch.get_num_threads()} torch threads:")
    for key in ("generation", "scoring", "rollout passes", "update"):
        print(f"  {key:15s} {mean[key]:7.3f} s  {100 * mean[key] / total:5.1f}%")
    print(f"  {'total':15s} {total:7.3f} s  (generation / update = {mean['generation'] / mean['update']:.2f}x)")


if __name__ == "__main__":
    main()
