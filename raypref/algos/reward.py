"""Reward-model losses, pure torch: Bradley-Terry, the personalized (conditional) BT of
P-RLHF §F.2, multi-objective regression (DPA §2.1) and linear scalarization."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _same_shape(name: str, *tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise ValueError(f"{name}: reward tensors must have one shape, got {sorted(shapes)}")


def bt_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood, -log sigmoid(r_w - r_l) (Liu 2025 eq. 2).

    ``weights`` (one per pair, e.g. per-user loss weights) turn the mean into a weighted mean.
    """
    _same_shape("bt_loss", chosen_rewards, rejected_rewards)
    if chosen_rewards.numel() == 0:
        raise ValueError("bt_loss: no pairs")
    per_pair = -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float())
    if weights is None:
        return per_pair.mean()
    _same_shape("bt_loss weights", per_pair, weights)
    return (per_pair * weights).sum() / weights.sum().clamp(min=1e-12)


def personalized_bt_loss(user_chosen: torch.Tensor, user_rejected: torch.Tensor,
                         generic_chosen: torch.Tensor, generic_rejected: torch.Tensor,
                         alpha: float) -> torch.Tensor:
    """P-RLHF §F.2: α·BT(rewards under the user's embedding) + (1−α)·BT(under generic user 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"personalized_bt_loss: alpha must be in [0, 1], got {alpha}")
    return (alpha * bt_loss(user_chosen, user_rejected)
            + (1.0 - alpha) * bt_loss(generic_chosen, generic_rejected))


def pair_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Per-pair 1.0 where the chosen response scores strictly higher, else 0.0."""
    _same_shape("pair_accuracy", chosen_rewards, rejected_rewards)
    return (chosen_rewards > rejected_rewards).float()


def rescale(scores: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float,
            top: float = 100.0) -> torch.Tensor:
    """Map scores on [low, high] (per attribute, broadcast over the last dim) to [0, top]:
    DPA §3.1 rescales every reward dimension to 0-100 before regression."""
    low_t = torch.as_tensor(low, dtype=scores.dtype)
    high_t = torch.as_tensor(high, dtype=scores.dtype)
    if (high_t <= low_t).any():
        raise ValueError(f"rescale: every high must exceed its low (low={low}, high={high})")
    return (scores - low_t) / (high_t - low_t) * top


def multi_objective_mse(predicted: torch.Tensor, target: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """DPA eq. 1: mean over responses of ||r̃(x, y) − r(x, y)||² (summed over attributes).

    ``mask`` [B, k] (bool) drops attributes a source does not rate (e.g. HelpSteer rows
    carry no UltraFeedback aspect).
    """
    if predicted.shape != target.shape or predicted.dim() != 2:
        raise ValueError(f"multi_objective_mse: predicted {tuple(predicted.shape)} and target "
                         f"{tuple(target.shape)} must both be [batch, attributes]")
    err = (predicted.float() - target.float()) ** 2
    if mask is not None:
        if mask.shape != err.shape:
            raise ValueError(f"multi_objective_mse: mask {tuple(mask.shape)} != {tuple(err.shape)}")
        err = err * mask.float()
    return err.sum(dim=-1).mean()


def scalarize(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Linear scalarization v·r(x, y) (DPA §2.2): rewards [B, k], weights [k] or [B, k] -> [B]."""
    if rewards.dim() != 2:
        raise ValueError(f"scalarize: rewards must be [batch, k], got {tuple(rewards.shape)}")
    k = rewards.shape[-1]
    if weights.shape[-1] != k or weights.dim() not in (1, 2) or (
            weights.dim() == 2 and weights.shape[0] != rewards.shape[0]):
        raise ValueError(f"scalarize: weights {tuple(weights.shape)} do not fit rewards "
                         f"{tuple(rewards.shape)} (need [{k}] or [{rewards.shape[0]}, {k}])")
    return (rewards * weights.to(rewards.dtype)).sum(dim=-1)
