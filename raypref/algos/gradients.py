"""Gradient manipulation over per-user objectives (Liu 2025 §4.3), pure torch.

Each objective i (the loss on one user's data) has a flat gradient g_i; these functions
turn the stack G = [g_1; ...; g_m] into one update direction:

* MGDA (Désidéri 2012): the min-norm point of the convex hull, Σ α_i g_i with
  α = argmin_{α ∈ Δ_m} ||Σ α_i g_i||² (Liu 2025 eq. 10), solved by Frank-Wolfe (Jaggi 2013)
  on the m × m Gram matrix, with exact line search.
* PCGrad (Yu et al. 2020): each g_i loses its component along every g_j it conflicts
  with (g_i·g_j < 0), Liu 2025 eq. 11, in a random order of j; the direction is the sum.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _check_stack(grads: torch.Tensor, name: str) -> None:
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"{name}: grads must be [objectives, parameters], got "
                         f"{tuple(grads.shape)}")
    if not torch.isfinite(grads).all():
        raise ValueError(f"{name}: grads contain NaN or inf")


def min_norm_weights(grads: torch.Tensor, max_iter: int = 1000,
                     tol: float = 1e-12) -> torch.Tensor:
    """Simplex weights α minimizing ||αᵀG||² (MGDA's dual, Liu 2025 eq. 10), by Frank-Wolfe with
    away steps (Lacoste-Julien & Jaggi 2015): plain Frank-Wolfe zig-zags for thousands of
    steps when the optimum lies on a face of the simplex; away steps converge linearly.
    Stops when the duality gap is below ``tol``."""
    _check_stack(grads, "min_norm_weights")
    m = grads.shape[0]
    gram = grads.double() @ grads.double().T
    alpha = torch.full((m,), 1.0 / m, dtype=torch.float64)
    for _ in range(max_iter):
        g_alpha = gram @ alpha              # half the gradient of αᵀGα
        value = alpha @ g_alpha
        t = int(torch.argmin(g_alpha))      # Frank-Wolfe vertex
        active = alpha > 0
        s = int(torch.argmax(torch.where(active, g_alpha, -torch.inf)))  # away vertex
        fw_gap, away_gap = value - g_alpha[t], g_alpha[s] - value
        if fw_gap <= tol:
            break
        if fw_gap >= away_gap:
            direction = -alpha.clone()
            direction[t] += 1.0
            step_max = 1.0
        else:
            direction = alpha.clone()
            direction[s] -= 1.0
            step_max = float(alpha[s] / (1.0 - alpha[s])) if alpha[s] < 1 else 1e12
        curvature = direction @ gram @ direction
        if curvature <= 1e-30:
            gamma = step_max
        else:  # exact line search of the quadratic along the direction
            gamma = min(max(float(-(direction @ g_alpha) / curvature), 0.0), step_max)
        alpha = (alpha + gamma * direction).clamp(min=0.0)
        alpha = alpha / alpha.sum()
    return alpha.to(grads.dtype)


def mgda_direction(grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ α_i g_i, α) with α from `min_norm_weights`."""
    alpha = min_norm_weights(grads)
    return alpha @ grads, alpha


def pcgrad_direction(grads: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum of the projected gradients (Liu 2025 eq. 11); j visited in a random order per i."""
    _check_stack(grads, "pcgrad_direction")
    m = grads.shape[0]
    sq_norms = (grads * grads).sum(dim=1)
    projected = grads.clone()
    for i in range(m):
        for j in torch.randperm(m, generator=generator).tolist():
            if j == i or sq_norms[j] <= 0:
                continue
            dot = projected[i] @ grads[j]
            if dot < 0:
                projected[i] = projected[i] - dot / sq_norms[j] * grads[j]
    return projected.sum(dim=0)


def flat_grad(loss: torch.Tensor, params: Sequence[torch.Tensor],
              retain_graph: bool = True) -> torch.Tensor:
    """∂loss/∂params as one flat vector (zeros for parameters the loss does not reach)."""
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                      for p, g in zip(params, grads)])


def assign_flat_grad(params: Sequence[torch.Tensor], direction: torch.Tensor) -> None:
    """Write a flat direction into the parameters' .grad (the optimizer then steps on it)."""
    total = sum(p.numel() for p in params)
    if direction.numel() != total:
        raise ValueError(f"assign_flat_grad: direction has {direction.numel()} entries, "
                         f"parameters have {total}")
    offset = 0
    for p in params:
        chunk = direction[offset:offset + p.numel()].view_as(p).to(p.dtype)
        p.grad = chunk.clone()
        offset += p.numel()


def combine_objectives(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                       method: str, generator: torch.Generator | None = None) -> dict:
    """Per-objective gradients of ``losses`` combined by ``method`` ("mgda" | "pcgrad" |
    "sum"); the result is written into params' .grad. Returns diagnostics."""
    if method not in ("mgda", "pcgrad", "sum"):
        raise ValueError(f"combine_objectives: unknown method {method!r}; "
                         "expected 'mgda', 'pcgrad' or 'sum'")
    if not losses:
        raise ValueError("combine_objectives: no losses")
    params = [p for p in params if p.requires_grad]
    stack = torch.stack([flat_grad(loss, params, retain_graph=True) for loss in losses])
    info: dict = {"conflicts": int(sum((stack[i] @ stack[j] < 0).item()
                                       for i in range(len(losses))
                                       for j in range(i + 1, len(losses))))}
    if method == "mgda":
        direction, alpha = mgda_direction(stack)
        info["alpha"] = alpha.tolist()
    elif method == "pcgrad":
        direction = pcgrad_direction(stack, generator)
    else:
        direction = stack.sum(dim=0)
    assign_flat_grad(params, direction)
    info["direction_norm"] = float(direction.norm())
    return info
