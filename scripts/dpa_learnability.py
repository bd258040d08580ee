"""Can a policy learn direction-conditioned length from a fixed DPA dataset?

    python scripts/dpa_learnability.py <base model folder> <RSF checkpoint folder> \
        [--steps 150,400,800] [--prompts 48]

Fine-tunes the base (plain torch, one process) on the dataset the RSF run held at that
checkpoint (its kept responses, graded by direction), and after each number of steps prints the
mean generated length for the four evaluation directions (1, 0) ... (√2/2, −√2/2) on held-out
prompts. It separates "the kept data does not teach length control" from "this model cannot learn
it": `[rsf] iteration k kept data` in the job's output shows the first, this the second.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.algos.dpa import directions_between  # noqa: E402
from raypref.algos.sft import sft_loss  # noqa: E402
from raypref.data.world import World  # noqa: E402
from raypref.experiments.rsf import direction_sweep  # noqa: E402
from raypref.models.factory import encode_example, extend_vocabulary, load_pretrained  # noqa: E402
from raypref.recipes.rsf import spelled_direction  # noqa: E402
from raypref.recipes.sft import collate  # noqa: E402
from raypref.train.runner import read_spec_state  # noqa: E402

OBJECTIVES = ["overall_helpfulness", "verbosity"]


def main(argv: list[str] | None = None) -> list[tuple[int, list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base"), parser.add_argument("checkpoint")
    parser.add_argument("--steps", default="150,400,800")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=224)
    args = parser.parse_args(argv)
    steps = sorted(int(s) for s in args.steps.split(","))
    examples = read_spec_state(args.checkpoint)["examples"]
    model, tokenizer = load_pretrained(args.base)
    # the same tokens the RSF job adds (a no-op for its own saved base)
    words = {w for v in ([1.0, -0.5], [0.25, 0.75]) for w in spelled_direction(v, OBJECTIVES).split()}
    extend_vocabulary(model, tokenizer, sorted(words | set("0123456789")), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    world = World(seed=0)
    held_out = world.prompts(args.prompts, split="test")
    directions = directions_between((1.0, 0.0), (math.sqrt(0.5), -math.sqrt(0.5)), 4)
    rng = np.random.default_rng(0)
    print(f"[learnability] {len(examples)} examples from {args.checkpoint}", flush=True)
    done, results = 0, []
    for target in steps:
        model.train()
        while done < target:
            picks = rng.integers(len(examples), size=args.batch)
            # (prompt, response, system) examples; older checkpoints hold (prompt, response)
            batch = collate([encode_example(tokenizer, examples[i][0], examples[i][1], args.max_length,
                                            system=examples[i][2] if len(examples[i]) > 2 else None)
                             for i in picks], tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = sft_loss(logits, batch["input_ids"], batch["response_mask"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
        model.eval()
        rows = direction_sweep(model, tokenizer, world, OBJECTIVES, directions, held_out, 128, seed=1,
                               verbosity_by_length=True)
        lengths = [round(r["length"], 1) for r in rows]
        print(f"[learnability] step {done}: words by direction {lengths}", flush=True)
        results.append((done, lengths))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
