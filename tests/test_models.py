"""Model factory: tiny tokenizer, policy, LoRA, encoder, text format, generation, saving."""
from __future__ import annotations

import random

import pytest
import torch

from raypref.models.factory import (EOS, SEP, LoraSettings, ModelConfig, add_lora,
                                    build_policy, build_tokenizer, encode_example,
                                    format_prompt, generate, generate_ids, load_encoder,
                                    load_pretrained, save_pretrained_safetensors,
                                    write_dir_atomically)

WORDS = ["how", "do", "stars", "work", "?", "stars", "shine", ".", "hello", ","]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(), WORDS)


@pytest.fixture(scope="module")
def tiny_cfg():
    return ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=64)


def test_tiny_tokenizer_is_word_level_and_deterministic(tokenizer):
    shuffled = WORDS[::-1] + ["work"]
    random.Random(1).shuffle(shuffled)
    again = build_tokenizer(ModelConfig(), shuffled)
    text = "hello , how do stars work ?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == again(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.split())  # one id per word
    assert tokenizer.decode(ids) == text
    assert len(tokenizer) == len(set(WORDS)) + 5  # + pad, unk, bos, eos, sep
    unknown = tokenizer("stars melt", add_special_tokens=False)["input_ids"]
    assert unknown[1] == tokenizer.unk_token_id


def test_tiny_tokenizer_rejects_bad_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        build_tokenizer(ModelConfig(), None)
    with pytest.raises(ValueError, match="single words"):
        build_tokenizer(ModelConfig(), ["two words"])
    with pytest.raises(ValueError, match="single words"):
        build_tokenizer(ModelConfig(), [EOS])


def test_encode_example_marks_prompt_and_ends_with_eos(tokenizer):
    ids, n_prompt = encode_example(tokenizer, "how do stars work ?", "stars shine .", 32)
    assert tokenizer.decode(ids[:n_prompt]) == format_prompt("how do stars work ?")
    assert tokenizer.decode(ids[n_prompt:]) == f"stars shine . {EOS}"
    assert ids[n_prompt - 1] == tokenizer.convert_tokens_to_ids(SEP)
    cut, n_cut = encode_example(tokenizer, "how do stars work ?", "stars shine . " * 10, 12)
    assert len(cut) == 12 and n_cut == 6 and cut[-1] != tokenizer.eos_token_id


def test_tiny_policy_matches_tokenizer_and_config(tokenizer, tiny_cfg):
    model = build_policy(tiny_cfg, tokenizer)
    assert model.config.vocab_size == len(tokenizer)
    assert (model.config.n_layer, model.config.n_embd) == (1, 32)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="dtype"):
        build_policy(ModelConfig(dtype="fp8"), tokenizer)  # float16 is a valid choice now (GPUs without bf16)


def test_add_lora_trains_only_adapters(tokenizer, tiny_cfg):
    model = add_lora(build_policy(tiny_cfg, tokenizer), LoraSettings(r=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("c_attn" in n for n in trainable) and any("c_proj" in n for n in trainable)


def test_encoder_loads_offline_and_embeds():
    model, tok = load_encoder()
    batch = tok(["a cat sat", "a cat sat", "quantum chromodynamics"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.mean(dim=1)
    assert hidden.shape == (3, 384)
    assert torch.allclose(hidden[0], hidden[1])
    assert not torch.allclose(hidden[0], hidden[2])


def test_batched_generation_equals_one_by_one(tokenizer, tiny_cfg):
    torch.manual_seed(0)
    model = build_policy(tiny_cfg, tokenizer)
    prompts = ["hello , how do stars work ?", "stars ?"]  # different lengths: left padding
    together = generate_ids(model, tokenizer, prompts, max_new_tokens=6)
    alone = [generate_ids(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert tokenizer.padding_side == "right"  # restored
    sampled = generate(model, tokenizer, prompts, max_new_tokens=6, greedy=False, seed=5)
    assert sampled == generate(model, tokenizer, prompts, max_new_tokens=6, greedy=False, seed=5)
    assert all(isinstance(s, str) for s in sampled)


def test_generation_stops_at_eos(tokenizer, tiny_cfg):
    torch.manual_seed(0)
    model = build_policy(tiny_cfg, tokenizer)
    with torch.no_grad():  # make eos the only likely token
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.ln_f.weight.zero_()
    ids = generate_ids(model, tokenizer, ["stars ?", "hello , how do stars work ?"], 8)
    assert ids == [[tokenizer.eos_token_id]] * 2
    assert generate(model, tokenizer, ["stars ?"], 8) == [""]


def test_save_and_load_round_trip(tmp_path, tokenizer, tiny_cfg):
    torch.manual_seed(0)
    model = build_policy(tiny_cfg, tokenizer)
    out = save_pretrained_safetensors(model, tokenizer, tmp_path / "policy")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    loaded, loaded_tok = load_pretrained(out)
    ids = torch.tensor([tokenizer("how do stars work ?")["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, model.eval()(ids).logits)
    assert loaded_tok("how do stars work ?")["input_ids"] == ids[0].tolist()


def test_atomic_write_keeps_old_folder_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    write_dir_atomically(target, lambda d: (d / "weights").write_text("v1"))

    def broken(d):
        (d / "weights").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomically(target, broken)
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folders left behind
    write_dir_atomically(target, lambda d: (d / "weights").write_text("v2"))
    assert (target / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_local_folder_loads_through_the_factory(tmp_path, tokenizer, tiny_cfg):
    torch.manual_seed(0)
    saved = save_pretrained_safetensors(build_policy(tiny_cfg, tokenizer), tokenizer,
                                        tmp_path / "policy")
    cfg = ModelConfig(name_or_path=str(saved))
    tok = build_tokenizer(cfg)  # no vocabulary needed: it comes from the folder
    model = build_policy(cfg, tok)
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert model.config.n_embd == tiny_cfg.n_embd  # the folder's shape, not the tiny default
    with pytest.raises(OSError):
        build_tokenizer(ModelConfig(name_or_path=str(tmp_path / "missing")))
