"""PPO math: GAE, the clipped objectives, KL-penalized rewards, KL controllers, normalization."""

from __future__ import annotations

import pytest
import torch

from raypref.algos.ppo import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    gae,
    kl_penalized_rewards,
    masked_whiten,
    policy_loss,
    value_loss,
)


def test_gae_matches_a_hand_computed_case():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.4, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1 has two response tokens; the 9 / 7 are padding
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 2 − .1 = 1.9; δ1 = .9·.1 − .2 = −.11; δ0 = 1 + .9·.2 − .5 = .68; γλ = .72
    # row 1: δ1 = 1 − .4 = .6; δ0 = .5 + .9·.4 − .3 = .56
    expected_adv = torch.tensor([[0.68 + 0.72 * (-0.11 + 0.72 * 1.9), -0.11 + 0.72 * 1.9, 1.9],
                                 [0.56 + 0.72 * 0.6, 0.6, 0.0]])
    assert torch.allclose(adv, expected_adv, atol=1e-6)
    assert torch.allclose(ret, (expected_adv + values) * mask, atol=1e-6)


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    adv, _ = gae(rewards, values, torch.ones_like(rewards), gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, to_go - values, atol=1e-6)


def _policy_grad(ratio: float, advantage: float) -> float:
    logp = torch.tensor([[torch.log(torch.tensor(ratio)).item()]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1), clip_range=0.2)
    loss.backward()
    return logp.grad.item()


def test_clipped_objective_stops_the_gradient_only_past_the_clip_in_the_advantages_direction():
    # A > 0: raising π past 1 + ε earns nothing more; below 1 − ε the gradient still pushes π up
    assert _policy_grad(1.5, 1.0) == 0.0
    assert _policy_grad(0.5, 1.0) < 0  # loss decreases as log π rises
    # A < 0: lowering π below 1 − ε earns nothing more; above 1 + ε the gradient still pushes π down
    assert _policy_grad(0.5, -1.0) == 0.0
    assert _policy_grad(1.5, -1.0) > 0
    # inside the range both signs get the plain policy gradient −A·ρ
    assert _policy_grad(1.1, 2.0) == pytest.approx(-2.0 * 1.1, rel=1e-5)


def test_policy_loss_ignores_padding_and_reports_clipfrac():
    logp = torch.tensor([[0.5, 0.0, 3.0]])
    loss, metrics = policy_loss(logp, torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1, 1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-(1.2 + 1.0) / 2)  # e^0.5 clipped to 1.2; padding's 3.0 ignored
    assert metrics["policy/clipfrac"] == pytest.approx(0.5)


def test_value_loss_is_clipped_around_the_old_values():
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.5, 2.0]], requires_grad=True)
    loss, _ = value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.2)
    # token 0: max((.5−1)², (.2−1)²) = .64 (clipped branch: no gradient); token 1: max(1, .64) = 1
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0 and values.grad[0, 1].item() == pytest.approx(0.5 * 2 * 1.0 / 2)


def test_kl_penalty_spreads_over_tokens_and_the_score_lands_on_the_last_real_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([10.0, 20.0]), logp, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 10.1], [-0.1, 20.0, 0.0]]))
    # prompt positions before the response: the score still lands on the last response token
    rewards, _ = kl_penalized_rewards(torch.tensor([5.0]), logp[:1], logp[:1], torch.tensor([[0, 1, 0]]), 0.1)
    assert rewards.tolist() == [[0.0, 5.0, 0.0]]
    with pytest.raises(ValueError, match="no response token"):
        kl_penalized_rewards(torch.tensor([1.0]), logp[:1], ref[:1], torch.zeros(1, 3), 0.1)


def test_adaptive_kl_controller_moves_toward_the_target_and_resumes_exactly():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(current_kl=3.0, n_steps=10)  # error −0.5 clipped to −0.2
    assert ctl.value == pytest.approx(0.1 * 1.02 * 0.98)
    # a policy whose KL falls as the coefficient rises (KL = 0.6 / β) settles at the target
    ctl = AdaptiveKLController(init_kl_coef=0.02, target=6.0, horizon=10)
    for _ in range(300):
        ctl.update(current_kl=0.6 / ctl.value, n_steps=1)
    assert 0.6 / ctl.value == pytest.approx(6.0, rel=0.02)
    copy = AdaptiveKLController(1.0, 1.0, 1)
    copy.load_state_dict(ctl.state_dict())
    copy.update(7.0, 4)
    ctl.update(7.0, 4)
    assert copy.value == ctl.value and copy.target == 6.0


def test_fixed_kl_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_running_moments_equal_the_moments_of_everything_seen():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(n, generator=g) * 3 + 2 for n in (5, 17, 8)]
    moments = RunningMoments()
    for b in batches:
        moments.update(b)
    everything = torch.cat(batches).double()
    assert moments.mean == pytest.approx(everything.mean().item())
    assert moments.std == pytest.approx(everything.std(unbiased=False).item())
    assert moments.count == 30
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    x = torch.tensor([1.0, 4.0])
    assert torch.equal(restored.normalize(x), moments.normalize(x))
    assert torch.allclose(moments.normalize(x, shift_mean=True), (x - moments.mean) / moments.std)


def test_masked_whiten_uses_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = masked_whiten(x, mask)
    assert out[0, 3] == 0 and out[0, :3].mean().abs() < 1e-6
    assert (out[0, :3] ** 2).mean().item() == pytest.approx(1.0, rel=1e-5)
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[0, :3].mean().item() == pytest.approx(2.0, rel=1e-5)
