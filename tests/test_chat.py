"""The one text format: chat templates for instruct tokenizers, the tiny format otherwise."""
from __future__ import annotations

import pytest

from raypref.models.chat import encode_chat, has_chat_template, prompt_text
from raypref.models.factory import EOS, SEP, ModelConfig, build_tokenizer


# smollm2_tokenizer: tests/conftest.py (SmolLM2's tokenizer from the packaged GGUF)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return build_tokenizer(ModelConfig(), ["name", "a", "planet", ".", "mars"])


def test_templated_pair_has_pinned_ids(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = encode_chat(tok, "Name a planet.", "Mars.", system="Answer briefly.")
    # <|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nName a planet.<|im_end|>\n
    # <|im_start|>assistant\n | Mars.<|im_end|>\n
    assert enc.ids == [1, 9690, 198, 21350, 13099, 30, 2, 198, 1, 4093, 198, 5820, 253, 3925, 30, 2, 198,
                       1, 520, 9531, 198, 38861, 30, 2, 198]
    assert enc.n_prompt == 21  # the response starts right after the generation prompt
    assert enc.response_mask == [0] * 21 + [1] * 4
    assert tok.decode(enc.ids[enc.n_prompt:]) == "Mars.<|im_end|>\n"
    assert enc.ids[enc.n_prompt + 2] == tok.eos_token_id  # the template's end of turn is the eos
    # generation starts from exactly the trained prompt ids
    shown = prompt_text(tok, "Name a planet.", "Answer briefly.")
    assert tok(shown, add_special_tokens=False)["input_ids"] == enc.ids[:enc.n_prompt]


def test_templated_prompt_without_system_uses_the_templates_default(smollm2_tokenizer):
    enc = encode_chat(smollm2_tokenizer, "Name a planet.", "Mars.")
    shown = smollm2_tokenizer.decode(enc.ids[:enc.n_prompt])
    assert shown.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert shown.endswith("<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_keeps_the_prompts_end_and_cuts_the_response(smollm2_tokenizer):
    full = encode_chat(smollm2_tokenizer, "Name a planet.", "Mars is red and far away.", system="Be brief.")
    cut = encode_chat(smollm2_tokenizer, "Name a planet.", "Mars is red and far away.", system="Be brief.",
                      max_length=16)
    assert len(full.ids) - full.n_prompt > 8  # the response is cut too
    assert len(cut.ids) == 16 and cut.n_prompt == 8
    assert cut.ids[:8] == full.ids[full.n_prompt - 8:full.n_prompt]
    assert cut.ids[8:] == full.ids[full.n_prompt:full.n_prompt + 8]


def test_tiny_tokenizer_keeps_its_own_format(tiny_tokenizer):
    tok = tiny_tokenizer
    assert not has_chat_template(tok)
    enc = encode_chat(tok, "name a planet .", "mars .")
    assert tok.convert_ids_to_tokens(enc.ids) == ["name", "a", "planet", ".", SEP, "mars", ".", EOS]
    assert enc.n_prompt == 5


def test_system_prompt_without_a_chat_template_is_refused(tiny_tokenizer):
    with pytest.raises(ValueError, match="has no chat template"):
        encode_chat(tiny_tokenizer, "name a planet .", "mars .", system="be brief")
    with pytest.raises(ValueError, match="has no chat template"):
        prompt_text(tiny_tokenizer, "name a planet .", system="be brief")


def _random_llama(tokenizer):
    """A 1-layer Llama with SmolLM2's vocabulary: the format's consumers, without the weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        tie_word_embeddings=True)).eval()


def test_judge_and_generation_use_the_chat_template(smollm2_tokenizer):
    from raypref.eval.llm_judge import ScoringJudge
    from raypref.models.factory import generate_ids

    tok = smollm2_tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = _random_llama(tok)
    judge = ScoringJudge(model, tok)
    question, answers = judge._encode("be brief", "Name a planet.", "Mars.")
    assert tok.decode(question).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "user\nyou rate one answer" in tok.decode(question)
    assert [tok.decode(a) for a in answers] == ["1", "2", "3", "4", "5"]
    assert all(1.0 <= r <= 5.0 for r in judge.rate([("be brief", "Name a planet.", "Mars.")]))
    # generation starts from the templated prompt with the system text in the system message
    instructed = generate_ids(model, tok, ["Name a planet."], max_new_tokens=3, system="Answer briefly.")
    expected = model.generate(**tok(prompt_text(tok, "Name a planet.", "Answer briefly."), return_tensors="pt",
                                    add_special_tokens=False), max_new_tokens=3, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    assert instructed[0] == expected[0, -3:].tolist()[:len(instructed[0])]


# own data with earlier turns (TRL conversational rows): the turns stay turns under a template
TWO_TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A colour?"},
             {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]


def _conversation_record(tmp_path):
    import json

    from raypref.data.loaders import load_records

    row = {"chosen": TWO_TURNS + [{"role": "assistant", "content": "Blue."}],
           "rejected": TWO_TURNS + [{"role": "assistant", "content": "Red again."}]}
    (tmp_path / "chat.jsonl").write_text(json.dumps(row) + "\n")
    rec, = load_records(str(tmp_path / "chat.jsonl"), schema="trl")
    return rec


def test_a_conversations_turns_are_template_turns_and_only_the_response_is_trained(smollm2_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    rec = _conversation_record(tmp_path)
    assert rec.context == TWO_TURNS and rec.prompt_or_context == TWO_TURNS
    enc = encode_chat(tok, rec.prompt_or_context, rec.chosen)
    before = tok.apply_chat_template(TWO_TURNS, add_generation_prompt=True)["input_ids"]
    response = tok(rec.chosen + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert enc.ids == before + response and enc.n_prompt == len(before)
    assert enc.response_mask == [0] * len(before) + [1] * len(response)
    # <|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nA colour?<|im_end|>\n<|im_start|>assistant\n
    # Red.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n | Blue.<|im_end|>\n
    assert enc.ids == [1, 9690, 198, 6077, 5453, 30, 2, 198, 1, 4093, 198, 49, 7302, 47, 2, 198, 1, 520, 9531, 198,
                       12869, 30, 2, 198, 1, 4093, 198, 4809, 47, 2, 198, 1, 520, 9531, 198, 23390, 30, 2, 198]
    assert "User:" not in tok.decode(enc.ids)  # no transcript inside a turn
    # the whole conversation as the template writes it: the response split off at the right place
    assert enc.ids == tok.apply_chat_template(TWO_TURNS + [{"role": "assistant", "content": "Blue."}])["input_ids"]
    # generation starts from exactly the trained prompt
    assert tok(prompt_text(tok, rec.prompt_or_context), add_special_tokens=False)["input_ids"] == before
    # the conversation has its own system message: a second system text is refused, not merged
    with pytest.raises(ValueError, match="has its own system message"):
        encode_chat(tok, rec.prompt_or_context, rec.chosen, system="Answer at length.")
    # a system text still goes first when the conversation has none
    shown = prompt_text(tok, TWO_TURNS[1:], system="Answer at length.")
    assert shown.startswith("<|im_start|>system\nAnswer at length.<|im_end|>\n<|im_start|>user\nA colour?")


def test_a_conversation_keeps_its_transcript_in_the_tiny_format(tmp_path):
    rec = _conversation_record(tmp_path)
    assert rec.prompt == "System: Be brief.\nUser: A colour?\nAssistant: Red.\nUser: Another?\nAssistant:"
    tiny = build_tokenizer(ModelConfig(), rec.prompt.split() + rec.chosen.split())
    enc = encode_chat(tiny, rec.prompt_or_context, rec.chosen)
    assert enc == encode_chat(tiny, rec.prompt, rec.chosen)  # as before the turns were kept
    assert tiny.convert_ids_to_tokens(enc.ids)[enc.n_prompt - 2:] == ["Assistant:", SEP, "Blue.", EOS]
