"""Memory and precision settings: dtype names, gradient checkpointing, fp16 loss scaling."""
from __future__ import annotations

import types

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raypref.models.factory import LoraSettings, ModelConfig, add_lora, build_policy, build_tokenizer, \
    enable_gradient_checkpointing, resolve_dtype
from raypref.train.runner import Optimization, Resources, RunnerConfig, _build_roles, deepspeed_config, runner_config
from raypref.train.spec import LoopSpec, Role


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_dtype_names():
    assert resolve_dtype("bfloat16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32  # CPU: full precision
    with pytest.raises(ValueError, match="dtype='fp8'"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="ModelConfig.dtype"):
        ModelConfig(dtype="half").validate()


def test_gradient_checkpointing_with_lora_gives_the_same_gradients():
    """Recomputed activations, same numbers: only the adapters train, so the checkpointing must
    not need gradients on its inputs (the non-reentrant variant)."""
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = add_lora(_llama(), LoraSettings(r=2, alpha=4))
        if checkpointing:
            enable_gradient_checkpointing(model)
            assert model.is_gradient_checkpointing
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


def test_model_config_turns_checkpointing_on():
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32, gradient_checkpointing=True)
    assert build_policy(cfg, build_tokenizer(cfg, ["a"])).is_gradient_checkpointing


def test_fp16_is_dynamic_loss_scaling_and_excludes_bf16():
    cfg = runner_config(Optimization(), Resources(use_gpu=True, fp16=True, gradient_checkpointing=True),
                        name="r", storage_path="runs")
    assert cfg.fp16 and cfg.gradient_checkpointing
    ds = deepspeed_config(cfg)
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert ds["bf16"] == {"enabled": False}
    assert deepspeed_config(RunnerConfig())["fp16"]["enabled"] is False
    with pytest.raises(ValueError, match="RunnerConfig.fp16=True: cannot be on with bf16"):
        RunnerConfig(use_gpu=True, fp16=True, bf16=True).validate()
    with pytest.raises(ValueError, match="RunnerConfig.fp16=True: needs use_gpu"):
        RunnerConfig(fp16=True).validate()


class _TwoRoles(LoopSpec):
    def roles(self):
        return {"policy": Role(), "reference": Role(trainable=False)}

    def build_model(self, role="policy"):
        model = _llama()
        return add_lora(model, LoraSettings(r=2, alpha=4)) if role == "policy" else model


def test_runner_checkpoints_trainable_roles_and_casts_frozen_ones():
    def initialize(model, model_parameters, config):  # the engine's model, as DeepSpeed would hand it back
        return types.SimpleNamespace(module=model, module_state_dict=model.state_dict), None, None, None

    fake_deepspeed = types.SimpleNamespace(initialize=initialize)
    cfg = RunnerConfig(bf16=True, gradient_checkpointing=True)
    engines, models = _build_roles(_TwoRoles(), cfg, fake_deepspeed)
    assert models["policy"].is_gradient_checkpointing
    assert next(models["reference"].parameters()).dtype is torch.bfloat16  # the reference in the run's precision
    _, plain = _build_roles(_TwoRoles(), RunnerConfig(), fake_deepspeed)
    assert not plain["policy"].is_gradient_checkpointing
    assert next(plain["reference"].parameters()).dtype is torch.float32
