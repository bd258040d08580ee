"""Implicit-reward accuracy of a DPO-trained LoRA policy on (held-out) preference pairs."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from raypref.algos.dpo import implicit_reward_accuracy
from raypref.data.records import PreferenceRecord
from raypref.recipes.dpo import collate_pairs, dpo_step_outputs, encode_pairs


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, tokenizer, pairs: Sequence[PreferenceRecord], beta: float,
                   max_length: int = 128, batch_size: int = 32) -> dict[str, float]:
    """Implicit-reward accuracy and mean margin of a peft policy on (held-out) pairs."""
    if not pairs:
        raise ValueError("evaluate_pairs needs at least one pair")
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    try:
        encoded = encode_pairs(tokenizer, pairs, max_length)
        for start in range(0, len(encoded), batch_size):
            batch = collate_pairs(encoded[start : start + batch_size], tokenizer.pad_token_id)
            _, c, r = dpo_step_outputs(model, batch, beta)
            chosen.append(c)
            rejected.append(r)
    finally:
        model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"reward_accuracy": implicit_reward_accuracy(c, r), "reward_margin": (c - r).mean().item()}
