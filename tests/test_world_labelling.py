"""One labelling path: every arm sees the same candidate pairs; only the labels differ."""
import numpy as np
import pytest

from raypref.data.labelling import (LabelStats, candidate_pairs, label_pairs, labelled_pairs,
                                    preference_labeller, preference_reward)
from raypref.data.users import psoups_combinations, psoups_profiles
from raypref.data.world import World

ARMS = {p.name: [p.name] for p in psoups_profiles()}
ARMS["P-MORL AAB"] = ["P1A", "P2A", "P3B"]


@pytest.mark.parametrize("construction", ["contrast", "random"])
def test_arms_with_one_seed_share_prompts_and_responses_and_differ_only_in_labels(construction):
    world = World(0, 0.4)
    runs = {arm: world.labelled_pairs(preference_labeller(names), 120, [3, 1],
                                      construction=construction)
            for arm, names in ARMS.items()}
    pairs = {arm: [(r.prompt, frozenset((r.chosen, r.rejected))) for r in recs]
             for arm, recs in runs.items()}
    first = pairs["P1A"]
    assert all(p == first for p in pairs.values())
    chosen = {arm: [r.chosen for r in recs] for arm, recs in runs.items()}
    assert chosen["P1A"] != chosen["P1B"] and chosen["P2A"] != chosen["P2B"]
    # opposite preferences with the same noise draws disagree on every pair they can order
    decisive = [r.chosen_scores["style"] != r.rejected_scores["style"] for r in runs["P3A"]]
    assert sum(decisive) > 60
    assert all(a != b for a, b, d in zip(chosen["P3A"], chosen["P3B"], decisive) if d)
    other = world.labelled_pairs(preference_labeller(["P1A"]), 120, [4, 1],
                                 construction=construction)
    assert [r.prompt for r in other] != [r.prompt for r in runs["P1A"]]


@pytest.mark.parametrize("noise, n", [(0.0, 200), (0.2, 1500)])
def test_label_noise_rate_is_the_configured_rate_for_every_arm(noise, n):
    world = World(0, 0.0, label_noise=noise)
    pairs = candidate_pairs(world, n, 11)
    for arm, names in ARMS.items():
        labeller, stats = preference_labeller(names), LabelStats()
        records = label_pairs(world, pairs, labeller, 11, stats=stats)
        wrong = np.mean([labeller(r.prompt, _R(r.chosen_scores)) <
                         labeller(r.prompt, _R(r.rejected_scores)) for r in records])
        assert stats.ties == 0  # contrast pairs are decisive for every preference and combination
        assert wrong == pytest.approx(noise, abs=0.025), arm
        assert stats.flipped / stats.n == pytest.approx(wrong)


class _R:
    def __init__(self, latent):
        self.latent = latent


def test_chosen_is_better_on_the_labellers_dimension_per_the_text_judge():
    world = World(0, 0.0)
    for profile in psoups_profiles():
        records = world.labelled_pairs(preference_labeller([profile.name]), 60, 2,
                                       instruction=profile.instruction, user_text=profile.instruction)
        for r in records:
            assert r.prompt.endswith(profile.instruction)
            bare = r.prompt[: -len(profile.instruction) - 1]
            margin = (world.judge(r.chosen, bare)[profile.attribute]
                      - world.judge(r.rejected, bare)[profile.attribute])
            assert margin * profile.direction > 0.2, profile.name


def test_pmorl_labeller_is_the_mean_of_its_preferences_rewards():
    scores = {"expertise": 0.2, "verbosity": 0.9, "style": 0.5}
    combo = psoups_combinations()[1]  # P1A, P2A, P3B
    expected = np.mean([1 - 0.2, 1 - 0.9, 1 - 0.75])
    assert preference_labeller(combo)("p", _R(scores)) == pytest.approx(expected)
    assert preference_reward("P3A", scores) == pytest.approx(0.75)


def test_test_split_pairs_use_only_held_out_prompts():
    world = World(0, 0.0)
    records = labelled_pairs(world, preference_labeller(["P2A"]), 80, 0, split="test")
    assert {r.prompt for r in records} <= set(world.prompt_pool("test"))


def test_ties_are_decided_by_a_coin_and_counted():
    world, stats = World(0, 0.0), LabelStats()
    records = world.labelled_pairs(lambda prompt, response: 1.0, 400, 5, stats=stats)
    assert stats.ties == 400 and len(records) == 400
    first = [r.chosen == p.first.text for r, p in zip(records, candidate_pairs(world, 400, 5))]
    assert 0.4 < np.mean(first) < 0.6


def test_bad_inputs_raise_clear_errors():
    world = World(0, 0.0)
    with pytest.raises(ValueError, match="construction"):
        candidate_pairs(world, 3, 0, construction="mixed")
    with pytest.raises(ValueError, match="unknown P-Soups"):
        preference_labeller(["P9Z"])
    with pytest.raises(ValueError, match="label_noise"):
        World(0, 0.0, label_noise=1.5)
    with pytest.raises(RuntimeError, match="pair 0"):
        world.labelled_pairs(lambda prompt, response: response.missing, 2, 0)


def test_pmorl_pairs_come_from_the_same_candidates_with_the_same_noise():
    from raypref.data.labelling import combination_labelled_pairs

    world = World(0, 0.0, label_noise=0.3)
    pairs = candidate_pairs(world, 64, 9)
    combos = psoups_combinations()
    stats, pref_stats = LabelStats(), LabelStats()
    pmorl = combination_labelled_pairs(world, pairs, combos, 9, stats=stats)
    soups = label_pairs(world, pairs, preference_labeller(["P1A"]), 9, stats=pref_stats)
    assert stats.flipped == pref_stats.flipped > 0  # same positions flipped for every arm
    for i, (r, s, pair) in enumerate(zip(pmorl, soups, pairs)):
        combo = combos[i % 8]
        assert r.prompt == f"{pair.prompt} {world.preference_instruction(combo)}"
        assert r.user_text == "+".join(combo) and s.prompt == pair.prompt
        assert {r.chosen, r.rejected} == {s.chosen, s.rejected} == {pair.first.text, pair.second.text}
        labeller = preference_labeller(combo)
        clean = labeller(r.prompt, _R(r.chosen_scores)) > labeller(r.prompt, _R(r.rejected_scores))
        flipped = s.chosen != pair.first.text if preference_labeller(["P1A"])(
            "", pair.first) > preference_labeller(["P1A"])("", pair.second) else s.chosen == pair.first.text
        assert clean != flipped


def test_world_from_config_reads_every_world_setting_the_config_has():
    from raypref.recipes.reward_data import RewardDataConfig
    from raypref.recipes.sft import SFTConfig

    sft = World.from_config(SFTConfig(world_seed=3, difficulty=0.4, extra_styles=True))
    assert (sft.seed, sft.difficulty, sft.extra_styles) == (3, 0.4, World(extra_styles=True).extra_styles)
    assert sft.prompts(5) == World(3, 0.4, extra_styles=True).prompts(5)
    data = World.from_config(RewardDataConfig(world_seed=2, difficulty=0.5, label_noise=0.05))
    assert (data.seed, data.difficulty, data.label_noise) == (2, 0.5, 0.05)
    with pytest.raises(TypeError, match="world_seed"):
        World.from_config(object())
