"""DPA (DPA §2.2): direction sampling, best-of-n by v·r, the system prompt, the data schedule."""

from __future__ import annotations

import math
import random

import pytest
import torch

from raypref.algos.dpa import (
    best_of_n,
    direction_system_prompt,
    directions_between,
    prompt_half,
    sample_directions,
    scalarize,
    with_replay,
)


def test_default_directions_are_unit_and_span_minus_quarter_pi_to_zero():
    v = sample_directions(4000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(v.norm(dim=1), torch.ones(4000), atol=1e-6)
    angles = torch.atan2(v[:, 1], v[:, 0])
    assert angles.min() >= -math.pi / 4 - 1e-6 and angles.max() <= 1e-6
    assert (v[:, 0] >= math.sqrt(2) / 2 - 1e-6).all() and (v[:, 1] <= 1e-6).all()
    # uniform in angle: each quarter of the range holds about a quarter of the draws
    counts = torch.histc(angles, bins=4, min=-math.pi / 4, max=0.0)
    assert (counts / 4000 - 0.25).abs().max() < 0.03


def test_custom_angle_range_and_bad_range():
    v = sample_directions(500, angle_range=(0.1, 0.3), generator=torch.Generator().manual_seed(1))
    angles = torch.atan2(v[:, 1], v[:, 0])
    assert angles.min() >= 0.1 - 1e-6 and angles.max() <= 0.3 + 1e-6
    with pytest.raises(ValueError, match="angle_range"):
        sample_directions(3, angle_range=(-2.0, 0.0))


def test_three_objectives_land_on_the_orthant_given_by_the_signs():
    v = sample_directions(1000, n_objectives=3, signs=[1, -1, 1], generator=torch.Generator().manual_seed(2))
    assert torch.allclose(v.norm(dim=1), torch.ones(1000), atol=1e-6)
    assert (v[:, 0] >= 0).all() and (v[:, 1] <= 0).all() and (v[:, 2] >= 0).all()
    with pytest.raises(ValueError, match="signs"):
        sample_directions(3, n_objectives=3, signs=[1, 1])


def test_directions_between_sweeps_evenly_from_start_to_end():
    v = directions_between((1.0, 0.0), (math.sqrt(2) / 2, -math.sqrt(2) / 2), 4)
    assert torch.allclose(v[0], torch.tensor([1.0, 0.0])) and torch.allclose(v[-1], torch.tensor([0.7071068, -0.7071068]))
    assert torch.allclose(torch.atan2(v[:, 1], v[:, 0]).diff(), torch.full((3,), -math.pi / 12), atol=1e-6)


def test_best_of_n_picks_the_argmax_of_v_dot_r():
    rewards = torch.tensor([[[90.0, 80.0], [70.0, 20.0], [85.0, 50.0]],   # prompt 0: 3 responses × (help, verb)
                            [[50.0, 10.0], [60.0, 90.0], [55.0, 40.0]]])
    helpful_only = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert best_of_n(helpful_only, rewards).tolist() == [0, 1]
    terse = torch.tensor([[math.sqrt(0.5), -math.sqrt(0.5)]] * 2)
    # v·r: prompt 0 -> 7.07, 35.4, 24.7; prompt 1 -> 28.3, -21.2, 10.6
    assert best_of_n(terse, rewards).tolist() == [1, 0]
    assert torch.allclose(scalarize(terse, rewards)[0, 1], torch.tensor(50.0 * math.sqrt(0.5)))
    # random check against a brute-force loop
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(6, 5, 3, generator=g), sample_directions(6, 3, generator=g)
    brute = [max(range(5), key=lambda j: float(v[b] @ r[b, j])) for b in range(6)]
    assert best_of_n(v, r).tolist() == brute


def test_system_prompt_states_the_direction():
    text = direction_system_prompt([0.8, -0.6], ["helpfulness", "verbosity"])
    assert text == ("You are a helpful assistant. Your response should maximize weighted rating = "
                    "helpfulness*0.8 - verbosity*0.6")
    assert direction_system_prompt([1.0, -0.0], ["helpfulness", "verbosity"]).endswith("helpfulness*1 + verbosity*0")
    with pytest.raises(ValueError, match="differ in length"):
        direction_system_prompt([1.0], ["a", "b"])


def test_prompt_halves_alternate_and_replay_makes_its_share():
    prompts = list(range(10))
    assert prompt_half(prompts, 1) == [0, 1, 2, 3, 4] and prompt_half(prompts, 2) == [5, 6, 7, 8, 9]
    assert prompt_half(prompts, 3) == prompt_half(prompts, 1)
    selected = [f"s{i}" for i in range(85)]
    mixed = with_replay(selected, [f"o{i}" for i in range(100)], 0.15, random.Random(0))
    assert len(mixed) == 100 and sum(x.startswith("o") for x in mixed) == 15
    with pytest.raises(ValueError, match="only 3"):
        with_replay(selected, ["o"] * 3, 0.15, random.Random(0))


def test_kept_response_from_own_samples_or_from_the_prompts_shared_candidates():
    """2 prompts x 2 directions x 3 samples; rewards (helpfulness, verbosity). "own" keeps the best
    of a query's own 3 (DPA); "prompt" the best of the prompt's 6, so under (0.71, -0.71) the
    shortest answer drawn under (1, 0) can win."""
    from raypref.recipes.rsf import kept_indices

    plus, minus = [1.0, 0.0], [math.sqrt(0.5), -math.sqrt(0.5)]
    directions = torch.tensor([plus, minus, plus, minus])
    rewards = torch.tensor([
        [0.5, 0.9], [0.6, 0.8], [0.4, 0.1],    # prompt 0, drawn under (1, 0): index 2 is short
        [0.5, 0.9], [0.55, 0.7], [0.5, 0.6],   # prompt 0, drawn under (0.71, -0.71): all long
        [0.9, 0.5], [0.1, 0.1], [0.2, 0.2],    # prompt 1, (1, 0)
        [0.3, 0.3], [0.95, 0.4], [0.2, 0.9],   # prompt 1, (0.71, -0.71)
    ])
    assert kept_indices(directions, rewards, 3, 2, "own") == [1, 5, 6, 10]
    # prompt 0 under (0.71, -0.71): 0.71 * (0.4 - 0.1) beats every other of its 6; prompt 1 under
    # (1, 0): 0.95 (drawn under the other direction) beats 0.9; under (0.71, -0.71) the same 0.95
    assert kept_indices(directions, rewards, 3, 2, "prompt") == [1, 2, 10, 10]
    with pytest.raises(ValueError, match="candidates='every'"):
        from raypref.recipes.rsf import RSFSpec
        RSFSpec("base", ["a", "b"], [], lambda: None, candidates="every")


def test_candidates_at_its_default_leaves_the_rsf_fingerprint_as_before():
    """A field added later stays out of the spec's fingerprint at its default, so RSF runs made
    before it resume; the variant is another run."""
    from raypref.recipes.rsf import RSFSpec

    def spec(**kw):
        return RSFSpec("base", ["a", "b"], [("a", "x")], dict, **kw).fingerprint()

    assert "candidates" not in spec() and "n_samples" in spec()
    assert "candidates" in spec(candidates="prompt") and spec(candidates="prompt") != spec()
