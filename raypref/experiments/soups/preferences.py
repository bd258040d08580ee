"""Preferences as judges see them, and the Prompted-MORL training pairs (seed 002 §2.2).

A P-Soups preference reads one judge attribute in one direction (P2A: less verbosity is
better). Its *reward* of a text is that judge score, signed and put on a common 0..1 scale so
that the rewards of different preferences can be averaged, as P-MORL does.
"""
from __future__ import annotations

import numpy as np

from raypref.data.records import PreferenceRecord
from raypref.data.users import psoups_profile

# Judge score ranges, to put attributes on one 0..1 scale before averaging rewards.
_ATTRIBUTE_RANGE = {"style": (-1.0, 1.0)}


def preference_table(names: list[str]) -> dict[str, tuple[str, int]]:
    """{preference: (judge attribute, +1 / -1)} for the win-rate code."""
    table = {}
    for name in names:
        profile = psoups_profile(name)
        table[name] = (profile.attribute, int(profile.direction))
    return table


def preference_reward(name: str, scores: dict[str, float]) -> float:
    """The 0..1 reward preference ``name`` gives a text with judge ``scores``."""
    profile = psoups_profile(name)
    lo, hi = _ATTRIBUTE_RANGE.get(profile.attribute, (0.0, 1.0))
    unit = (scores[profile.attribute] - lo) / (hi - lo)
    return unit if profile.direction > 0 else 1.0 - unit


def pmorl_pairs(world, combinations: list[list[str]], n: int, rng: np.random.Generator,
                min_margin: float = 0.05) -> list[PreferenceRecord]:
    """P-MORL pairs: the combination written in the prompt; the chosen response is the one
    with the higher *mean* of the combination's per-preference rewards (002 §2.2)."""
    records: list[PreferenceRecord] = []
    prompts = world.prompts(max(n, 1), split="train")
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 20 * n + 100:
            raise RuntimeError(f"pmorl_pairs: only {len(records)} of {n} pairs cleared the "
                               f"margin {min_margin} after {attempts} attempts")
        combo = combinations[int(rng.integers(len(combinations)))]
        prompt = prompts[int(rng.integers(len(prompts)))]
        first, second = world.candidates(prompt, 2, rng)
        rewards = []
        for response in (first, second):
            scores = world.judge(response.text, prompt)
            rewards.append(float(np.mean([preference_reward(p, scores) for p in combo])))
        if abs(rewards[0] - rewards[1]) < min_margin:
            continue  # a near-tie teaches nothing and is mostly judge noise
        chosen, rejected = (first, second) if rewards[0] > rewards[1] else (second, first)
        records.append(PreferenceRecord(
            prompt=f"{prompt} {world.preference_instruction(combo)}",
            chosen=chosen.text, rejected=rejected.text, user_text="+".join(combo),
            chosen_scores=dict(chosen.latent), rejected_scores=dict(rejected.latent),
            source="pmorl"))
    return records
