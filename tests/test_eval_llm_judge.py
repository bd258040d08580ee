"""The scoring-mode LM judge: one response at a time, expected rating over "1".."5"."""
import json
from types import SimpleNamespace

import pytest
import torch

from raypref.data.world import World
from raypref.eval.llm_judge import (RATINGS, JudgeConfig, ScoringJudge, judge_vocabulary,
                                    preference_table)
from raypref.eval.prompts import load_prompts
from raypref.eval.winrate import win_rate

PREF = "generate a response that is concise and to the point , without being verbose ."
PROMPT = "tell me about bees ."


@pytest.fixture(scope="module")
def judge():
    torch.manual_seed(0)
    return ScoringJudge.from_config(JudgeConfig(batch_size=2), World(0).vocabulary())


class FixedLM(torch.nn.Module):
    """Next-token logits that favour one token id everywhere (a judge with a fixed opinion)."""

    def __init__(self, vocab_size, favourite, strength):
        super().__init__()
        self.config = SimpleNamespace(n_positions=256)
        self.logits = torch.zeros(vocab_size)
        self.logits[favourite] = strength
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1).clone())


def test_expected_rating_follows_the_judges_probabilities(judge):
    tok = judge.tokenizer
    ids = {r: tok.convert_tokens_to_ids(r) for r in RATINGS}
    item = [(PREF, PROMPT, "bees make wax .")]
    assert ScoringJudge(FixedLM(len(tok), ids["5"], 30.0), tok).rate(item)[0] == pytest.approx(5.0)
    assert ScoringJudge(FixedLM(len(tok), ids["1"], 30.0), tok).rate(item)[0] == pytest.approx(1.0)
    assert ScoringJudge(FixedLM(len(tok), ids["2"], 0.0), tok).rate(item)[0] == pytest.approx(3.0)
    # favouring a word that is not a rating leaves the five answers uniform
    other = tok.convert_tokens_to_ids("bees")
    assert ScoringJudge(FixedLM(len(tok), other, 30.0), tok).rate(item)[0] == pytest.approx(3.0)


def test_tiny_judge_scores_one_response_at_a_time_independent_of_batch(judge):
    responses = ["bees make wax .", "bees have six legs . bees make wax . hope this helps you , haha !",
                 "ugh , whatever , i will answer ."]
    items = [(PREF, PROMPT, r) for r in responses]
    together = judge.rate(items)
    alone = [judge.rate([item])[0] for item in items]
    assert together == pytest.approx(alone, abs=1e-5)
    assert all(1.0 <= s <= 5.0 for s in together)
    assert len(set(round(s, 6) for s in together)) == 3  # the response changes the rating
    assert judge.rate(items) == together  # deterministic


def test_multi_token_answers_give_the_same_scores_as_the_single_token_path(judge):
    items = [(PREF, PROMPT, "bees make wax ."), (PREF, "explain rain to me .", "rain helps crops .")]
    fast = judge.rate(items)
    questions, answers = zip(*[judge._encode(*i) for i in items])
    slow = torch.softmax(judge._sequence_logprobs(list(questions), list(answers)), -1)
    assert (slow @ torch.arange(1.0, 6.0)).tolist() == pytest.approx(fast, abs=1e-5)


def test_judge_from_a_saved_model_folder_rates_like_the_original(judge, tmp_path):
    from raypref.models.factory import save_pretrained_safetensors

    folder = save_pretrained_safetensors(judge.model, judge.tokenizer, tmp_path / "judge")
    loaded = ScoringJudge.from_config(JudgeConfig(model=str(folder)))
    items = [(PREF, PROMPT, "bees make wax .")]
    assert loaded.rate(items) == pytest.approx(judge.rate(items), abs=1e-5)


def test_scores_feed_the_win_rate_per_preference(judge):
    prefs = {"P2A": PREF, "P3B": "generate a response that answers in an unfriendly manner ."}
    a = judge.scores(PROMPT, "bees make wax .", prefs)
    assert set(a) == {"P2A", "P3B"}
    combo = ("P2A", "P3B")
    result = win_rate({combo: [a]}, {combo: [a]}, preference_table(list(prefs)))
    assert result.ties == 1


def test_judges_that_disagree_give_the_win_rate_their_ratings_imply(judge):
    """Two judges with opposite opinions (one rates every answer 5, the other 1) score the same
    response for two preferences; the win rate follows the ratings, preference by preference."""
    tok = judge.tokenizer
    prefs = {"P2A": PREF, "P3B": "generate a response that answers in an unfriendly manner ."}
    lm = {r: FixedLM(len(tok), tok.convert_tokens_to_ids(r), 30.0) for r in ("1", "5")}
    high, low = (ScoringJudge(lm[r], tok).scores(PROMPT, "bees make wax .", prefs) for r in ("5", "1"))
    assert high == pytest.approx({"P2A": 5.0, "P3B": 5.0}) and low == pytest.approx({"P2A": 1.0, "P3B": 1.0})
    table = preference_table(list(prefs))
    combos = [("P2A",), ("P3B",), ("P2A", "P3B")]
    as_method = lambda scores: {c: [scores] for c in combos}  # noqa: E731
    won = win_rate(as_method(high), as_method(low), table)
    assert (won.wins, won.losses, won.ties) == (3, 0, 0)
    assert win_rate(as_method(low), as_method(high), table).losses == 3
    # A is rated high for P2A only, B for P3B only: each wins its own preference, the pair ties
    a, b = {"P2A": high["P2A"], "P3B": low["P3B"]}, {"P2A": low["P2A"], "P3B": high["P3B"]}
    result = win_rate(as_method(a), as_method(b), table)
    assert [(r.wins, r.losses, r.ties) for r in (result.by_combination[c] for c in combos)] == [
        (1, 0, 0), (0, 1, 0), (0, 0, 1)]


def test_bad_judge_inputs(judge):
    with pytest.raises(ValueError, match="slot"):
        ScoringJudge(judge.model, judge.tokenizer, template="rate {response}")
    with pytest.raises(TypeError, match="item 0"):
        judge.rate([(PREF, PROMPT)])
    from raypref.models.factory import ModelConfig, build_policy, build_tokenizer
    tok = build_tokenizer(ModelConfig(), ["bees", "make"])
    with pytest.raises(ValueError, match="ratings"):
        ScoringJudge(build_policy(ModelConfig(n_layer=1, n_embd=32, n_head=2), tok), tok)
    assert set(RATINGS) <= set(judge_vocabulary())


def test_load_prompts_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("Explain sarcoidosis to me.\n\n  What is needed for self-sufficient living spaces?\n")
    assert load_prompts(txt) == ["Explain sarcoidosis to me.",
                                 "What is needed for self-sufficient living spaces?"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"instruction": "b"}) + "\n")
    assert load_prompts(jl) == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_prompts(bad)
    bad.write_text(json.dumps({"text": "a"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no 'prompt'"):
        load_prompts(bad)
    with pytest.raises(ValueError, match=".txt"):
        load_prompts(_touch(tmp_path / "x.csv"))
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.txt")


def _touch(path):
    path.write_text("a\n")
    return path
