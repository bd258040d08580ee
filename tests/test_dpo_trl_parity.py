"""The platform's DPO step vs trl 1.16's DPOTrainer on one batch: same tokens, same loss, same gradients.

The platform's side is exactly what a Ray Train worker runs: ``DPOSpec.build_model`` (saved base +
a LoRA, ``add_lora``), ``DPOSpec.batches`` (``encode_example`` + ``collate_pairs``) and
``DPOSpec.loss`` (policy forward, reference = the same model with the adapter disabled, sigmoid
loss with the spec's beta). trl's side is ``DPOTrainer`` built on the same saved base with the same
``LoraConfig`` (``peft_config``: its reference is the base with the adapter disabled too), trl's own
tokenization, collator and ``compute_loss``. A fresh LoRA (B = 0) makes policy = reference and
every loss log 2, so both get the same random, non-zero adapter weights first.

No Ray, a few seconds.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

N_PAIRS, BATCH = 12, 4
RESPONSE_WORDS = 24
TOL = 1e-5


@pytest.fixture(scope="module")
def world_pairs():
    """P-Soups P1A pairs of the simulated world (what the DPO job trains on), responses cut to
    their first RESPONSE_WORDS words, and the world's vocabulary. Short responses keep the summed
    log-probabilities small: at ~90 tokens of an untrained model (sums ~ -550, float32 ulp 6e-5)
    the two implementations' float32 sums alone differ by ~5e-6 in the loss."""
    from dataclasses import replace

    from raypref.data.world import World

    world = World(seed=0, difficulty=0.0)
    pairs = world.pairs_for_preference("P1A", N_PAIRS, np.random.default_rng(0))
    cut = lambda text: " ".join(text.split()[:RESPONSE_WORDS])  # noqa: E731
    return world.vocabulary(), [replace(p, chosen=cut(p.chosen), rejected=cut(p.rejected)) for p in pairs]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, world_pairs):
    """A small untrained GPT-2 + the world's word-level tokenizer, saved as the DPO job's bases are."""
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer, save_pretrained_safetensors

    vocabulary, _ = world_pairs
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=256)
    tokenizer = build_tokenizer(cfg, vocabulary)
    torch.manual_seed(0)
    return str(save_pretrained_safetensors(build_policy(cfg, tokenizer), tokenizer,
                                           tmp_path_factory.mktemp("base") / "base"))


def _trl_trainer(base_dir, pairs, cfg, peft_config, out_dir):
    """trl's DPOTrainer on the saved base: its own tokenization of the platform's text format."""
    from datasets import Dataset
    from trl import DPOConfig as TrlDPOConfig, DPOTrainer

    from raypref.models.factory import format_prompt, load_pretrained

    base, tokenizer = load_pretrained(base_dir)
    # the platform's format: prompt + " <sep>", then " " + response; trl appends eos itself
    rows = [{"prompt": format_prompt(p.prompt), "chosen": " " + p.chosen, "rejected": " " + p.rejected}
            for p in pairs]
    # the platform's sft_weight is trl's "sft" loss term with that weight
    losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, cfg.sft_weight]) if cfg.sft_weight \
        else dict(loss_type=["sigmoid"])
    args = TrlDPOConfig(output_dir=str(out_dir), per_device_train_batch_size=BATCH, beta=cfg.beta,
                        **losses, max_length=cfg.max_length, learning_rate=cfg.lr,
                        report_to=[], use_cpu=True, save_strategy="no", seed=0)
    return DPOTrainer(model=base, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, peft_config=peft_config)


@pytest.mark.parametrize("sft_weight", [0.0, 0.5])
def test_platform_dpo_loss_matches_trl_dpo_trainer(base_dir, world_pairs, tmp_path, sft_weight):
    from raypref.algos.dpo import dpo_loss, sequence_logprobs
    from raypref.recipes.dpo import DPOConfig, DPOSpec, encode_pairs, epoch_chunks
    from raypref.train.spec import StepContext

    _, pairs = world_pairs
    # the DPO job's defaults: sigmoid, beta 0.5, LoRA r8 on c_attn / c_proj; plus the NLL term
    cfg = DPOConfig(sft_weight=sft_weight)
    assert cfg.loss_type == "sigmoid"
    spec = DPOSpec.from_config(cfg, base_dir, pairs, name="P1A", seed=0)

    # the platform: the model and the first micro-batch exactly as the runner's worker gets them
    torch.manual_seed(0)
    ours = spec.build_model()
    ctx = StepContext(step=1, max_steps=1, rank=0, world_size=1, micro_batch_size=BATCH, grad_accum=1,
                      seed=0, models={"policy": ours})
    batch = next(spec.batches(ctx))
    rows = next(epoch_chunks(len(pairs), BATCH, 0, spec.seed))  # which pairs that batch holds

    # trl: same base, same LoraConfig object (add_lora's), then the same adapter weights
    trainer = _trl_trainer(base_dir, pairs, cfg, copy.deepcopy(ours.peft_config["default"]), tmp_path)
    theirs = trainer.model
    trl_params = dict(theirs.named_parameters())
    our_params = dict(ours.named_parameters())
    assert trl_params.keys() == our_params.keys()
    trained = [n for n, p in our_params.items() if p.requires_grad]
    assert trained == [n for n, p in trl_params.items() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in our_params.items():
            if "lora_" in name:  # a non-zero adapter: log-ratios away from 0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            trl_params[name].copy_(p)

    # identical tokens: trl's tokenization of the text vs encode_example, and the collated batches
    encoded = encode_pairs(spec.tokenizer(), pairs, cfg.max_length)
    assert len(trainer.train_dataset) == len(pairs)  # trl dropped nothing as too long
    for i, (c_ids, c_prompt, r_ids, r_prompt) in enumerate(encoded):
        ex = trainer.train_dataset[i]
        assert ex["prompt_ids"] + ex["chosen_ids"] == c_ids and len(ex["prompt_ids"]) == c_prompt
        assert ex["prompt_ids"] + ex["rejected_ids"] == r_ids and c_prompt == r_prompt
        assert len(c_ids) < cfg.max_length and len(r_ids) < cfg.max_length  # neither truncates
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    assert torch.equal(trl_batch["input_ids"], batch["input_ids"])
    assert torch.equal(trl_batch["attention_mask"], batch["attention_mask"])
    assert torch.equal(trl_batch["completion_mask"], batch["labels_mask"])

    # the losses, and the gradients they give the adapter
    ours.train()
    theirs.train()
    our_loss, metrics = spec.loss(batch, ctx)
    our_loss.backward()
    trl_loss = trainer.compute_loss(theirs, trl_batch)
    trl_loss.backward()
    assert abs(our_loss.item() - trl_loss.item()) < TOL, (our_loss.item(), trl_loss.item())
    for name in trained:
        g_ours, g_trl = our_params[name].grad, trl_params[name].grad
        assert g_ours is not None and g_trl is not None, name
        # fp32 sums in another order (trl's fused LM head works in tiles): relative to the norm
        rel = ((g_ours - g_trl).norm() / g_trl.norm()).item()
        assert rel < 1e-4, (name, rel)
    # trl's logged implicit reward margin (beta * log-ratio difference) is the platform's too
    assert abs(trainer._metrics["train"]["rewards/margins"][-1] - metrics["reward_margin"]) < 1e-4
    if sft_weight:  # the NLL term is really in both: without it the loss differs by far more
        with torch.no_grad():
            plain = DPOSpec.from_config(DPOConfig(), base_dir, pairs).loss(batch, ctx)[0]
        assert plain.item() < our_loss.item() - 100 * TOL

    # the batch really tells the candidate mistakes apart: a wrong beta, or no reference term,
    # would be off by far more than the tolerance
    assert abs(trl_loss.item() - math.log(2)) > 1e-2
    with torch.no_grad():
        args = (batch["input_ids"], batch["attention_mask"], batch["labels_mask"])
        logps = sequence_logprobs(ours, *args)
        with ours.disable_adapter():
            ref = sequence_logprobs(ours, *args)
        n = BATCH
        no_ref, _, _ = dpo_loss(logps[:n], logps[n:], torch.zeros(n), torch.zeros(n), cfg.beta)
        trl_default_beta, _, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], 0.1)
    assert abs(no_ref.item() - trl_loss.item()) > 100 * TOL
    assert abs(trl_default_beta.item() - trl_loss.item()) > 100 * TOL
