"""MGDA (Frank-Wolfe min-norm) and PCGrad over per-user gradients."""
import itertools

import pytest
import torch

from raypref.algos.gradients import (combine_objectives, mgda_direction, min_norm_weights,
                                     pcgrad_direction)


def _closed_form_two(g1, g2):
    """argmin_γ ||γ g1 + (1−γ) g2||², γ clipped to [0, 1]."""
    diff = g1 - g2
    return float(((g2 - g1) @ g2 / (diff @ diff)).clamp(0, 1))


@pytest.mark.parametrize("g1,g2", [
    ([1.0, 0.0], [0.0, 1.0]),          # orthogonal: γ = 1/2
    ([2.0, 0.0], [-1.0, 1.0]),         # conflicting, different norms
    ([1.0, 1.0], [3.0, 3.0]),          # parallel: the shorter wins (γ = 1)
    ([1.0, 2.0, -1.0], [-2.0, 0.5, 3.0]),
])
def test_mgda_two_gradients_match_closed_form(g1, g2):
    g1, g2 = torch.tensor(g1), torch.tensor(g2)
    alpha = min_norm_weights(torch.stack([g1, g2]))
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= 0).all()
    assert alpha[0].item() == pytest.approx(_closed_form_two(g1, g2), abs=1e-5)


def test_mgda_minimizes_norm_over_simplex_for_three_gradients():
    torch.manual_seed(0)
    grads = torch.randn(3, 5)
    direction, alpha = mgda_direction(grads)
    assert alpha.sum().item() == pytest.approx(1.0) and (alpha >= -1e-9).all()
    best = min(((a * grads[0] + b * grads[1] + (1 - a - b) * grads[2]).norm().item())
               for a, b in itertools.product(torch.linspace(0, 1, 101).tolist(), repeat=2)
               if a + b <= 1 + 1e-9)
    assert direction.norm().item() <= best + 1e-4
    # MGDA's direction does not increase any objective to first order
    assert ((grads @ direction) >= -1e-5).all()


def test_pcgrad_removes_conflict_and_keeps_agreeing_gradients():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # g1·g2 < 0
    d = pcgrad_direction(torch.stack([g1, g2]), torch.Generator().manual_seed(0))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.allclose(d, p1 + p2)
    assert (p1 @ g2).abs() < 1e-6 and (p2 @ g1).abs() < 1e-6
    assert d @ g1 >= 0 and d @ g2 >= 0
    # non-conflicting: untouched, the plain sum
    h1, h2 = torch.tensor([1.0, 0.5]), torch.tensor([0.2, 1.0])
    assert torch.allclose(pcgrad_direction(torch.stack([h1, h2])), h1 + h2)


def test_combine_objectives_writes_grad_and_rejects_unknown_method():
    w = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    losses = [((w - torch.tensor([1.0, 0.0])) ** 2).sum(), ((w - torch.tensor([-1.0, 1.0])) ** 2).sum()]
    info = combine_objectives(losses, [w], "pcgrad", torch.Generator().manual_seed(0))
    g1, g2 = torch.tensor([-2.0, 0.0]), torch.tensor([2.0, -2.0])
    assert info["conflicts"] == 1
    assert torch.allclose(w.grad, pcgrad_direction(torch.stack([g1, g2])))
    info = combine_objectives(losses, [w], "mgda")
    assert torch.allclose(w.grad, mgda_direction(torch.stack([g1, g2]))[0], atol=1e-6)
    with pytest.raises(ValueError, match="unknown method"):
        combine_objectives(losses, [w], "adam")
