"""The reward recipe's spec, driven in-process (the runner path is in test_reward_job.py)."""
import pytest
import torch

from raypref.algos.gradients import flat_grad, pcgrad_direction
from raypref.models.reward import EncoderConfig, VAEConfig
from raypref.recipes.reward import RewardConfig, RewardSpec, RewardTraining
from raypref.recipes.reward_data import RewardDataConfig
from raypref.train.spec import StepContext

TINY = EncoderConfig("tiny", max_length=160, tiny_hidden=16, tiny_layers=1, tiny_heads=2)
SMALL_DATA = RewardDataConfig(difficulty=0.0, train_pairs_per_user=30, test_pairs_per_user=6,
                              demo_pool=12, n_demos=4)


def _cfg(**kw):
    base = dict(encoder=TINY, vae=VAEConfig(16, 16, 8, 16, 2), data=SMALL_DATA,
                freeze_query_encoder=True, eval_pairs_per_user=6,
                training=RewardTraining(steps=2, micro_batch_size=8))
    return RewardConfig(**{**base, **kw})


def _ctx(spec, model, steps=2):
    return StepContext(step=1, max_steps=steps, rank=0, world_size=1,
                       micro_batch_size=spec.cfg.training.micro_batch_size, grad_accum=1,
                       seed=0, models={"reward": model})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="RewardConfig.method='ppo'"):
        _cfg(method="ppo").validate()
    with pytest.raises(ValueError, match="contrastive"):
        _cfg(method="bt", contrastive=0.5).validate()
    with pytest.raises(ValueError, match="adaptive_ratio"):
        _cfg(adaptive_ratio=[1.0, 2.0]).validate()
    with pytest.raises(ValueError, match="n_demos"):
        _cfg(data=RewardDataConfig(n_demos=10, demo_pool=10)).validate()


@pytest.mark.parametrize("kw", [dict(method="bt"), dict(method="multi_objective"),
                                dict(method="user_model", gradient="pcgrad"),
                                dict(method="user_model", conditioning="soft_prompt",
                                     freeze_query_encoder=False),
                                dict(method="vae", sampling="adaptive", contrastive=0.5),
                                dict(method="vae", freeze_query_encoder=False),
                                dict(method="vae", vae=VAEConfig(16, 16, 8, 16, 2, decoder="bilinear"))])
def test_spec_steps_and_evaluates_per_user(kw):
    spec = RewardSpec(_cfg(**kw))
    torch.manual_seed(0)
    model = spec.build_model()
    ctx = _ctx(spec, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = spec.batches(ctx)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    for step in (1, 2):
        ctx.step = step
        loss, metrics = spec.loss(next(batches), ctx)
        assert torch.isfinite(loss) and 0.0 <= metrics["acc"] <= 1.0
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    model.eval()
    with torch.no_grad():
        result = spec.evaluate(ctx)
    assert set(result) == {"acc.user1", "acc.user2", "acc.mean", "acc.min"}
    assert result["acc.mean"] == pytest.approx((result["acc.user1"] + result["acc.user2"]) / 2)
    if spec.cfg.method == "vae":  # latent means kept for the t-SNE, and resumable
        latents = spec.state_dict()["latents"]
        assert set(latents) == {"step2/user1", "step2/user2"}
        assert latents["step2/user1"].shape == (20, 8)
        fresh = RewardSpec(spec.cfg)
        fresh.load_state_dict(spec.state_dict())
        assert torch.equal(fresh.state_dict()["latents"]["step2/user2"], latents["step2/user2"])


def test_batches_are_deterministic_and_resume_where_they_left_off():
    spec = RewardSpec(_cfg(method="vae", sampling="adaptive"))
    model = spec.build_model()
    ctx = _ctx(spec, model, steps=4)
    first = list(spec.batches(ctx))
    ctx.step = 3  # a resumed run starts at step 3: the same batches as steps 3, 4
    resumed = list(spec.batches(ctx))
    assert len(first) == 4 and len(resumed) == 2
    for a, b in zip(first[2:], resumed):
        assert torch.equal(a["user_ids"], b["user_ids"]) and torch.equal(a["demos"], b["demos"])


def test_pcgrad_surrogate_has_the_true_loss_and_the_projected_gradient():
    spec = RewardSpec(_cfg(method="vae", gradient="pcgrad", beta=0.0, contrastive=0.0))  # no shared term
    torch.manual_seed(0)
    model = spec.build_model()
    ctx = _ctx(spec, model)
    batch = next(spec.batches(ctx))
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()  # z = mu: the same forward pass for both computations below
    plain = RewardSpec(_cfg(method="vae", gradient="sum", beta=0.0))
    out = plain._forward(model, batch)
    per_pair = -torch.nn.functional.logsigmoid(out["r_chosen"] - out["r_rejected"])
    users = batch["user_ids"]
    stack = torch.stack([flat_grad(per_pair[users == u].mean(), params) for u in (1, 2)])
    torch.manual_seed(1)
    expected = pcgrad_direction(stack)

    torch.manual_seed(1)
    surrogate, metrics = spec.loss(batch, ctx)
    assert surrogate.item() == pytest.approx(per_pair.mean().item(), rel=1e-5)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(surrogate, params)])
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, stack.sum(0))  # it did change the plain sum here
    assert metrics["conflict"] in (0.0, 1.0)


def test_bilinear_vae_decoder_lets_z_scale_the_embedding():
    """decoder="bilinear": r(h, z) = <W z, h> + <u, h> + b, so r(h, z) - r(h, 0) = <W z, h> and
    the sign of a preference can flip with z; an unknown decoder is refused."""
    from raypref.models.reward import VAERewardModel

    spec = RewardSpec(_cfg(method="vae", vae=VAEConfig(16, 16, 8, 16, 2, decoder="bilinear")))
    model = spec.build_model()
    assert isinstance(model, VAERewardModel) and model.cfg.decoder == "bilinear"
    torch.manual_seed(0)
    h, z = torch.randn(5, 16), torch.randn(5, 8)
    with torch.no_grad():
        shift = model.reward_from_embedding(h, z) - model.reward_from_embedding(h, torch.zeros_like(z))
        assert torch.allclose(shift, ((z @ model.user_map.weight.T) * h).sum(-1), atol=1e-5)
        gap = lambda zz: (model.reward_from_embedding(h[:1], zz) - model.reward_from_embedding(h[1:2], zz)).item()  # noqa: E731
        zz = torch.randn(1, 8)
        assert (gap(zz) - gap(torch.zeros(1, 8))) == pytest.approx(-(gap(-zz) - gap(torch.zeros(1, 8))), abs=1e-5)
    with pytest.raises(ValueError, match="VAEConfig.decoder='mlp2'"):
        VAEConfig(decoder="mlp2").validate()


@pytest.mark.parametrize("method", ["vae", "user_model", "bt"])
def test_head_lr_applies_to_everything_but_the_pretrained_encoder(method):
    from raypref.recipes.reward import query_encoder

    spec = RewardSpec(_cfg(method=method, freeze_query_encoder=False, head_lr=1e-3))
    model = spec.build_model()
    encoder, fresh = spec.param_groups("reward", model)
    assert "lr" not in encoder and fresh["lr"] == 1e-3  # the encoder keeps training.lr
    assert {id(p) for p in encoder["params"]} == {id(p) for p in query_encoder(model).parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(encoder["params"]) + len(fresh["params"]) == len(trainable)
    assert fresh["params"]  # heads / posterior / user model
    default = RewardSpec(_cfg(method=method, freeze_query_encoder=False)).param_groups("reward", model)
    assert all("lr" not in g for g in default)
    with pytest.raises(ValueError, match="head_lr"):
        _cfg(head_lr=-1.0).validate()


def test_vae_init_logvar_sets_the_posterior_noise_at_the_start():
    """init_logvar = -6 starts z within ~exp(-3) of mu (the decoder sees the user, not noise);
    the default 0 starts sigma at 1; an out-of-range value is refused."""
    from raypref.models.reward import UserPosterior

    torch.manual_seed(0)
    chosen, rejected = torch.randn(32, 4, 16), torch.randn(32, 4, 16)
    for init, sigma in ((-6.0, 0.05), (0.0, 1.0)):
        torch.manual_seed(1)
        posterior = UserPosterior(16, VAEConfig(16, 16, 8, 16, 2, init_logvar=init))
        with torch.no_grad():
            _, logvar = posterior(chosen, rejected)
        assert logvar.mean().item() == pytest.approx(init, abs=0.5)
        assert torch.exp(0.5 * logvar).median().item() == pytest.approx(sigma, rel=0.5)
    with pytest.raises(ValueError, match="VAEConfig.init_logvar=nan"):
        VAEConfig(init_logvar=float("nan")).validate()


@pytest.mark.parametrize("kw", [dict(method="vae"), dict(method="bt", freeze_query_encoder=False),
                                dict(method="vae", vae=VAEConfig(16, 16, 8, 16, 2, decoder="bilinear"))])
def test_exported_model_scores_the_same_behind_the_reward_interface(tmp_path, kw):
    from raypref.rewards import UserRef
    from raypref.rewards.load import load_reward_function

    spec = RewardSpec(_cfg(**kw))
    torch.manual_seed(3)
    model = spec.build_model().eval()
    spec.export({"reward": model}, tmp_path)
    pairs = spec.pairs[2]
    demos = {2: pairs.train[:4]}
    reward = load_reward_function(tmp_path, user_demos=demos, fallback_to_generic=True)
    test = pairs.test[:3]
    prompts, responses = [r.prompt for r in test], [r.chosen for r in test]
    got = reward.score(prompts, responses, UserRef.by_id(2))
    tokens = model.encoder.tokenize(prompts, responses) if kw["method"] == "bt" else \
        model.query_encoder.tokenize(prompts, responses)
    with torch.no_grad():
        if kw["method"] == "bt":
            expected = model(**tokens)
        else:
            emb = spec.query_embeddings()[(2, "train")][:4]  # the same demos, cached embeddings
            _, mu, _ = model.user_latent(emb[None, :, 0], emb[None, :, 1], sample=False)
            expected = model.reward(tokens["input_ids"], tokens["attention_mask"], mu.expand(3, -1))
    assert torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="reward_config.json"):
        load_reward_function(tmp_path / "nowhere")
