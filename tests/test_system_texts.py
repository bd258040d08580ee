"""System texts in the system message: P-MORL's combination instruction and P-DPO's user text go
in the chat template's system message for an instruct tokenizer; the tiny model keeps its format."""
from __future__ import annotations

import numpy as np
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


# P-MORL under PPO (soups --algo ppo): the same bare prompt under two combinations, each
# combination's instruction its system message
PMORL_COMBOS = [COMBO, ["P1B", "P2B", "P3A"]]


def _ppo_pmorl_spec(base_dir, world, **settings):
    from raypref.recipes import recipe
    from raypref.recipes.ppo import PMORL, PPOConfig

    pairs = candidate_pairs(world, 1, 9) * 2
    recs = combination_labelled_pairs(world, pairs, PMORL_COMBOS, 9, instruction_in_prompt=False)
    return recipe("ppo").per_preference(PPOConfig(**settings), base_dir, PMORL, recs, 0, system="combination")


def test_ppo_pmorl_prompt_reads_its_combination_as_the_system_message(smollm2_tokenizer, world):
    from raypref.recipes.ppo import pack

    spec = _ppo_pmorl_spec("unused-base", world)
    instructions = [combination_instruction("+".join(c)) for c in PMORL_COMBOS]
    assert spec.prompts == ["tell me about computers ."] * 2 and spec.systems == instructions
    batch = pack(smollm2_tokenizer, spec.prompts[:1], [[42, 2]], 192, spec.systems[:1])
    ids = batch["input_ids"][0].tolist()
    # <|im_start|>system\n{COMBO's Table-4 sentences}<|im_end|>\n<|im_start|>user\ntell me about
    # computers .<|im_end|>\n<|im_start|>assistant\n, then the response ":<|im_end|>"
    assert ids == [
        1, 9690, 198, 46453, 31, 21197, 253, 2426, 338, 416, 325, 3152, 6182, 411, 354, 11289, 1125, 2222, 30,
        30657, 31, 21197, 253, 2426, 338, 314, 19484, 284, 288, 260, 1225, 28, 1355, 1036, 12699, 30, 30657, 31,
        21197, 253, 2426, 365, 5907, 5360, 25, 281, 354, 4377, 34535, 5710, 30, 2, 198,
        1, 4093, 198, 37075, 549, 563, 5530, 1673, 2, 198, 1, 520, 9531, 198, 42, 2]
    text = smollm2_tokenizer.decode(ids)
    system_turn, user_turn = text.split("<|im_start|>user\n")
    assert system_turn == f"<|im_start|>system\n{instructions[0]}<|im_end|>\n"
    assert user_turn.startswith("tell me about computers .<|im_end|>")
    assert "Generate/Choose" not in user_turn  # the instruction is not in the user's message
    assert batch["mask"][0].tolist() == [0] * (len(ids) - 3) + [1, 1]  # only the response is trained
    # each combination's own reward on the same bare prompt: the weights its system text names
    from raypref.recipes.ppo import combination_weights

    reward = spec.build_model("reward")
    response = world.sft_corpus(1, np.random.default_rng(0))[0][1]
    judged = world.judge(response, spec.prompts[0])
    expected = [sum(w * judged[a] for a, w in combination_weights(c).items()) for c in PMORL_COMBOS]
    assert reward.score(spec.prompts, [response] * 2, systems=spec.systems).tolist() == pytest.approx(expected)
    assert expected[0] != pytest.approx(expected[1])
    with pytest.raises(ValueError, match=r"no weights for prompt 'tell me about computers \.' \(per_prompt"):
        reward.score(spec.prompts[:1], [response])  # the bare prompt alone names no combination
    assert spec.policy_info()["system_texts"] == 2


def test_ppo_rollout_generates_and_trains_under_the_system_message(smollm2_tokenizer_dir, world, tmp_path,
                                                                   monkeypatch):
    """A rollout of the P-MORL spec on a tiny random Llama with SmolLM2's tokenizer: generation
    reads each prompt with its system text, every row starts with its combination's templated
    system turn, the mask starts after the generation prompt."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from raypref.models.chat import prompt_text
    from raypref.models.factory import save_pretrained_safetensors
    from raypref.recipes import ppo
    from raypref.train.spec import StepContext

    asked = []

    def generate_ids(model, tokenizer, prompts, *args, system=None, **kwargs):
        asked.extend(zip(prompts, system))
        return real_generate_ids(model, tokenizer, prompts, *args, system=system, **kwargs)

    real_generate_ids = ppo.generate_ids
    monkeypatch.setattr(ppo, "generate_ids", generate_ids)

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    base = str(save_pretrained_safetensors(lm, tok, tmp_path / "base"))
    spec = _ppo_pmorl_spec(base, world, rollout_size=4, micro_batch_size=2, max_new_tokens=3, max_length=160)
    ctx = StepContext(step=1, max_steps=2, rank=0, world_size=1, micro_batch_size=2, grad_accum=1, seed=0,
                      models={role: spec.build_model(role) for role in spec.roles()})
    buffer = spec.make_rollout(ctx)
    assert len(asked) == 4 and set(asked) == set(zip(spec.prompts, spec.systems))  # both combinations drawn
    for (prompt, system), row, mask in zip(asked, buffer["input_ids"].tolist(), buffer["mask"].tolist()):
        head = tok(prompt_text(tok, prompt, system), add_special_tokens=False)["input_ids"]
        assert row[:len(head)] == head and tok.decode(head).startswith(f"<|im_start|>system\n{system}<|im_end|>")
        assert mask.index(1) == len(head) - 1  # shifted frame: the first predicted response token


def test_soups_ppo_trains_pmorl_with_its_instruction_in_the_system_message(world, tmp_path):
    """soups --algo ppo on a chat-templated base: the P-MORL pairs are bare and the PPO spec the job
    builds shows each prompt with its combination's instruction; the preferences' specs have none."""
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.preferences import simulated_data
    from raypref.experiments.soups.training import run_name, training_jobs
    from raypref.recipes.ppo import PMORL, PPOConfig, PPOSpec

    cfg = SoupsConfig(algo="ppo", preferences=["P1A", "P1B"], combinations=[["P1A"], ["P1B"]], pairs_per_preference=16,
                      ppo=PPOConfig(micro_batch_size=4, rollout_size=4))
    data = simulated_data(cfg, world, cfg.seed, system_message=True)
    jobs = training_jobs(cfg, "unused-base", [data], str(tmp_path))
    spec = jobs[run_name(PMORL, 0)][0]
    assert isinstance(spec, PPOSpec) and set(spec.prompts) <= {r.prompt for r in data.pmorl}
    assert set(spec.systems) == {combination_instruction(c[0]) for c in cfg.combinations}
    assert all("Generate/Choose" not in p for p in spec.prompts)
    assert jobs[run_name("P1A", 0)][0].systems is None
