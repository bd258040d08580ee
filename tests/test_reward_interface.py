"""The one reward interface: the world's judges and each reward model, and their errors."""
import numpy as np
import pytest
import torch

from raypref.data.users import two_user_conflict
from raypref.data.world import World
from raypref.models.reward import (EncoderConfig, MultiObjectiveRewardModel, ScalarRewardModel,
                                   VAEConfig, VAERewardModel, build_text_encoder)
from raypref.rewards import UnknownUserError, UnsupportedUserError, UserRef
from raypref.rewards.models import BTReward, MultiObjectiveReward, VAEReward
from raypref.rewards.world import WorldJudgeReward


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_text_encoder(EncoderConfig("tiny", max_length=64))


def _pairs(world, user, n, seed, split="test"):
    return world.pairs_for_user(user, n, np.random.default_rng(seed),
                                require_conflict_with=None, split=split)


def test_user_ref_needs_exactly_one_description():
    with pytest.raises(ValueError, match="exactly one"):
        UserRef(user_id=1, weights=(1.0,))
    with pytest.raises(ValueError, match="exactly one"):
        UserRef()
    with pytest.raises(ValueError, match="empty"):
        UserRef.by_demonstrations([])
    with pytest.raises(ValueError, match="int >= 0"):
        UserRef.by_id(-1)


def test_world_judge_by_id_weights_and_errors(world):
    helpful, honest = two_user_conflict()
    judge = WorldJudgeReward(world, [helpful, honest])
    pairs = _pairs(world, helpful, 40, 0)
    prompts = [p.prompt for p in pairs]
    chosen = judge.score(prompts, [p.chosen for p in pairs], UserRef.by_id(1))
    rejected = judge.score(prompts, [p.rejected for p in pairs], UserRef.by_id(1))
    assert (chosen > rejected).float().mean() > 0.9  # clean world: the judge reads helpfulness
    # the same user as a weight vector (attributes in DIRICHLET order: helpfulness last)
    by_vec = judge.score(prompts, [p.chosen for p in pairs], UserRef.by_weights([0, 0, 0, 1]))
    assert torch.equal(by_vec, chosen)
    with pytest.raises(ValueError, match="weight vector has 3 entries"):
        judge.score(prompts, [p.chosen for p in pairs], UserRef.by_weights([1, 0, 0]))
    with pytest.raises(UnknownUserError, match="unknown user id 9"):
        judge.score(prompts[:1], [pairs[0].chosen], UserRef.by_id(9))
    generic = judge.score(prompts[:1], [pairs[0].chosen], UserRef.generic())
    scores = world.judge(pairs[0].chosen, prompts[0])
    assert generic.item() == pytest.approx(np.mean([scores[a] for a in judge.attributes]))


def test_world_judge_reads_a_user_from_demonstrations(world):
    helpful, honest = two_user_conflict()
    judge = WorldJudgeReward(world, [helpful, honest])
    demos = world.pairs_for_user(honest, 8, np.random.default_rng(1), require_conflict_with=helpful)
    weights = judge.weights_for(UserRef.by_demonstrations(demos))
    assert judge.attributes[int(weights.argmax())] == "honesty"
    test = world.pairs_for_user(honest, 40, np.random.default_rng(2), require_conflict_with=helpful,
                                split="test")
    user = UserRef.by_demonstrations(demos)
    acc = (judge.score([t.prompt for t in test], [t.chosen for t in test], user)
           > judge.score([t.prompt for t in test], [t.rejected for t in test], user)).float().mean()
    assert acc > 0.8  # on pairs where the helpfulness user chose the other response


def test_bt_reward_serves_generic_user_only_unless_fallback(encoder):
    model = ScalarRewardModel(encoder)
    reward = BTReward(model)
    out = reward.score(["how to cook"], ["boil water"], UserRef.generic())
    assert out.shape == (1,)
    with pytest.raises(UnsupportedUserError, match="generic user"):
        reward.score(["how to cook"], ["boil water"], UserRef.by_id(3))
    fallback = BTReward(model, fallback_to_generic=True)
    assert torch.equal(fallback.score(["how to cook"], ["boil water"], UserRef.by_id(3)), out)
    with pytest.raises(UnsupportedUserError, match="no attributes"):
        reward.score(["x"], ["y"], UserRef.by_weights([1.0]))
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward.score(["x", "z"], ["y"], UserRef.generic())


def test_multi_objective_reward_scalarizes_and_checks_users(encoder):
    model = MultiObjectiveRewardModel(encoder, ["helpfulness", "honesty"])
    reward = MultiObjectiveReward(model, user_weights={1: [1.0, 0.0]})
    prompts, responses = ["a question", "another"], ["an answer", "a longer answer here"]
    attrs = reward.attribute_scores(prompts, responses)
    assert torch.allclose(reward.score(prompts, responses, UserRef.by_id(1)), attrs[:, 0])
    assert torch.allclose(reward.score(prompts, responses, UserRef.by_weights([0.2, 0.8])),
                          attrs @ torch.tensor([0.2, 0.8]))
    assert torch.allclose(reward.score(prompts, responses, UserRef.generic()), attrs.mean(1))
    with pytest.raises(ValueError, match="weight vector has 3 entries"):
        reward.score(prompts, responses, UserRef.by_weights([1, 0, 0]))
    with pytest.raises(UnknownUserError, match="unknown user id 2"):
        reward.score(prompts, responses, UserRef.by_id(2))
    with pytest.raises(ValueError, match="weight vector has 1 entries"):
        MultiObjectiveReward(model, user_weights={1: [1.0]})


def test_vae_reward_conditions_on_demonstrations_and_rejects_bad_users(world, encoder):
    helpful, honest = two_user_conflict()
    torch.manual_seed(0)
    model = VAERewardModel(encoder, demo_dim=encoder.hidden_size,
                           cfg=VAEConfig(pair_hidden=16, pair_out=16, latent=8,
                                         decoder_hidden=16, attention_heads=2))
    demos = {u.user_id: world.pairs_for_user(u, 4, np.random.default_rng(u.user_id))
             for u in (helpful, honest)}
    reward = VAEReward(model, encoder, n_demos=4, user_demos=demos)
    prompts, responses = ["a question"] * 2, ["one answer", "other answer"]
    by_id = reward.score(prompts, responses, UserRef.by_id(2))
    by_demos = reward.score(prompts, responses, UserRef.by_demonstrations(demos[2]))
    assert torch.allclose(by_id, by_demos)
    assert not torch.allclose(by_id, reward.score(prompts, responses, UserRef.by_id(1)))
    # generic user: the prior mean z = 0
    tokens = encoder.tokenize(prompts, responses)
    expected = model.eval().reward(tokens["input_ids"], tokens["attention_mask"], torch.zeros(2, 8))
    assert torch.allclose(reward.score(prompts, responses, UserRef.generic()), expected)
    with pytest.raises(ValueError, match="fewer than the model's N = 4"):
        reward.score(prompts, responses, UserRef.by_demonstrations(demos[1][:3]))
    with pytest.raises(UnknownUserError, match="unknown user id 5"):
        reward.score(prompts, responses, UserRef.by_id(5))
    with pytest.raises(UnsupportedUserError, match="not on a weight vector"):
        reward.latent_mean(UserRef.by_weights([1.0, 0.0]))
    with pytest.raises(ValueError, match="fewer than the model's N"):
        VAEReward(model, encoder, n_demos=8, user_demos=demos)
