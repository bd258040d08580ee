"""The personalized RM over a P-RLHF user model (P-RLHF §F.2): loss, gradients, interface."""
import pytest
import torch

from raypref.algos.reward import bt_loss, personalized_bt_loss
from raypref.models.reward import EncoderConfig
from raypref.models.user_model import UserModelConfig
from raypref.recipes.reward import RewardConfig, RewardSpec, RewardTraining
from raypref.recipes.reward_data import RewardDataConfig
from raypref.rewards import UnknownUserError, UnsupportedUserError, UserRef
from raypref.train.spec import StepContext


def _cfg(**kw):
    base = dict(encoder=EncoderConfig("tiny", max_length=160, tiny_hidden=16, tiny_heads=2),
                data=RewardDataConfig(difficulty=0.0, train_pairs_per_user=30,
                                      test_pairs_per_user=6, demo_pool=12, n_demos=4),
                freeze_query_encoder=True, eval_pairs_per_user=6,
                training=RewardTraining(steps=2, micro_batch_size=8))
    return RewardConfig(**{**base, **kw})


def _ctx(spec, model):
    return StepContext(step=1, max_steps=2, rank=0, world_size=1, micro_batch_size=8,
                       grad_accum=1, seed=0, models={"reward": model})


def _spec(**kw):
    return RewardSpec(_cfg(method="user_model", **kw))


def _batch(spec, model, picks):
    return spec.collate(model, picks, spec._demo_sampler(0), epoch=0)


def _rewards(model, batch, index):
    users = torch.full((len(batch["user_ids"]),), index)
    if "chosen_emb" in batch:
        return (model.score_embedding(batch["chosen_emb"], users),
                model.score_embedding(batch["rejected_emb"], users))
    return model(**batch["chosen"], user_index=users), model(**batch["rejected"], user_index=users)


@pytest.mark.parametrize("kw", [dict(), dict(conditioning="soft_prompt", freeze_query_encoder=False,
                                          user_model=UserModelConfig(n_tokens=2))])
def test_loss_is_alpha_user_bt_plus_generic_bt(kw):
    torch.manual_seed(0)
    spec = _spec(alpha=1.0, **kw)
    model = spec.build_model()
    with torch.no_grad():  # users apart from the generic one from the start
        model.user_model.offsets.normal_(0, 0.5)
    ctx = _ctx(spec, model)
    batch = _batch(spec, model, [(2, i) for i in range(6)])  # one user only
    loss, _ = spec.loss(batch, ctx)
    user = _rewards(model, batch, 2)  # user 2 is the model's index 2 (ids 1, 2 seen)
    assert loss.item() == pytest.approx(bt_loss(*user).item(), rel=1e-6)
    generic = _rewards(model, batch, 0)
    assert not torch.allclose(user[0], generic[0])  # the user's embedding changes the reward

    spec = RewardSpec(RewardConfig(**{**spec.cfg.__dict__, "alpha": 0.3}))
    loss, metrics = spec.loss(batch, ctx)
    assert loss.item() == pytest.approx(personalized_bt_loss(*user, *generic, 0.3).item(), rel=1e-6)
    assert 0.0 <= metrics["generic_acc"] <= 1.0


@pytest.mark.parametrize("kind", ["individual", "cluster"])
def test_generic_term_sends_no_gradient_to_user_specific_parameters(kind):
    torch.manual_seed(0)
    spec = _spec(alpha=0.0, user_model=UserModelConfig(kind=kind, n_tokens=1, n_clusters=3))
    model = spec.build_model()
    batch = _batch(spec, model, [(1, 0), (2, 0), (1, 1), (2, 1)])
    loss, _ = spec.loss(batch, _ctx(spec, model))
    loss.backward()
    um = model.user_model
    if kind == "individual":
        assert um.offsets.grad is None or not um.offsets.grad.any()
        assert um.generic.grad.abs().sum() > 0
    else:
        assert not um.weights.grad[1:].any() and um.weights.grad[0].abs().sum() > 0
    # alpha = 1 on user 1's pairs: only user 1's own parameters move
    model.zero_grad()
    spec = _spec(alpha=1.0, user_model=UserModelConfig(kind=kind, n_tokens=1, n_clusters=3))
    loss, _ = spec.loss(_batch(spec, model, [(1, i) for i in range(4)]), _ctx(spec, model))
    loss.backward()
    if kind == "individual":
        assert um.offsets.grad[0].abs().sum() > 0 and not um.offsets.grad[1].any()
    else:
        assert um.weights.grad[1].abs().sum() > 0 and not um.weights.grad[[0, 2]].any()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="RewardConfig.alpha=1.5"):
        _cfg(method="user_model", alpha=1.5).validate()
    with pytest.raises(ValueError, match="n_tokens=10"):
        _cfg(method="user_model", user_model=UserModelConfig(n_tokens=10)).validate()
    with pytest.raises(ValueError, match="soft_prompt"):
        _cfg(method="user_model", conditioning="soft_prompt").validate()  # frozen encoder
    with pytest.raises(ValueError, match="conditioning='linear'"):
        _cfg(method="user_model", conditioning="linear").validate()


@pytest.mark.parametrize("conditioning", ["head", "soft_prompt"])
def test_exported_model_behind_the_reward_interface(tmp_path, conditioning):
    from raypref.rewards.load import load_reward_function

    n_tokens = 1 if conditioning == "head" else 3
    spec = _spec(conditioning=conditioning, freeze_query_encoder=False,
                 user_model=UserModelConfig(n_tokens=n_tokens))
    torch.manual_seed(3)
    model = spec.build_model().eval()
    with torch.no_grad():
        model.user_model.offsets.normal_(0, 0.5)
    spec.export({"reward": model}, tmp_path)
    test = spec.pairs[1].test[:3]
    prompts, responses = [r.prompt for r in test], [r.chosen for r in test]
    tokens = model.encoder.tokenize(prompts, responses)
    with torch.no_grad():
        expected = {i: model(**tokens, user_index=torch.full((3,), i)) for i in (0, 1, 2)}
    reward = load_reward_function(tmp_path)
    for uid in (0, 1, 2):
        got = reward.score(prompts, responses, UserRef.by_id(uid))
        assert torch.allclose(got, expected[uid], atol=1e-5)
    assert not torch.allclose(expected[1], expected[2])
    with pytest.raises(UnknownUserError, match="unknown user id 7; known: \\[1, 2\\]"):
        reward.score(prompts, responses, UserRef.by_id(7))
    with pytest.raises(ValueError, match="no attributes to weigh"):
        reward.score(prompts, responses, UserRef.by_weights([1.0, 0.0]))
    with pytest.raises(UnsupportedUserError, match="demonstrations"):
        reward.score(prompts, responses, UserRef.by_demonstrations(test))
    fallback = load_reward_function(tmp_path, fallback_to_generic=True)
    assert torch.allclose(fallback.score(prompts, responses, UserRef.by_id(7)), expected[0], atol=1e-5)
