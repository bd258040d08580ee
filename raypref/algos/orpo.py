"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model"):
the chosen responses' negative log-likelihood plus an odds-ratio term, no reference model.

    odds(y|x) = p / (1 - p), p = exp(mean per-token log-prob of y)
    loss = NLL(chosen) - beta * mean log sigmoid(log odds(chosen) - log odds(rejected))

``beta`` is the paper's lambda (trl's ``ORPOConfig.beta``, default 0.1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2 (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, log odds ratio per pair). ``chosen_logps`` / ``rejected_logps``: mean per-token
    log-probabilities of each response, shape [batch], all < 0; ``chosen_nll``: the chosen
    sequences' negative log-likelihood (a scalar)."""
    if chosen_logps.shape != rejected_logps.shape:
        raise ValueError(f"chosen_logps {tuple(chosen_logps.shape)} and rejected_logps "
                         f"{tuple(rejected_logps.shape)} must have the same shape")
    if beta < 0:
        raise ValueError(f"beta={beta}: must be >= 0")
    chosen, rejected = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return chosen_nll - beta * F.logsigmoid(log_odds).mean(), log_odds
