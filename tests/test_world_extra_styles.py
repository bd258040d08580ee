"""P3C (sassy) and P3D (sarcastic), the style preferences of P-Soups §B.2: 16 combinations."""
import numpy as np
import pytest

from raypref.data.labelling import preference_labeller
from raypref.data.users import psoups_combinations, psoups_profile, psoups_profiles
from raypref.data.world import ATTRIBUTES, World

PROMPT = "tell me about bees ."


@pytest.fixture(scope="module")
def world():
    return World(0, 0.0, extra_styles=True)


def test_sixteen_combinations_two_by_two_by_four():
    combos = psoups_combinations(extended=True)
    assert len({tuple(c) for c in combos}) == 16
    assert {c[2] for c in combos} == {"P3A", "P3B", "P3C", "P3D"}
    assert psoups_combinations() == [c for c in combos if c[2] in ("P3A", "P3B")]
    assert [p.name for p in psoups_profiles()] == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    assert psoups_profile("P3C").attribute == "sass" and psoups_profile("P3D").attribute == "sarcasm"
    assert "sassy" in psoups_profile("P3C").instruction.split()


def test_judges_read_sass_and_sarcasm_back_and_the_plain_world_has_none(world):
    g = np.random.default_rng(0)
    for sass in (0.0, 0.5, 1.0):
        for sarcasm in (0.0, 1.0):
            r = world.sample_response(PROMPT, g, {"sass": sass, "sarcasm": sarcasm})
            judged = world.judge(r.text, PROMPT)
            assert (judged["sass"], judged["sarcasm"]) == (sass, sarcasm) == \
                (r.latent["sass"], r.latent["sarcasm"])
    plain = World(0, 0.0)
    text = plain.sample_response(PROMPT, g).text
    assert set(plain.judge(text)) == set(ATTRIBUTES)
    assert "sweetie" not in plain.vocabulary() and "sweetie" in world.vocabulary()
    with pytest.raises(ValueError, match="unknown attribute"):
        plain.sample_response(PROMPT, g, {"sass": 1.0})


def test_extra_styles_keep_length_quality_and_vocabulary(world):
    g = np.random.default_rng(1)
    lengths = {lv: {len(world.sample_response(PROMPT, g, {"sass": lv, "sarcasm": lv,
                                                         "verbosity": 0.4, "truthfulness": 5}).text.split())
                    for _ in range(20)} for lv in (0.0, 0.5, 1.0)}
    assert lengths[0.0] == lengths[0.5] == lengths[1.0]  # the style does not show as length
    good = {"truthfulness": 5, "instruction_following": 5}
    assert min(world.quality(world.sample_response(PROMPT, g, {**good, "sass": 1.0}).text, PROMPT)
               for _ in range(20)) >= 0.8
    vocab = set(world.vocabulary())
    texts = [r for _, r in world.sft_corpus(300, g)] + [p for p, _ in world.sft_corpus(300, g)]
    assert {t for text in texts for t in text.split()} <= vocab
    instructed = [p for p, _ in world.sft_corpus(600, g) if "sarcastic" in p.split()]
    assert instructed  # the base can learn to follow the new instructions too


def test_new_preferences_label_the_shared_pairs_on_their_own_attribute(world):
    for name, attribute in (("P3C", "sass"), ("P3D", "sarcasm")):
        records = world.labelled_pairs(preference_labeller([name]), 80, 1)
        for r in records:
            assert world.judge(r.chosen)[attribute] > world.judge(r.rejected)[attribute]


def test_the_sixteen_combination_soups_config_reaches_the_world_and_the_sweeps():
    """configs/soups-16.yaml (P-Soups §B.2): the SFT world gets the extra styles, P3C/P3D label
    the shared candidates on their own attribute, and style's sweep stays P3A vs P3B."""
    from pathlib import Path

    from raypref.config import from_dict, load_yaml
    from raypref.experiments.soups import evaluate as ev
    from raypref.experiments.soups.config import SoupsConfig
    from raypref.experiments.soups.preferences import simulated_data
    from raypref.recipes.sft import SFTConfig, sft_cache_key, sft_world

    cfg = from_dict(SoupsConfig, load_yaml(Path(__file__).parents[1] / "configs" / "soups-16.yaml"))
    cfg.validate()
    assert sorted(map(tuple, cfg.combinations)) == sorted(map(tuple, psoups_combinations(extended=True)))
    world = sft_world(cfg.sft)
    assert world.extra_styles == ("sass", "sarcasm") and "sweetie" in world.vocabulary()
    # the plain world's SFT cache key is unchanged by the new field; the extended one differs
    assert sft_cache_key(SFTConfig()) != sft_cache_key(cfg.sft)

    assert ev.dimensions_of(cfg.preferences)["style"] == ("P3A", "P3B")
    cfg.preferences, cfg.combinations = ["P3A", "P3C", "P3D"], [["P3C"], ["P3D"]]
    cfg.pairs_per_preference = 40
    data = simulated_data(cfg, world, seed=0)
    for name, attribute in (("P3C", "sass"), ("P3D", "sarcasm")):
        pairs = data.train[name]
        assert np.mean([world.judge(r.chosen)[attribute] > world.judge(r.rejected)[attribute]
                        for r in pairs]) > 0.9
    with pytest.raises(ValueError, match="sft.extra_styles"):
        SoupsConfig(preferences=["P3A", "P3C"], combinations=[["P3C"]]).validate()
