"""A trained reward model folder (as `recipes.reward.RewardSpec.export` writes it:
``model.safetensors`` + ``reward_config.json``) back behind the reward interface."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence


from raypref.data.records import PreferenceRecord
from raypref.data.world import ASPECTS
from raypref.models.reward import (EncoderConfig, MultiObjectiveRewardModel,
                                   PersonalizedRewardModel, ScalarRewardModel, VAEConfig,
                                   VAERewardModel, build_frozen_encoder, build_text_encoder)
from raypref.models.user_model import UserModel, UserModelConfig
from raypref.rewards.base import RewardFunction
from raypref.rewards.models import BTReward, MultiObjectiveReward, PersonalizedReward, VAEReward

CONFIG_FILE, WEIGHTS_FILE = "reward_config.json", "model.safetensors"


def load_reward_function(path: str | Path, *, user_weights: dict[int, Sequence[float]] | None = None,
                         user_demos: dict[int, Sequence[PreferenceRecord]] | None = None,
                         fallback_to_generic: bool = False) -> RewardFunction:
    """The reward function of a trained model folder. ``user_weights`` (multi-objective) and
    ``user_demos`` (vae) register users by id; ``fallback_to_generic`` lets the unconditional
    BT model, and a user-model RM for ids it has not seen, score a user as the generic one."""
    from safetensors.torch import load_file

    folder = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).exists():
            raise FileNotFoundError(f"load_reward_function: no {name} in {folder}")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    encoder_cfg = EncoderConfig(**cfg["encoder"])
    frozen = cfg.get("freeze_query_encoder", False)
    encoder = build_frozen_encoder(encoder_cfg) if frozen else build_text_encoder(encoder_cfg)
    method = cfg["method"]
    if method == "bt":
        model = ScalarRewardModel(encoder)
    elif method == "multi_objective":
        model = MultiObjectiveRewardModel(encoder, cfg.get("attributes", ASPECTS))
    elif method == "user_model":
        users = UserModel(UserModelConfig(**cfg["user_model"]), encoder.hidden_size, cfg["users"])
        model = PersonalizedRewardModel(encoder, users, cfg["conditioning"])
    elif method == "vae":
        model = VAERewardModel(encoder, encoder.hidden_size, VAEConfig(**cfg["vae"]))
    else:
        raise ValueError(f"{folder / CONFIG_FILE}: unknown method {method!r}")
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not fit a {method} model: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    model.eval().requires_grad_(False)
    if method == "bt":
        return BTReward(model, fallback_to_generic=fallback_to_generic)
    if method == "user_model":
        return PersonalizedReward(model, fallback_to_generic=fallback_to_generic)
    if method == "multi_objective":
        return MultiObjectiveReward(model, user_weights)
    return VAEReward(model, build_frozen_encoder(encoder_cfg), cfg["data"]["n_demos"], user_demos)
