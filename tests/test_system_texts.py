"""System texts in the system message: P-MORL's combination instruction and P-DPO's user text go
in the chat template's system message for an instruct tokenizer; the tiny model keeps its format."""
from __future__ import annotations

import pytest

from raypref.data.labelling import candidate_pairs, combination_instruction, combination_labelled_pairs
from raypref.data.records import PreferenceRecord
from raypref.data.world import World
from raypref.models.factory import ModelConfig, build_tokenizer
from raypref.recipes.dpo import DPOConfig, DPOSpec, encode_pairs
from raypref.recipes.pdpo import PDPOSpec, collate_user_pairs

COMBO = ["P1A", "P2A", "P3B"]


@pytest.fixture(scope="module")
def world():
    return World(0, 0.0)


def test_pmorl_pair_reads_its_combination_as_the_system_message(smollm2_tokenizer_dir, world):
    pairs = candidate_pairs(world, 1, 9)
    rec = combination_labelled_pairs(world, pairs, [COMBO], 9, instruction_in_prompt=False)[0]
    assert rec.prompt == pairs[0].prompt and rec.user_text == "P1A+P2A+P3B"  # bare prompt, combination named
    spec = DPOSpec.from_config(DPOConfig(max_length=512), smollm2_tokenizer_dir, [rec], name="P-MORL", system="combination")
    tok = spec.tokenizer()
    (c_ids, c_prompt, r_ids, r_prompt), = encode_pairs(tok, [rec], 512, spec.system)
    assert tok.decode(c_ids[:c_prompt]) == (
        "<|im_start|>system\n"
        "Generate/Choose a response that can be easily understood by an elementary school student. "
        "Generate/Choose a response that is concise and to the point, without being verbose. "
        "Generate/Choose a response (that answers) in an unfriendly manner.<|im_end|>\n"
        "<|im_start|>user\ntell me about computers .<|im_end|>\n<|im_start|>assistant\n")
    assert c_ids[:c_prompt] == r_ids[:r_prompt]  # one prompt, two responses
    assert tok.decode(c_ids[c_prompt:]) == rec.chosen + "<|im_end|>\n"
    # evaluation shows the same system text (soups evaluate.instruction_text for a HF base)
    from raypref.experiments.soups.evaluate import instruction_text

    assert instruction_text(world, COMBO, hf_base=True) == combination_instruction(rec.user_text)


def test_pmorl_pairs_of_the_tiny_model_keep_the_instruction_after_the_prompt(world):
    pairs = candidate_pairs(world, 1, 9)
    rec = combination_labelled_pairs(world, pairs, [COMBO], 9)[0]
    assert rec.prompt == f"{pairs[0].prompt} {world.preference_instruction(COMBO)}"
    tiny = build_tokenizer(ModelConfig(), world.vocabulary())
    with pytest.raises(ValueError, match="no chat template"):
        encode_pairs(tiny, [rec], 128, "combination")  # a system text it cannot place is an error


def test_pdpo_user_text_is_the_system_message_with_a_template(smollm2_tokenizer_dir):
    recs = [PreferenceRecord("Name a planet.", "Mars, the red planet.", "Mars.", 1, "I like detail."),
            PreferenceRecord("Name a planet.", "Venus.", "Venus, the hot one.", 2, None)]
    spec = PDPOSpec(smollm2_tokenizer_dir, recs, use_user_text=True, max_length=64)
    tok = spec.tokenizer()
    assert spec.system_text() == "user_text" and not spec.user_text_tokens()
    encoded = encode_pairs(tok, recs, 64, spec.system_text())
    # <|im_start|>system\nI like detail.<|im_end|>\n<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n
    assert encoded[0][0][:encoded[0][1]] == [
        1, 9690, 198, 57, 702, 2202, 30, 2, 198, 1, 4093, 198, 5820, 253, 3925, 30, 2, 198, 1, 520, 9531, 198]
    assert tok.decode(encoded[0][0][:encoded[0][1]]).startswith("<|im_start|>system\nI like detail.<|im_end|>\n")
    # no user text: the template's own default system message
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(encoded[1][0][:encoded[1][1]])
    batch = collate_user_pairs(tok, recs, encoded, spec.user_text_tokens())
    assert "text_ids" not in batch  # the text is not also in the soft prompt


def test_pdpo_user_text_of_the_tiny_model_stays_in_the_soft_prompt(tmp_path):
    words = ["name", "a", "planet", ".", "mars", "venus", "detail", "please"]
    tiny = build_tokenizer(ModelConfig(), words)
    tiny.save_pretrained(tmp_path)
    recs = [PreferenceRecord("name a planet .", "mars .", "venus .", 1, "detail please")]
    spec = PDPOSpec(str(tmp_path), recs, use_user_text=True)
    assert spec.system_text() == "" and spec.user_text_tokens()
    batch = collate_user_pairs(tiny, recs, encode_pairs(tiny, recs, 32, spec.system_text()), spec.user_text_tokens())
    assert batch["text_mask"].sum(dim=1).tolist() == [2, 2]  # "detail please", chosen and rejected rows


def test_a_streamed_spec_refuses_a_system_text_rule(smollm2_tokenizer_dir):
    with pytest.raises(ValueError, match="streamed pairs"):
        DPOSpec.from_config(DPOConfig(), smollm2_tokenizer_dir, dataset="train", n_pairs=4, system="user_text")
    with pytest.raises(ValueError, match="system="):
        DPOSpec.from_config(DPOConfig(), smollm2_tokenizer_dir, [PreferenceRecord("a", "b", "c")], system="preference")
