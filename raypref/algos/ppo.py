"""PPO for language models, pure torch: per-token rewards with a KL penalty, GAE, the clipped
policy and value objectives, KL controllers and running reward normalization.

Shapes: everything per token is ``[batch, T]`` over the response tokens, with ``mask`` 1 on real
response tokens and 0 elsewhere (prompt positions before, padding after). The sequence-level score of the
reward model is added at each response's last real token (Ziegler et al. 2019; Ouyang et al. 2022).
"""

from __future__ import annotations

import math

import torch


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"per-token tensors must share one shape, got {shapes}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked entries; ``shift_mean=False`` keeps the mean (used for
    rewards, whose sign carries meaning). Padding comes back as 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def kl_penalized_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``−kl_coef · (log π − log π_ref)``, plus ``scores[b]`` at row b's last real
    token. Returns ``(rewards, kl)`` where ``kl`` is the per-token estimate ``log π − log π_ref``."""
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if scores.shape != (logprobs.shape[0],):
        raise ValueError(f"scores must be [batch]={logprobs.shape[0]}, got {tuple(scores.shape)}")
    empty = mask.sum(dim=1) == 0
    if empty.any():
        raise ValueError(f"rows {empty.nonzero().flatten().tolist()} have no response token")
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    # the last real token: the mask may start with prompt positions (0) as well as end with padding
    last = mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(dim=1)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over each response; the value after its last real token is 0.

    δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1};  returns = A + V. Padding gives 0.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate ``−min(ρA, clip(ρ, 1−ε, 1+ε)A)`` with ``ρ = exp(log π − log π_old)``,
    averaged over real tokens. Metrics: clip fraction and the approximate KL to the old policy."""
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {"policy/clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
                   "policy/approx_kl": masked_mean(0.5 * log_ratio ** 2, mask).item()}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, float]]:
    """``0.5 · max((V − R)², (clip(V, V_old ± ε) − R)²)`` over real tokens."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        metrics = {"value/clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask).item()}
    return loss, metrics


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β · (1 + clip(KL/target − 1, −0.2, 0.2) · n_steps / horizon),
    so the measured KL is pulled toward ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if init_kl_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(f"init_kl_coef={init_kl_coef}, target={target}, horizon={horizon}: all must be > 0")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl={current_kl} is not finite")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), int(state["horizon"])


class RunningMoments:
    """Running mean / std of reward-model scores over every batch seen (Chan et al. parallel update),
    for scaling scores to unit variance before PPO; saved in checkpoints via state_dict."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        if x.numel() == 0:
            raise ValueError("RunningMoments.update: empty tensor")
        n, mean, var = x.numel(), x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = mean - self.mean
        m2 = self.var * self.count + var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 1e-12))

    def normalize(self, x: torch.Tensor, shift_mean: bool = False) -> torch.Tensor:
        """x / std (and − mean when ``shift_mean``), with the moments seen so far."""
        return ((x - self.mean) if shift_mean else x) / self.std

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
