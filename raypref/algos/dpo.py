"""Direct Preference Optimization (DPO) loss, pure torch.

The formulas follow trl 1.16's ``DPOTrainer._compute_loss`` (reverse-KL DPO):

* ``sigmoid``: ``-logsigmoid(beta * (Δchosen - Δrejected))`` where ``Δ = log π - log π_ref``
  summed over the response tokens.
* ``ipo``: ``((Δchosen/len_c - Δrejected/len_r) - 1/(2 beta))**2``; trl divides the summed
  log-ratios by the number of completion tokens, so pass the lengths to match it.

For a LoRA policy the reference is the same peft model with adapters disabled
(``with model.disable_adapter():``), so no second copy of the base is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raypref.algos.logprob import causal_logprobs

LOSS_TYPES = ("sigmoid", "ipo")


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels_mask: torch.Tensor,
) -> torch.Tensor:
    """Sum of the log-probabilities of the response tokens of each sequence.

    ``labels_mask[b, t] = 1`` marks token ``t`` of ``input_ids`` as a response token whose
    log-probability counts (prompt and padding are 0). Returns a float32 tensor ``[batch]``.
    """
    if input_ids.shape != labels_mask.shape or input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
            f"labels_mask {tuple(labels_mask.shape)} must have the same shape"
        )
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # Logits at position t predict token t+1: drop the last logit and the first token.
    token_logps = causal_logprobs(logits, input_ids)
    return (token_logps * labels_mask[:, 1:].to(token_logps.dtype)).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss averaged over the batch, plus the detached implicit rewards.

    Returns ``(loss, chosen_rewards, rejected_rewards)`` with rewards ``beta * (log π - log π_ref)``.
    ``chosen_lengths`` / ``rejected_lengths`` (response token counts) are used by ``ipo`` only:
    given, the log-ratios are averaged per token as trl does; omitted, they are used as sums.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape, got {sorted(map(tuple, shapes))}")

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps

    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    else:  # ipo
        if (chosen_lengths is None) != (rejected_lengths is None):
            raise ValueError("pass both chosen_lengths and rejected_lengths for ipo, or neither")
        chosen_term, rejected_term = chosen_logratios, rejected_logratios
        if chosen_lengths is not None:
            chosen_term = chosen_logratios / chosen_lengths.clamp(min=1.0)
            rejected_term = rejected_logratios / rejected_lengths.clamp(min=1.0)
        per_pair = (chosen_term - rejected_term - 1.0 / (2.0 * beta)) ** 2

    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return per_pair.mean(), chosen_rewards, rejected_rewards


def implicit_reward_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Fraction of pairs whose chosen implicit reward is strictly higher (trl's ``rewards/accuracies``)."""
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must have the same shape"
        )
    if chosen_rewards.numel() == 0:
        raise ValueError("implicit_reward_accuracy needs at least one pair")
    return (chosen_rewards > rejected_rewards).float().mean().item()
