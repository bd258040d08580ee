"""Recipes: one file per method, each a typed config and its LoopSpec; one registry of names.

`RECIPES[name]` says what a method is called, its config class, and — for methods that can
train one Personalized-Soups policy per preference — how to build that policy's spec
(`per_preference(config, base_dir, preference, pairs, seed) -> LoopSpec`). Configs that name a
method (e.g. the soups job's `algo`) are validated against this registry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from raypref.recipes.dpo import DPOConfig, DPOSpec
from raypref.recipes.ppo import PPOConfig, preference_policy as _ppo_policy
from raypref.recipes.reward import RewardConfig
from raypref.recipes.sft import SFTConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    config: type
    per_preference: Callable | None = None  # (config, base_dir, preference, pairs, seed) -> LoopSpec


def _dpo_policy(cfg: DPOConfig, base_dir: str, preference: str, pairs: list, seed: int) -> DPOSpec:
    """One preference's DPO policy: a LoRA on the shared base (the reference = adapters off)."""
    return DPOSpec.from_config(cfg, base_dir, pairs, name=preference, seed=seed)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("sft", SFTConfig),
    Recipe("dpo", DPOConfig, per_preference=_dpo_policy),  # loss_type "sigmoid" (DPO) or "ipo"
    Recipe("reward", RewardConfig),  # reward models: bt / multi_objective / vae (jobs/reward.py)
    # reward: the preference's attribute judged by the simulated world; prompts: the pairs'
    Recipe("ppo", PPOConfig, per_preference=_ppo_policy),
)}


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]
