"""Reward-model math: BT, personalized BT, multi-objective MSE, scalarization, VAE, contrastive."""
import math

import pytest
import torch
import torch.nn.functional as F

from raypref.algos.contrastive import latent_contrastive_loss
from raypref.algos.reward import (bt_loss, multi_objective_mse, pair_accuracy,
                                  personalized_bt_loss, rescale, scalarize)
from raypref.algos.vae import kl_to_standard_normal, reparameterize, vae_reward_loss


def test_bt_loss_is_minus_log_sigmoid_of_margin():
    rw, rl = torch.tensor([2.0, -1.0, 0.3]), torch.tensor([0.5, 1.0, 0.3])
    expected = sum(-math.log(1 / (1 + math.exp(-(w - l)))) for w, l in zip(rw.tolist(), rl.tolist())) / 3
    assert bt_loss(rw, rl).item() == pytest.approx(expected, rel=1e-6)
    # swapping chosen and rejected must cost more when the margin was positive
    assert bt_loss(rl[:1], rw[:1]) > bt_loss(rw[:1], rl[:1])


def test_bt_loss_weights_and_shape_errors():
    rw, rl = torch.tensor([3.0, -3.0]), torch.zeros(2)
    weighted = bt_loss(rw, rl, weights=torch.tensor([0.0, 1.0]))
    assert weighted.item() == pytest.approx(-F.logsigmoid(torch.tensor(-3.0)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        bt_loss(torch.zeros(2), torch.zeros(3))


def test_personalized_bt_mixes_user_and_generic_terms():
    u_w, u_l, g_w, g_l = torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0])
    for alpha in (0.0, 0.3, 1.0):
        expected = alpha * bt_loss(u_w, u_l) + (1 - alpha) * bt_loss(g_w, g_l)
        assert personalized_bt_loss(u_w, u_l, g_w, g_l, alpha).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="alpha"):
        personalized_bt_loss(u_w, u_l, g_w, g_l, 1.5)


def test_pair_accuracy_counts_strict_wins():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])).tolist() == [1, 0, 0]


def test_multi_objective_mse_rescale_and_mask():
    scores = torch.tensor([[1.0, 5.0], [3.0, 1.0]])
    target = rescale(scores, 1.0, 5.0)
    assert target.tolist() == [[0.0, 100.0], [50.0, 0.0]]
    assert multi_objective_mse(target, target).item() == 0.0
    pred = target + torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    assert multi_objective_mse(pred, target).item() == pytest.approx((1 + 4) / 2)
    mask = torch.tensor([[True, False], [True, True]])
    assert multi_objective_mse(pred, target, mask).item() == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="high"):
        rescale(scores, 5.0, 1.0)


def test_scalarize_weight_vector_and_wrong_length():
    r = torch.tensor([[10.0, 0.0, 5.0], [0.0, 10.0, 5.0]])
    assert scalarize(r, torch.tensor([1.0, 0.0, 0.0])).tolist() == [10.0, 0.0]
    assert scalarize(r, torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])).tolist() == [0.0, 10.0]
    with pytest.raises(ValueError, match="do not fit"):
        scalarize(r, torch.tensor([1.0, 0.0]))


def test_kl_zero_at_standard_normal_and_positive_elsewhere():
    zeros = torch.zeros(3, 4)
    assert torch.allclose(kl_to_standard_normal(zeros, zeros), torch.zeros(3))
    for mu, logvar in ((0.5, 0.0), (0.0, 0.7), (0.0, -0.7), (-1.0, 1.0)):
        kl = kl_to_standard_normal(torch.full((1, 4), mu), torch.full((1, 4), logvar))
        assert kl.item() > 0
    # against torch.distributions
    mu, logvar = torch.randn(2, 3), torch.randn(2, 3)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(2, 3), torch.ones(2, 3))
    assert torch.allclose(kl_to_standard_normal(mu, logvar),
                          torch.distributions.kl_divergence(q, p).sum(-1), atol=1e-5)


def test_reparameterize_moments_and_gradients():
    mu = torch.tensor([[1.0, -2.0]], requires_grad=True)
    logvar = torch.tensor([[0.0, math.log(4.0)]], requires_grad=True)
    z = reparameterize(mu.expand(20000, 2), logvar.expand(20000, 2),
                       generator=torch.Generator().manual_seed(0))
    assert z.mean(0).tolist() == pytest.approx([1.0, -2.0], abs=0.05)
    assert z.std(0).tolist() == pytest.approx([1.0, 2.0], abs=0.05)
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_vae_reward_loss_is_bt_plus_beta_kl():
    rw, rl = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mu, logvar = torch.ones(2, 3), torch.zeros(2, 3)
    loss, parts = vae_reward_loss(rw, rl, mu, logvar, beta=0.1)
    assert parts["kl"].item() == pytest.approx(1.5)
    assert loss.item() == pytest.approx(bt_loss(rw, rl).item() + 0.15)
    with pytest.raises(ValueError, match="beta"):
        vae_reward_loss(rw, rl, mu, logvar, beta=-1)


def test_contrastive_lower_when_same_user_latents_are_close():
    users = torch.tensor([1, 1, 2, 2])
    clustered = torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.0], [-0.9, -0.1]])
    mixed = torch.tensor([[1.0, 0.0], [-0.9, -0.1], [-1.0, 0.0], [0.9, 0.1]])
    assert latent_contrastive_loss(clustered, users) < latent_contrastive_loss(mixed, users)
    # all same user, identical directions: the minimum -1
    assert latent_contrastive_loss(torch.ones(3, 2), torch.tensor([5, 5, 5])).item() == pytest.approx(-1.0)
    # gradient pulls same-user means together
    mu = mixed.clone().requires_grad_(True)
    opt = torch.optim.SGD([mu], lr=0.5)
    before = latent_contrastive_loss(mu, users).item()
    for _ in range(20):
        opt.zero_grad()
        latent_contrastive_loss(mu, users).backward()
        opt.step()
    assert latent_contrastive_loss(mu, users).item() < before - 0.5
    with pytest.raises(ValueError, match="at least 2"):
        latent_contrastive_loss(torch.ones(1, 2), torch.tensor([1]))
