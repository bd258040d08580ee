"""PPO loop spec: rollouts, the two trainable roles' losses, exact resume from state_dict."""

from __future__ import annotations

import copy

import pytest
import torch

from raypref.recipes.ppo import PPOSpec, pack
from raypref.rewards.world import WeightedJudgeReward
from raypref.train.spec import StepContext


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from raypref.data.world import World
    from raypref.models.factory import (
        ModelConfig,
        build_policy,
        build_tokenizer,
        save_pretrained_safetensors,
    )

    world = World(seed=0)
    tokenizer = build_tokenizer(ModelConfig(), world.vocabulary())
    torch.manual_seed(0)
    model = build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer)
    return str(save_pretrained_safetensors(model, tokenizer, tmp_path_factory.mktemp("sft") / "base"))


class FewerWords(torch.nn.Module):
    """A reward that varies even over 6-token answers (the world's verbosity judge saturates)."""

    def score(self, prompts, responses):
        return torch.tensor([-float(len(r.split())) + 0.1 * r.count("the") for r in responses])


def _spec(sft_dir, **kw):
    from raypref.data.world import World

    prompts = World(seed=0).prompts(8)
    return PPOSpec(sft_dir, prompts, FewerWords, rollout_size=4, ppo_epochs=2, max_new_tokens=6, **kw)


def _ctx(spec, step=1):
    torch.manual_seed(0)
    models = {role: spec.build_model(role) for role in spec.roles()}
    return StepContext(step=step, max_steps=10, rank=0, world_size=1, micro_batch_size=2, grad_accum=1, seed=0,
                       models=models)


def test_pack_marks_only_response_tokens(sft_dir):
    spec = _spec(sft_dir)
    tok = spec.tokenizer()
    batch = pack(tok, ["hello there", "hi"], [[7, 8, 9], [10]], max_length=64)
    assert batch["mask"].sum(dim=1).tolist() == [3, 1]
    # the masked (predicted) tokens are exactly the responses
    ids = batch["input_ids"][:, 1:]
    assert ids[0][batch["mask"][0].bool()].tolist() == [7, 8, 9] and ids[1][batch["mask"][1].bool()].tolist() == [10]


def test_rollout_then_losses_for_actor_and_critic(sft_dir):
    spec = _spec(sft_dir)
    ctx = _ctx(spec)
    stream = spec.batches(ctx)
    batch = next(stream)
    assert spec.rollouts == 1 and batch["input_ids"].shape[0] == 2
    assert set(spec.buffer) >= {"old_logprobs", "old_values", "advantages", "returns", "mask"}
    mask = spec.buffer["mask"].bool()
    assert spec.buffer["advantages"][mask].mean().abs() < 1e-5  # whitened over the response tokens
    losses, metrics = spec.loss(batch, ctx)
    assert set(losses) == {"actor", "critic"}
    assert spec.buffer["returns"][mask].abs().sum() > 0  # a reward signal to learn from
    (losses["actor"] + losses["critic"]).backward()
    actor_grads = [p.grad for n, p in ctx.models["actor"].named_parameters() if "lora_B" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in actor_grads)
    assert ctx.models["critic"].head.weight.grad.abs().sum() > 0
    # first pass: the policy is the one that generated, so ratios are 1 and nothing is clipped
    assert metrics["policy/clipfrac"] == 0.0 and metrics["policy/approx_kl"] < 1e-10
    assert {"reward/score", "kl/per_response", "kl/coef"} <= set(metrics)
    # after ppo_epochs × rollout_size / micro_batch_size = 4 micro-batches, a new rollout comes
    for _ in range(3):
        next(stream)
    assert spec.rollouts == 1
    next(stream)
    assert spec.rollouts == 2


def test_resume_continues_inside_the_same_rollout(sft_dir):
    spec = _spec(sft_dir, kl_target=1.0)
    ctx = _ctx(spec)
    stream = spec.batches(ctx)
    for _ in range(2):
        next(stream)
    state = copy.deepcopy(spec.state_dict())
    expected = next(stream)
    resumed = _spec(sft_dir, kl_target=1.0)
    resumed.load_state_dict(state)
    got = next(resumed.batches(_ctx(resumed, step=3)))
    for key in ("input_ids", "old_logprobs", "advantages", "returns"):
        assert torch.equal(got[key], expected[key]), key
    assert resumed.kl_ctl.value == state["kl_ctl"]["value"] != 0.05  # the adaptive coefficient moved and came back


def test_reward_source_refuses_unknown_attributes():
    with pytest.raises(ValueError, match="attributes"):
        WeightedJudgeReward({"charm": 1.0})
    scores = WeightedJudgeReward({"verbosity": -1.0}).score(["p", "p"], ["short", " ".join(["word"] * 80)])
    assert scores[0] > scores[1]
