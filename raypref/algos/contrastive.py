"""Contrastive loss on latent user means (Liu 2025 eq. 12), pure torch.

CL = Σ_{i≠j} [−1(h_i = h_j) + 1(h_i ≠ h_j)] · cos(μ_i, μ_j): pulls means of the same user
together and pushes different users apart. Averaged over the ordered pairs i ≠ j (the paper
sums; the mean keeps the scale, and so the coefficient, independent of the batch size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_contrastive_loss(mu: torch.Tensor, user_ids: torch.Tensor) -> torch.Tensor:
    """mu [B, d] latent means, user_ids [B]; B >= 2. Ranges over [-1, 1]."""
    if mu.dim() != 2 or user_ids.shape != (mu.shape[0],):
        raise ValueError(f"latent_contrastive_loss: mu must be [B, d] and user_ids [B]; got "
                         f"{tuple(mu.shape)} and {tuple(user_ids.shape)}")
    n = mu.shape[0]
    if n < 2:
        raise ValueError("latent_contrastive_loss: needs at least 2 samples in the batch")
    unit = F.normalize(mu.float(), dim=-1)
    cos = unit @ unit.T
    same = user_ids.unsqueeze(0) == user_ids.unsqueeze(1)
    sign = torch.where(same, -1.0, 1.0)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=mu.device)
    return (sign * cos)[off_diagonal].mean()
