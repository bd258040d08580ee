"""Recipe: ORPO of one LoRA policy on preference pairs (loss: `raypref.algos.orpo`).

Reference-free: one policy pass per step and no adapters-off reference pass. It reads the
preference-pair section (`DPOConfig`): ``beta`` is ORPO's lambda (the weight of the odds-ratio
term); ``loss_type`` and ``sft_weight`` are DPO's and unused (ORPO's NLL term is its own).
Like every pair method it trains on in-memory pairs or a streamed Ray Data set, as the
experiment chooses (`PairSpec`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from raypref.algos.dpo import sequence_logprobs
from raypref.algos.orpo import orpo_loss
from raypref.recipes.dpo import Batch, DPOConfig, PairSpec, collate_pairs, encode_pairs
from raypref.recipes.method import pair_method
from raypref.train.spec import StepContext


def orpo_step_outputs(model: torch.nn.Module, batch: Batch, beta: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, log odds ratio per pair, chosen NLL) of a collated batch ``[chosen..., rejected...]``,
    as trl's ORPOTrainer computes them: the NLL over the chosen sequences' every token (prompt
    and response, token mean), the odds of each response from its mean per-token log-prob."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels_mask"]
    n = ids.shape[0] // 2
    response = sequence_logprobs(model, ids, mask, labels) / labels[:, 1:].sum(dim=1).clamp(min=1)
    whole = sequence_logprobs(model, ids[:n], mask[:n], mask[:n])
    nll = -whole.sum() / mask[:n, 1:].sum().clamp(min=1)
    loss, log_odds = orpo_loss(response[:n], response[n:], nll, beta)
    return loss, log_odds, nll


@dataclass
class ORPOSpec(PairSpec):
    def loss(self, batch: Batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        loss, log_odds, nll = orpo_step_outputs(ctx.model, batch, self.beta)
        return loss, {"nll": nll.item(), "log_odds_ratio": log_odds.mean().item(),
                      "reward_accuracy": (log_odds > 0).float().mean().item()}

    @classmethod
    def score_pairs(cls, model, tokenizer, records, section, batch_size: int = 32) -> dict[str, float]:
        """How often the policy gives the chosen response the higher odds, and the mean log odds ratio."""
        was_training, log_odds = model.training, []
        model.eval()
        try:
            encoded = encode_pairs(tokenizer, records, section.max_length, getattr(section, "system", ""))
            with torch.no_grad():
                for start in range(0, len(encoded), batch_size):
                    batch = collate_pairs(encoded[start:start + batch_size], tokenizer.pad_token_id)
                    log_odds.append(orpo_step_outputs(model, batch, section.beta)[1])
        finally:
            model.train(was_training)
        ratios = torch.cat(log_odds)
        return {"odds_accuracy": (ratios > 0).float().mean().item(), "log_odds_ratio": ratios.mean().item()}

    def policy_info(self) -> dict:
        return {**super().policy_info(), "method": "orpo"}


METHOD = pair_method("orpo", DPOConfig, ORPOSpec, orpo_loss, "ORPO: reference-free, NLL + odds-ratio term",
                     metric="odds_accuracy", summary=("loss", "nll", "log_odds_ratio", "reward_accuracy"))
