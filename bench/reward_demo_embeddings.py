"""VAE RM training steps/s: demonstration embeddings precomputed once vs computed on the fly.

    python bench/reward_demo_embeddings.py [--encoder minilm|tiny] [--steps 10] [--batch 8]

Both paths run the same spec, model and batches (query encoder fine-tuned); the on-the-fly
path re-embeds each query's N demonstrations with the frozen encoder every step, as a model
without the cache would. Prints steps/s of each and their ratio.
"""
from __future__ import annotations

import argparse
import time

import torch

from raypref.models.reward import EncoderConfig, embed_frozen
from raypref.recipes.reward import RewardConfig, RewardSpec, RewardTraining, build_demo_encoder
from raypref.recipes.reward_data import RewardDataConfig
from raypref.train.spec import StepContext


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    cfg = RewardConfig(method="vae", encoder=EncoderConfig(args.encoder, max_length=160),
                       data=RewardDataConfig(train_pairs_per_user=120, test_pairs_per_user=4),
                       training=RewardTraining(steps=args.steps, micro_batch_size=args.batch))
    spec = RewardSpec(cfg)
    torch.manual_seed(0)
    model = spec.build_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    demo_encoder = build_demo_encoder(cfg)
    pools = {uid: up.train[:cfg.data.demo_pool] for uid, up in spec.pairs.items()}
    t = time.perf_counter()
    spec.demos()
    precompute_s = time.perf_counter() - t
    ctx = StepContext(step=1, max_steps=args.steps, rank=0, world_size=1,
                      micro_batch_size=args.batch, grad_accum=1, seed=0, models={"reward": model})
    batches = list(spec.batches(ctx))
    demo_sampler = spec._demo_sampler(0)

    def step(batch):
        loss, _ = spec.loss(batch, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def on_the_fly(batch, picks):
        demos = []
        for uid, idx in picks:  # what the cache saves: N pairs x 2 texts per query
            recs = [pools[uid][j] for j in demo_sampler.demos(uid, idx, 0)]
            prompts = [r.prompt for r in recs]
            demos.append(torch.stack([embed_frozen(demo_encoder, prompts, [r.chosen for r in recs]),
                                      embed_frozen(demo_encoder, prompts, [r.rejected for r in recs])],
                                     dim=1))
        return {**batch, "demos": torch.stack(demos)}

    sampler = spec._batch_sampler(0, 1)
    step(batches[0])  # warm-up
    t = time.perf_counter()
    for b in batches:
        step(b)
    cached = args.steps / (time.perf_counter() - t)
    t = time.perf_counter()
    for i, b in enumerate(batches):
        step(on_the_fly(b, sampler.batch(i + 1)))
    fly = args.steps / (time.perf_counter() - t)
    print(f"encoder={args.encoder} batch={args.batch} N={cfg.data.n_demos} "
          f"(one-off precompute of {len(pools)} pools: {precompute_s:.1f}s)")
    print(f"precomputed  {cached:8.3f} steps/s")
    print(f"on the fly   {fly:8.3f} steps/s")
    print(f"ratio precomputed / on the fly: {cached / fly:.2f}x")


if __name__ == "__main__":
    main()
