"""The general-quality judge: high for well-made answers whatever their attributes, low for
degenerate, repetitive, off-topic or false text of any length."""
import numpy as np
import pytest

from raypref.data.world import World

PROMPT = "tell me about bees ."


@pytest.fixture(scope="module")
def world():
    return World(seed=0, difficulty=0.0)


GOOD = {"truthfulness": 5, "instruction_following": 5}


def test_well_made_answers_score_high_whatever_their_psoups_attributes(world):
    g = np.random.default_rng(0)
    for attrs in ({"verbosity": 0.0, "expertise": 0.0, "style": -1.0},
                  {"verbosity": 1.0, "expertise": 1.0, "style": 1.0},
                  {"verbosity": 0.4, "expertise": 0.5, "style": 0.0}):
        scores = [world.quality(world.sample_response(PROMPT, g, {**attrs, **GOOD}).text, PROMPT)
                  for _ in range(30)]
        assert min(scores) >= 0.8, (attrs, min(scores))


def test_degenerate_texts_score_low_even_when_long(world):
    good = world.sample_response(PROMPT, np.random.default_rng(1), {**GOOD, "verbosity": 1.0}).text
    content = "bees often involve honey and pollination ."
    repeated = " ".join([content] * 20)
    soup = " ".join(np.random.default_rng(2).choice(world.vocabulary(), 120))
    off_topic = world.sample_response("tell me about rockets .", np.random.default_rng(3),
                                      {**GOOD, "verbosity": 1.0}).text
    truncated = good.rsplit(" . ", 3)[0]  # cut mid-answer: a fragment at the end
    false = "bees have eight legs . bees make soap . " + " ".join(
        f"bees relate to {a} and {b} ." for a, b in [("honey", "hive"), ("buzz", "wings")])
    assert world.quality(good, PROMPT) >= 0.9
    assert world.quality(repeated, PROMPT) < 0.1
    assert world.quality(soup, PROMPT) < 0.2
    assert world.quality(off_topic, PROMPT) < 0.2
    assert world.quality(false, PROMPT) == 0.0
    assert world.quality(good, PROMPT) - world.quality(truncated, PROMPT) > 0.05
    assert world.quality("", PROMPT) == 0.0
    # length and style words cannot buy quality: the degenerate texts above are long
    assert world.judge(repeated, PROMPT)["verbosity"] > world.judge(good, PROMPT)["verbosity"] - 0.3


def test_quality_needs_a_topic_and_text(world):
    with pytest.raises(ValueError, match="no topic"):
        world.quality("bees make wax .", "tell me about dragons .")
    with pytest.raises(TypeError, match="str"):
        world.quality(None, PROMPT)
