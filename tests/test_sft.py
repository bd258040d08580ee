"""SFT: response-only loss, batching, config cache, and a short end-to-end warm start."""
from __future__ import annotations

import time

import pytest
import torch

from raypref.algos.sft import response_mask, sft_loss
from raypref.models.factory import ModelConfig, generate, generate_ids, load_pretrained
from raypref.train.runner import Optimization, Resources
from raypref.recipes.sft import SFTConfig, collate, read_metrics, sft_cache_key, sft_output_dir, train_sft


def test_response_mask_covers_response_not_prompt_or_padding():
    mask = response_mask(torch.tensor([2, 1]), torch.tensor([4, 3]), 5)
    assert mask.tolist() == [[False, False, True, True, False],
                             [False, True, True, False, False]]
    with pytest.raises(ValueError, match="prompt length"):
        response_mask(torch.tensor([4]), torch.tensor([3]), 5)


def test_sft_loss_ignores_prompt_and_padding_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    ids = torch.randint(0, 7, (2, 5))
    mask = response_mask(torch.tensor([2, 1]), torch.tensor([4, 3]), 5)
    loss = sft_loss(logits, ids, mask)
    # the same loss by hand: positions t-1 predict response tokens t
    expected = torch.stack([
        -torch.log_softmax(logits[b, t - 1], -1)[ids[b, t]]
        for b in range(2) for t in range(5) if mask[b, t] and t > 0
    ]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # logits at the last prompt position predict the first response token: they get gradient;
    # earlier prompt positions and the positions after the last response token do not
    assert logits.grad[0, 1].abs().sum() > 0
    assert logits.grad[0, 0].abs().sum() == 0
    assert logits.grad[0, 3:].abs().sum() == 0


def test_sft_loss_rejects_bad_shapes_and_empty_mask():
    with pytest.raises(ValueError, match="shapes"):
        sft_loss(torch.zeros(1, 4, 3), torch.zeros(1, 5, dtype=torch.long),
                 torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="no response token"):
        sft_loss(torch.zeros(1, 4, 3), torch.zeros(1, 4, dtype=torch.long),
                 torch.zeros(1, 4, dtype=torch.bool))


def test_collate_pads_right_and_masks_responses():
    batch = collate([([5, 6, 7, 3], 2), ([8, 3], 1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3], [8, 3, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["response_mask"].tolist() == [[False, False, True, True],
                                               [False, True, False, False]]


def test_cache_key_follows_training_settings_only(tmp_path):
    base = SFTConfig(output_dir=str(tmp_path / "a"))
    moved = SFTConfig(output_dir=str(tmp_path / "b"))
    moved.resources.checkpoint_every, moved.resources.max_failures = 7, 3
    assert sft_cache_key(base) == sft_cache_key(moved)
    for change in (lambda c: setattr(c.training, "lr", 1e-4), lambda c: setattr(c, "world_seed", 1),
                   lambda c: setattr(c.model, "n_layer", 3)):
        other = SFTConfig()
        change(other)
        assert sft_cache_key(other) != sft_cache_key(base)


def test_bad_sft_config_is_rejected_before_training(tmp_path):
    cfg = SFTConfig(output_dir=str(tmp_path), max_length=512)  # longer than n_positions
    with pytest.raises(ValueError, match="max_length"):
        train_sft(cfg)
    assert not sft_output_dir(cfg).exists()


@pytest.mark.slow
def test_short_sft_learns_world_format_and_caches(ray_local, tmp_path):
    from raypref.data.world import World

    cfg = SFTConfig(
        model=ModelConfig(n_layer=2, n_embd=64, n_head=2, n_positions=192),
        training=Optimization(steps=150, micro_batch_size=16, lr=3e-3, warmup_steps=10),
        resources=Resources(num_workers=1, zero_stage=0, checkpoint_every=75),
        corpus_size=1500, max_length=192, output_dir=str(tmp_path / "sft"),
    )
    path = train_sft(cfg)
    losses = [m["loss"] for m in read_metrics(path)]
    assert len(losses) == 150
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10

    model, tokenizer = load_pretrained(path)
    world = World(seed=0)
    prompts = world.prompts(4, split="test")
    vocabulary = set(world.vocabulary())
    for greedy in (True, False):
        ids = generate_ids(model, tokenizer, prompts, max_new_tokens=150, greedy=greedy, seed=1)
        texts = generate(model, tokenizer, prompts, max_new_tokens=150, greedy=greedy, seed=1)
        assert all(seq and seq[-1] == tokenizer.eos_token_id for seq in ids), ids
        for text in texts:
            words = text.split()
            assert len(words) >= 5 and set(words) <= vocabulary, text

    start = time.perf_counter()
    assert train_sft(cfg) == path
    assert time.perf_counter() - start < 1.0  # cache hit: no Ray run
