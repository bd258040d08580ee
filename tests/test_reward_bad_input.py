"""Bad input to the reward interface gets a clear error or the documented generic fallback,
never a silent score for somebody else (issue acceptance: too few demonstrations, an unknown
user id, an empty demonstration set, a weight vector of the wrong length)."""
import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raypref.data.sampling import DemonstrationSampler
from raypref.data.users import two_user_conflict
from raypref.data.world import World
from raypref.models.reward import (EncoderConfig, MultiObjectiveRewardModel,
                                   PersonalizedRewardModel, VAEConfig, VAERewardModel,
                                   build_text_encoder)
from raypref.models.user_model import UserModel, UserModelConfig
from raypref.rewards import UnknownUserError, UnsupportedUserError, UserRef
from raypref.rewards.models import MultiObjectiveReward, PersonalizedReward, VAEReward
from raypref.rewards.world import WorldJudgeReward

FEW = settings(max_examples=15, deadline=None)
N = 4
PROMPTS, RESPONSES = ["a question", "a question"], ["one answer", "another answer"]


@functools.cache
def _world_and_demos():
    world = World(seed=0)
    demos = {u.user_id: world.pairs_for_user(u, 6, np.random.default_rng(u.user_id))
             for u in two_user_conflict()}
    return world, demos


@functools.cache
def _rewards():
    """One of each model-backed reward function over a tiny encoder (built once)."""
    torch.manual_seed(0)
    enc = build_text_encoder(EncoderConfig("tiny", max_length=64, tiny_hidden=16, tiny_heads=2))
    world, demos = _world_and_demos()
    multi = MultiObjectiveReward(MultiObjectiveRewardModel(enc, ("a", "b", "c")), {1: [1, 0, 0]})
    vae = VAEReward(VAERewardModel(enc, enc.hidden_size, VAEConfig(16, 16, 8, 16, 2)).eval(), enc,
                    N, demos)
    users = UserModel(UserModelConfig(n_tokens=1), enc.hidden_size, [1, 2])
    users.offsets.data.normal_(0, 0.5)  # seen users apart from the generic one
    personal = PersonalizedReward(PersonalizedRewardModel(enc, users, "head").eval())
    return {"multi": multi, "vae": vae, "personal": personal,
            "world": WorldJudgeReward(world, two_user_conflict())}


@FEW
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), max_size=8),
       st.sampled_from(["multi", "world"]))
def test_a_weight_vector_of_the_wrong_length_is_refused(weights, name):
    reward = _rewards()[name]
    k = len(reward.attributes)
    if not weights:
        with pytest.raises(ValueError, match="non-empty"):
            UserRef.by_weights(weights)
        return
    user = UserRef.by_weights(weights)
    if len(weights) == k:
        assert torch.isfinite(reward.score(PROMPTS, RESPONSES, user)).all()
    else:
        with pytest.raises(ValueError, match=f"weight vector has {len(weights)} entries but the "
                                             f"attributes are {k}"):
            reward.score(PROMPTS, RESPONSES, user)


@FEW
@given(st.integers(min_value=3, max_value=10 ** 6), st.sampled_from(["multi", "vae", "personal", "world"]))
def test_an_unknown_user_id_is_refused_by_name(uid, name):
    with pytest.raises(UnknownUserError, match=f"unknown user id {uid}; known: \\[1"):
        _rewards()[name].score(PROMPTS, RESPONSES, UserRef.by_id(uid))


@FEW
@given(st.integers(min_value=3, max_value=10 ** 6))
def test_the_documented_fallback_scores_an_unseen_user_as_the_generic_one(uid):
    reward = _rewards()["personal"]
    fallback = PersonalizedReward(reward.model, fallback_to_generic=True)
    generic = reward.score(PROMPTS, RESPONSES, UserRef.generic())
    assert torch.equal(fallback.score(PROMPTS, RESPONSES, UserRef.by_id(uid)), generic)
    assert not torch.allclose(fallback.score(PROMPTS, RESPONSES, UserRef.by_id(1)), generic)


@FEW
@given(st.integers(min_value=1, max_value=N - 1))
def test_fewer_demonstrations_than_n_are_refused(n):
    _, demos = _world_and_demos()
    vae = _rewards()["vae"]
    with pytest.raises(ValueError, match=f"{n} demonstrations given, fewer than the model's N = {N}"):
        vae.score(PROMPTS, RESPONSES, UserRef.by_demonstrations(demos[1][:n]))
    with pytest.raises(ValueError, match=f"user 1 has {n} demonstrations, fewer than the model's N"):
        VAEReward(vae.model, vae.demo_encoder, N, {1: demos[1][:n]})
    # training side: a user whose pool cannot give N demonstrations besides the query
    with pytest.raises(ValueError, match=r"user\(s\) \{7: " + str(n) + r"\} have fewer than"):
        DemonstrationSampler({1: 50, 7: n}, n_demos=N, pool_size=20)


def test_an_empty_demonstration_set_or_bad_weights_never_make_a_user():
    for make in (lambda: UserRef.by_demonstrations([]), lambda: UserRef(demonstrations=()),
                 lambda: UserRef(weights=()), lambda: UserRef(weights=(math.nan, 1.0)),
                 lambda: UserRef(demonstrations=("not a record",)), lambda: UserRef(user_id=-2)):
        with pytest.raises(ValueError, match="empty|finite|PreferenceRecord|>= 0"):
            make()
    # a model that does not read demonstrations or weights says so
    _, demos = _world_and_demos()
    with pytest.raises(UnsupportedUserError, match="does not read demonstrations"):
        _rewards()["personal"].score(PROMPTS, RESPONSES, UserRef.by_demonstrations(demos[1]))
    with pytest.raises(UnsupportedUserError, match="no attributes to weigh"):
        _rewards()["vae"].score(PROMPTS, RESPONSES, UserRef.by_weights([1.0]))
