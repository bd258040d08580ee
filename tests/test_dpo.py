"""DPO loss: agreement with trl 1.16's DPOTrainer, and the pure-tensor properties."""

from __future__ import annotations

import math

import pytest
import torch

from raypref.algos.dpo import dpo_loss, implicit_reward_accuracy, sequence_logprobs

WORDS = "<pad> <eos> hello world good bad yes no the a cat dog tell me".split()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def _tiny_gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_matches_trl_dpo_trainer_compute_loss(tmp_path, loss_type):
    """Same batch through trl's DPOTrainer.compute_loss and through ours: same loss."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = [
        {"prompt": "hello the cat", "chosen": " good yes", "rejected": " bad no no"},
        {"prompt": "tell me a dog", "chosen": " yes yes good world", "rejected": " no"},
        {"prompt": "hello", "chosen": " the cat", "rejected": " the dog bad"},
    ]
    policy, ref = _tiny_gpt2(1), _tiny_gpt2(2)  # different weights so log-ratios are non-zero
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, report_to=[], beta=0.3,
                     use_cpu=True, loss_type=[loss_type])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=_tiny_tokenizer())
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

        ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        pol = sequence_logprobs(trainer.model, ids, attn, mask)
        refl = sequence_logprobs(trainer.ref_model, ids, attn, mask)
        n = len(rows)  # trl's batch is [chosen..., rejected...]
        lengths = mask.sum(dim=1).float()
        ours, _, _ = dpo_loss(pol[:n], pol[n:], refl[:n], refl[n:], beta=0.3, loss_type=loss_type,
                              chosen_lengths=lengths[:n], rejected_lengths=lengths[n:])
    assert ours.item() == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the batch really exercises non-zero log-ratios


def test_sequence_logprobs_counts_only_response_tokens():
    model = _tiny_gpt2(0)
    ids = torch.tensor([[2, 8, 10, 4, 6, 1]])
    attn = torch.ones_like(ids)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits, dim=-1)
        expected = sum(logp[0, t - 1, ids[0, t]] for t in (3, 4, 5))
        got = sequence_logprobs(model, ids, attn, mask)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_sigmoid_loss_formula_rewards_and_gradient_direction():
    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -3.0])
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = 0.5 * ((pc - rc) - (pr - rr))
    assert loss.item() == pytest.approx((-torch.nn.functional.logsigmoid(margins)).mean().item())
    assert torch.allclose(cr, 0.5 * (pc - rc).detach()) and torch.allclose(rj, 0.5 * (pr - rr))
    loss.backward()
    assert (pc.grad < 0).all()  # lowering the loss means raising the chosen log-prob


def test_ipo_without_lengths_uses_summed_logratios():
    z = torch.zeros(3)
    pc = torch.tensor([1.0, 2.0, 0.0])
    loss, _, _ = dpo_loss(pc, z, z, z, beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(((pc - 2.0) ** 2).mean().item())


def test_implicit_reward_accuracy_is_strict():
    assert implicit_reward_accuracy(torch.tensor([1.0, 2.0, 0.5, 0.0]), torch.tensor([0.0, 3.0, 0.5, -1.0])) == 0.5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": 0.0}, "beta"),
        ({"beta": 0.1, "loss_type": "hinge"}, "loss_type"),
        ({"beta": 0.1, "loss_type": "ipo", "chosen_lengths": torch.ones(2)}, "both"),
    ],
)
def test_dpo_loss_rejects_bad_arguments(kwargs, message):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=message):
        dpo_loss(z, z, z, z, **kwargs)


def test_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2), beta=0.1)


# ---------------------------------------------------------------- the per-preference DPO loop spec

TOPICS = "cat dog bird fish tree river cloud stone apple bread lamp chair".split()


def _pairs(topics):
    from raypref.data.records import PreferenceRecord

    return [PreferenceRecord(prompt=f"tell me about the {t}", chosen=f"the {t} is good and kind",
                             rejected=f"the {t} is bad and rude", source="P3A")
            for t in topics for _ in range(4)]


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from 2 threads, and on a busy 2-core machine OpenMP barriers stall."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory):
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer, save_pretrained_safetensors

    vocab = TOPICS + "tell me about the is good and kind bad rude".split()
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=2, n_positions=32)
    tokenizer = build_tokenizer(cfg, vocab)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sft") / "sft"
    save_pretrained_safetensors(build_policy(cfg, tokenizer), tokenizer, out)
    return str(out)


def test_dpo_spec_learns_a_trivial_preference(sft_dir, tmp_path, one_thread):
    """~30 in-process DPO steps: held-out implicit-reward accuracy goes from 0 to clearly above 0.5."""
    import pickle

    from raypref.recipes.dpo import evaluate_pairs
    from raypref.models.merge import LoraAdapter
    from raypref.recipes.dpo import DEFAULT_LR, DPOSpec
    from raypref.train.spec import StepContext

    spec = pickle.loads(pickle.dumps(DPOSpec(base_dir=sft_dir, pairs=_pairs(TOPICS[:8]), name="P3A")))
    held_out = _pairs(TOPICS[8:])
    torch.manual_seed(0)
    model = spec.build_model()
    tokenizer = spec.tokenizer()
    before = evaluate_pairs(model, tokenizer, held_out, spec.beta)
    # the spec's default lr (PLATFORM-NOTES probe), as the runner would use it
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DEFAULT_LR)
    losses = []
    ctx = StepContext(step=1, max_steps=30, rank=0, world_size=1, micro_batch_size=8, grad_accum=1,
                      seed=0, models={"policy": model})
    for _, batch in zip(range(30), spec.batches(ctx)):
        loss, _ = spec.loss(batch, ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = evaluate_pairs(model, tokenizer, held_out, spec.beta)
    assert before["reward_accuracy"] == 0.0  # fresh LoRA (B = 0): the policy equals its reference
    assert after["reward_accuracy"] >= 0.9 and after["reward_margin"] > 0.1, after
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and sum(losses[-5:]) / 5 < 0.55, losses

    spec.export({"policy": model}, tmp_path)  # what the runner calls: a safetensors adapter the merger can read
    adapter = LoraAdapter.from_dir(tmp_path)
    assert adapter.config.r == 8 and any(k.endswith("lora_B.weight") for k in adapter.tensors)


def test_dpo_spec_batches_resume_where_they_left_off(sft_dir):
    from raypref.recipes.dpo import DPOSpec
    from raypref.train.spec import StepContext

    spec = DPOSpec(base_dir=sft_dir, pairs=_pairs(TOPICS[:3]))
    ctx = dict(max_steps=10, rank=0, world_size=1, micro_batch_size=4, grad_accum=2, seed=0)
    stream = spec.batches(StepContext(step=1, **ctx))
    first = [next(stream) for _ in range(10)]  # 12 pairs / 4 = 3 per epoch: crosses epochs
    resumed = spec.batches(StepContext(step=4, **ctx))  # 3 steps × 2 micro-batches done
    for expected in first[6:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    batch = first[0]
    assert batch["input_ids"].shape[0] == 8  # 4 chosen then 4 rejected
    # response tokens only: the prompt ("tell me about the X <sep>") is masked out
    assert batch["labels_mask"][:, :6].sum() == 0 and (batch["labels_mask"].sum(1) == 7).all()


@pytest.mark.slow
def test_dpo_spec_trains_through_the_ray_runner(ray_local, sft_dir, tmp_path):
    """Ray Train + DeepSpeed (1 worker, ZeRO-2): the exported adapter prefers the held-out chosen."""
    from peft import PeftModel

    from raypref.models.factory import load_pretrained
    from safetensors.torch import load_file

    from raypref.recipes.dpo import DEFAULT_LR, POLICY_INFO_FILE, DPOSpec, evaluate_pairs
    from raypref.train.runner import RunnerConfig, run

    spec = DPOSpec(base_dir=sft_dir, pairs=_pairs(TOPICS[:8]), name="P3A")
    cfg = RunnerConfig(num_workers=1, max_steps=20, warmup_steps=2, checkpoint_every=10, lr=DEFAULT_LR,
                       micro_batch_size=8, storage_path=str(tmp_path / "runs"), name="p3a")
    result = run(spec, cfg)
    assert result.final_step == 20 and (result.export_path / POLICY_INFO_FILE).exists()
    # a LoRA run checkpoints its adapter, not the frozen base: no base weight in the checkpoint
    saved = load_file(str(result.checkpoint_path / "model.safetensors"))
    assert saved and all("lora_" in key for key in saved), sorted(saved)[:5]
    module_states = list((result.checkpoint_path / "ds-policy").glob("*model_states.pt"))
    states = torch.load(module_states[0], map_location="cpu", weights_only=False)["module"]
    assert states and all("lora_" in key for key in states), sorted(states)[:5]
    base, tokenizer = load_pretrained(sft_dir)
    policy = PeftModel.from_pretrained(base, str(result.export_path))
    held_out = evaluate_pairs(policy, tokenizer, _pairs(TOPICS[8:]), spec.beta)
    assert held_out["reward_accuracy"] >= 0.9 and held_out["reward_margin"] > 0.05, held_out
