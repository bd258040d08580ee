"""ORPO, the registry entry added last: its loss equals trl's (trl.experimental.orpo) on the same
batch, and it runs wherever a preference-pair method runs (soups, the preference job, sweeps)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch


def _trl_loss(logits: torch.Tensor, batch: dict, beta: float) -> torch.Tensor:
    """trl 1.16's ORPOTrainer on a batch [chosen..., rejected...]: its concatenated_forward (NLL
    over the chosen sequences' attended tokens, per-token mean log-probs of the responses by its
    own get_batch_logps) and its odds_ratio_loss, then `policy_nll_loss - losses.mean()`."""
    from trl.experimental.orpo import ORPOTrainer

    n = batch["input_ids"].shape[0] // 2
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.where(batch["labels_mask"] == 1, ids, -100)  # trl's concatenated_labels
    nll_labels = torch.where(mask == 1, ids, -100)  # trl's labels for the NLL: prompt + response
    nll = torch.nn.CrossEntropyLoss()(logits[:n, :-1].reshape(-1, logits.shape[-1]), nll_labels[:n, 1:].reshape(-1))
    logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    fake = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=logits.device))
    losses, *_ = ORPOTrainer.odds_ratio_loss(fake, logps[:n], logps[n:])
    return nll - losses.mean()


def test_orpo_loss_alone_matches_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    from raypref.algos.orpo import orpo_loss

    torch.manual_seed(0)
    chosen, rejected = -torch.rand(6) * 3 - 0.01, -torch.rand(6) * 3 - 0.01  # mean log-probs, < 0
    chosen[0], rejected[0] = -0.2, -0.9  # both sides of log1mexp's branch at -log 2
    nll = torch.tensor(1.7)
    ours, log_odds = orpo_loss(chosen, rejected, nll, beta=0.25)
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device="cpu"))
    losses, _, _, _, trl_log_odds = ORPOTrainer.odds_ratio_loss(fake, chosen, rejected)
    assert torch.allclose(ours, nll - losses.mean(), atol=1e-6)
    assert torch.allclose(log_odds.mean(), trl_log_odds, atol=1e-6)


def test_orpo_spec_loss_matches_trl_on_the_same_batch():
    from raypref.data.world import World
    from raypref.models.factory import ModelConfig, add_lora, build_policy, build_tokenizer, LoraSettings
    from raypref.recipes import recipe
    from raypref.recipes.dpo import DPOConfig
    from raypref.recipes.orpo import ORPOSpec
    from raypref.train.spec import StepContext

    world = World(seed=0)
    pairs = world.pairs_for_preference("P2A", 8, np.random.default_rng(0))
    tokenizer = build_tokenizer(ModelConfig(), world.vocabulary())
    torch.manual_seed(0)
    model = add_lora(build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tokenizer), LoraSettings(r=4, alpha=8))
    section = DPOConfig(beta=0.1, max_length=64)
    spec = recipe("orpo").spec(section, "unused", pairs=pairs, name="P2A", seed=0)  # the registry's builder
    assert isinstance(spec, ORPOSpec)
    spec._tokenizer = tokenizer  # no saved base: the tokenizer is handed over directly
    ctx = StepContext(step=1, max_steps=1, rank=0, world_size=1, micro_batch_size=4, grad_accum=1, seed=0,
                      models={"policy": model})
    batch = next(spec.batches(ctx))
    ours, metrics = spec.loss(batch, ctx)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    theirs = _trl_loss(logits, batch, beta=0.1)
    assert abs(ours.item() - theirs.item()) < 1e-5
    ours.backward()  # a real training loss: gradients reach the adapter
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora" in n)
    assert metrics["nll"] > 0


def test_orpo_is_a_soups_and_preference_job_method_by_name():
    from raypref.config import parse_args
    from raypref.experiments.preference import DPOJobConfig
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.training import training_key

    soups = parse_args(SoupsConfig, ["--algo", "orpo"])
    assert soups.policy_training is soups.training and training_key(soups) != training_key(SoupsConfig())
    parse_args(DPOJobConfig, ["--method", "orpo"])
    with pytest.raises(ValueError, match="preference-pair method"):
        parse_args(DPOJobConfig, ["--method", "ppo"])
