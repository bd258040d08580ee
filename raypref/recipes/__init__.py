"""Recipes: one file per method, each a typed config and its LoopSpec; one registry of names.

`RECIPES[name]` is a `Method` (recipes/method.py): its config section, spec builder, loss,
evaluation and summary, and — for methods Personalized Soups can train one policy per
preference with — `per_preference`. Jobs look methods up by name (the soups job's `algo`, the
preference job's `method`, the sweep's `job_config.method`); a new method is a recipe file and
one line below.
"""
from __future__ import annotations

from raypref.algos.dpo import dpo_loss
from raypref.algos.pdpo import pdpo_loss
from raypref.algos.ppo import policy_loss
from raypref.algos.reward import bt_loss, multi_objective_mse, personalized_bt_loss
from raypref.algos.sft import sft_loss
from raypref.algos.vae import vae_reward_loss
from raypref.recipes.dpo import DPOConfig, DPOSpec
from raypref.recipes import orpo
from raypref.recipes.method import CORPUS, PROMPTS, USERS, Method, pair_method
from raypref.recipes.pdpo import PDPOSpec
from raypref.recipes.ppo import PPOConfig, PPOSpec, preference_policy as _ppo_policy
from raypref.recipes.reward import RewardConfig, RewardSpec
from raypref.recipes.rsf import RSFSpec
from raypref.recipes.sft import SFTConfig, SFTSpec
from raypref.train.runner import Optimization


# the reward job's models (RewardConfig.method) and the loss each trains with
REWARD_LOSSES = {"bt": bt_loss, "multi_objective": multi_objective_mse, "user_model": personalized_bt_loss,
                 "vae": vae_reward_loss}
PAIR_SUMMARY = ("loss", "reward_accuracy", "reward_margin")

RECIPES: dict[str, Method] = {m.name: m for m in (
    Method("sft", SFTConfig, SFTSpec, sft_loss, CORPUS, about="supervised fine-tuning on the world's corpus"),
    pair_method("dpo", DPOConfig, DPOSpec, dpo_loss, "DPO (training.loss_type picks sigmoid or ipo)",
                metric="reward_accuracy", summary=PAIR_SUMMARY),
    pair_method("ipo", DPOConfig, DPOSpec, dpo_loss, "IPO: DPO's squared-margin variant",
                metric="reward_accuracy", summary=PAIR_SUMMARY, loss_type="ipo"),
    Method("pdpo", Optimization, PDPOSpec, pdpo_loss, USERS, about="P-DPO / P-IPO with a user model "
           "(experiments/pdpo.py PDPOJobConfig holds its settings)"),
    Method("ppo", PPOConfig, PPOSpec.from_config, policy_loss, PROMPTS, section="ppo",
           summary=("reward/score", "kl/per_response"), per_preference=_ppo_policy,
           about="PPO against a reward (Soups: the preference's world judge)"),
    Method("rsf", Optimization, RSFSpec, sft_loss, PROMPTS, about="DPA rejection-sampling fine-tuning "
           "(experiments/rsf.py RSFJobConfig holds its settings)"),
    *(Method(f"reward_{kind}", RewardConfig, RewardSpec, loss, USERS,
             about=f"reward model: RewardConfig.method={kind!r} (jobs/reward.py --method {kind})")
      for kind, loss in REWARD_LOSSES.items()),
    orpo.METHOD,
)}


def recipe(name: str) -> Method:
    if name not in RECIPES:
        raise ValueError(f"unknown method {name!r}; known: {sorted(RECIPES)}")
    return RECIPES[name]


def pair_methods() -> list[str]:
    """Methods that learn from preference pairs (the preference job's `method`)."""
    return [n for n, m in RECIPES.items() if m.data == "pairs"]


def per_preference_methods() -> list[str]:
    """Methods Personalized Soups can train one policy per preference with (its `algo`)."""
    return [n for n, m in RECIPES.items() if m.per_preference is not None]
