"""LoRA targets chosen by architecture; a target matching nothing is refused up front."""
from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from raypref.models.factory import LoraSettings, ModelConfig, add_lora, build_policy, build_tokenizer, \
    check_lora_targets, lora_targets


@pytest.fixture(scope="module")
def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


@pytest.fixture(scope="module")
def gpt2():
    cfg = ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32)
    return build_policy(cfg, build_tokenizer(cfg, ["a", "b"]))


def _adapted(peft_model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}


def test_defaults_follow_the_architecture(llama, gpt2):
    assert lora_targets(gpt2, LoraSettings()) == ["c_attn", "c_proj"]
    assert lora_targets(gpt2, LoraSettings(mlp=True)) == ["c_attn", "c_proj", "c_fc"]
    assert lora_targets(llama, LoraSettings()) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert lora_targets(llama, LoraSettings(mlp=True))[4:] == ["gate_proj", "up_proj", "down_proj"]
    import copy
    wrapped = add_lora(copy.deepcopy(llama), LoraSettings(r=2, alpha=4, mlp=True))
    assert _adapted(wrapped) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_target_matching_nothing_names_the_models_modules(llama):
    with pytest.raises(ValueError, match=r"\['c_attn'\] match no .* it has \['down_proj', 'gate_proj', "
                                         r"'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"):
        lora_targets(llama, LoraSettings(target_modules=["q_proj", "c_attn"]))


def test_check_before_ray_reads_only_the_config(tmp_path):
    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)  # no weights
    assert check_lora_targets(str(tmp_path), LoraSettings()) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert check_lora_targets("tiny", LoraSettings()) == ["c_attn", "c_proj"]
    with pytest.raises(ValueError, match=r"^training.lora: lora.target_modules \['c_attn'\]"):
        check_lora_targets(str(tmp_path), LoraSettings(target_modules=["c_attn"]), "training.lora")


def test_dpo_job_refuses_bad_targets_before_ray_starts(tmp_path, monkeypatch):
    import ray

    from raypref.experiments.preference import DPOJobConfig, train_dpo

    LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    cfg = DPOJobConfig(train_data=str(tmp_path), base_policy=str(tmp_path / "base"), output_dir=str(tmp_path / "out"))
    cfg.training.lora = LoraSettings(target_modules=["c_attn"])
    with pytest.raises(ValueError, match="training.lora: .* it has .*'q_proj'"):
        train_dpo(cfg)
