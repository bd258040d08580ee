"""scripts/dpa_learnability.py's text data: the best pool answer per direction (an ideal rejection
sampler's choice), on a hand-made judged pool whose choices are known."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from raypref.algos.dpa import direction_system_prompt
from raypref.recipes.pool import Candidate, Pool

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "dpa_learnability.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("dpa_learnability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def words(n: int) -> str:
    return " ".join(["word"] * n)


# per question: (words, quality); with verbosity = words / 100, v = (1, 0) picks the best quality,
# v = (√2/2, −√2/2) the best quality − words / 100 among answers at or above the 0.4 floor
ANSWERS = {0: [(90, 0.80), (40, 0.70), (1, 0.39)],   # train: the 1-word answer is under the floor
           1: [(60, 0.60), (20, 0.55)],               # train
           2: [(80, 0.90), (10, 0.45)]}               # test


def hand_pool(tmp_path, scores=("quality", "verbosity")) -> Pool:
    candidates, quality = [], []
    for question, answers in ANSWERS.items():
        for k, (n, q) in enumerate(answers):
            candidates.append(Candidate(prompt=question, system=0, sample=k, text=words(n), tokens=n))
            quality.append(q)
    values = {"quality": np.array(quality), "verbosity": np.array([float(c.tokens) for c in candidates])}
    return Pool(prompts=[("q0?", "train"), ("q1?", "train"), ("q2?", "test")], systems=[""], candidates=candidates,
                folder=tmp_path, scores={k: values[k] for k in scores}, min_quality=0.4)


def test_best_answers_trade_quality_for_words_above_the_floor(script, tmp_path):
    pool = hand_pool(tmp_path)
    first, last = [1.0, 0.0], [math.sqrt(0.5), -math.sqrt(0.5)]
    picks = {(q, tuple(v)): len(pool.candidates[i].text.split())
             for q, i, v in script.best_answers(pool, [first, last], "train", 100.0)}
    assert picks == {(0, (1.0, 0.0)): 90, (0, (0.7071, -0.7071)): 40,   # not the 1-word answer under the floor
                     (1, (1.0, 0.0)): 60, (1, (0.7071, -0.7071)): 20}
    # without the floor the 1-word answer wins the last direction: the floor is what kept it out
    pool.min_quality = 0.0
    assert [len(pool.candidates[i].text.split())
            for q, i, _ in script.best_answers(pool, [last], "train", 100.0) if q == 0] == [1]
    # the verbosity scale decides the trade: at 1000 words per unit, length hardly counts
    pool.min_quality = 0.4
    assert [len(pool.candidates[i].text.split())
            for q, i, _ in script.best_answers(pool, [last], "train", 1000.0) if q == 0] == [90]


def test_oracle_examples_are_train_answers_under_drawn_directions(script, tmp_path):
    pool = hand_pool(tmp_path)
    examples = script.oracle_examples(pool, per_prompt=5, verbosity_words=100.0, seed=0)
    assert len(examples) == 2 * 5
    assert {q for q, _, _ in examples} == {"q0?", "q1?"}   # never the test question
    allowed = {"q0?": {words(90), words(40)}, "q1?": {words(60), words(20)}}
    assert all(answer in allowed[q] for q, answer, _ in examples)
    # each system message is DPA's, with a direction inside DPA's angle range [−π/4, 0]
    for _, _, system in examples:
        rating = system.split("= ")[1].split()
        h, verbosity = float(rating[0].split("*")[1]), float(rating[2].split("*")[1]) * (-1 if rating[1] == "-" else 1)
        assert system == direction_system_prompt([h, verbosity], script.TEXT_OBJECTIVES)
        assert -math.pi / 4 - 0.02 <= math.atan2(verbosity, h) <= 0.0
    assert examples == script.oracle_examples(pool, per_prompt=5, verbosity_words=100.0, seed=0)


def test_ideal_lengths_read_the_test_questions(script, tmp_path):
    pool = hand_pool(tmp_path)
    assert script.ideal_lengths(pool, script.eval_directions(), 100.0) == [80.0, 80.0, 80.0, 10.0]


def test_a_pool_without_quality_scores_is_named(script, tmp_path):
    with pytest.raises(ValueError, match="needs quality and verbosity scores"):
        script.best_answers(hand_pool(tmp_path, scores=("verbosity",)), [[1.0, 0.0]], "train", 100.0)


def test_worded_control_puts_each_evaluation_direction_in_its_own_band(script, tmp_path):
    texts = [script.worded_direction(v.tolist()) for v in script.eval_directions()]
    assert texts == [f"You are a helpful assistant. Keep your answer {w}." for w in script.LENGTH_WORDS]
    examples = script.oracle_examples(hand_pool(tmp_path), per_prompt=5, verbosity_words=100.0, seed=0,
                                      system_text=script.worded_direction)
    numbered = script.oracle_examples(hand_pool(tmp_path), per_prompt=5, verbosity_words=100.0, seed=0)
    # the same answers under the same drawn directions; only the system message differs
    assert [(q, a) for q, a, _ in examples] == [(q, a) for q, a, _ in numbered]
    assert {s for _, _, s in examples} <= set(texts)


@pytest.mark.parametrize("text, message", [
    ("judges: text\n", "no pool section"),
    ("pool:\n  train_promts: 3\n", "unknown key"),
    ("pool:\n  max_new_tokens: 0\n", "max_new_tokens"),
])
def test_a_bad_pool_config_exits_naming_the_file(script, tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SystemExit, match=message) as err:
        script.main(["smollm2-135m-instruct", "--pool_config", str(path)])
    assert "bad.yaml" in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--steps", "100,abc"], "integers"),
    (["--steps", "0,100"], "--steps 0"),
    (["--directions_per_prompt", "0"], "--directions_per_prompt 0"),
    (["--sweep_samples", "-1"], "--sweep_samples -1"),
])
def test_bad_flags_exit_naming_the_flag(script, flags, message):
    with pytest.raises(SystemExit, match=message):
        script.main(["smollm2-135m-instruct", "--pool_config", "configs/soups-smollm2.yaml", *flags])
