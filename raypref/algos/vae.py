"""The VAE conditional reward model's objective (Liu 2025 eq. 8), pure torch.

The encoder gives a diagonal Gaussian q(z | demonstrations) = N(mu, diag(exp(logvar)));
z is drawn by reparameterization so gradients reach mu and logvar.
"""
from __future__ import annotations

import torch

from raypref.algos.reward import bt_loss


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I)."""
    if mu.shape != logvar.shape:
        raise ValueError(f"reparameterize: mu {tuple(mu.shape)} != logvar {tuple(logvar.shape)}")
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag σ²) ‖ N(0, I)) per sample, summed over latent dims: [B, d] -> [B].

    = ½ Σ (μ² + σ² − log σ² − 1); zero exactly at μ = 0, σ = 1.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"kl_to_standard_normal: mu {tuple(mu.shape)} != logvar "
                         f"{tuple(logvar.shape)}")
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1.0).sum(dim=-1)


def vae_reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                    mu: torch.Tensor, logvar: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative of Liu 2025 eq. 8: BT NLL + β·KL(q(z | demos) ‖ N(0, I)), batch means.

    Returns the loss and its detached parts ("bt", "kl").
    """
    if beta < 0:
        raise ValueError(f"vae_reward_loss: beta must be >= 0, got {beta}")
    bt = bt_loss(chosen_rewards, rejected_rewards)
    kl = kl_to_standard_normal(mu, logvar).mean()
    return bt + beta * kl, {"bt": bt.detach(), "kl": kl.detach()}
