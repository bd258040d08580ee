"""Trained reward models behind the reward interface.

* `BTReward`: the unconditional model scores every user the same; it serves the generic user
  (id 0) and, only when built with ``fallback_to_generic=True``, any other user as generic.
* `MultiObjectiveReward`: scalarizes its per-attribute outputs with the user's weights
  (a vector, an id looked up in ``user_weights``, uniform for the generic user, or fitted
  to demonstrations by BT likelihood on the predicted attribute differences).
* `PersonalizedReward` (P-RLHF §F.2): the user's learned embedding e_u by id; the generic user
  (id 0) gets e_0. An id the user model has not seen raises, or, only when built with
  ``fallback_to_generic=True``, is scored as the generic user (P-RLHF's rule for unseen
  users). Weight vectors and demonstrations are not understood and raise.
* `VAEReward`: infers z from demonstrations (at least the N it was trained with): given
  ones, or the first N of a registered user's pool. The generic user gets the prior mean
  z = 0. Weight vectors are not understood by a VAE RM and raise.
"""
from __future__ import annotations

from typing import Sequence

import torch

from raypref.data.records import PreferenceRecord
from raypref.models.reward import (MultiObjectiveRewardModel, PersonalizedRewardModel,
                                   ScalarRewardModel, TextEncoder, VAERewardModel, embed_frozen)
from raypref.rewards.base import (RewardFunction, UnknownUserError, UnsupportedUserError,
                                  UserRef, fit_weights)

_CHUNK = 64


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _encode(encoder: TextEncoder, model: torch.nn.Module, prompts, responses) -> dict:
    tokens = encoder.tokenize(prompts, responses)
    return {k: v.to(_device(model)) for k, v in tokens.items()}


def _in_eval(model: torch.nn.Module, fn):
    was = model.training
    model.eval()
    try:
        return fn()
    finally:
        model.train(was)


class BTReward(RewardFunction):
    def __init__(self, model: ScalarRewardModel, fallback_to_generic: bool = False):
        self.model, self.fallback_to_generic = model, fallback_to_generic

    def _score(self, prompts, responses, user):
        if not user.is_generic and not self.fallback_to_generic:
            raise UnsupportedUserError(
                "BTReward: an unconditional reward model scores only the generic user (id 0); "
                "build it with fallback_to_generic=True to score other users as generic")
        def run():
            return torch.cat([self.model(**_encode(self.model.encoder, self.model,
                                                   prompts[i:i + _CHUNK], responses[i:i + _CHUNK]))
                              for i in range(0, len(prompts), _CHUNK)] or [torch.zeros(0)])
        return _in_eval(self.model, run)


class MultiObjectiveReward(RewardFunction):
    def __init__(self, model: MultiObjectiveRewardModel,
                 user_weights: dict[int, Sequence[float]] | None = None):
        self.model, self.attributes = model, model.attributes
        self.user_weights = {}
        for uid, w in (user_weights or {}).items():
            self.check_weights(w)
            self.user_weights[uid] = torch.tensor(list(w), dtype=torch.float32)

    def attribute_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """[n, k] predicted attribute scores on the 0-100 scale."""
        def run():
            with torch.no_grad():
                return torch.cat([self.model(**_encode(self.model.encoder, self.model,
                                                       list(prompts[i:i + _CHUNK]),
                                                       list(responses[i:i + _CHUNK])))
                                  for i in range(0, len(prompts), _CHUNK)]
                                 or [torch.zeros(0, len(self.attributes))])
        return _in_eval(self.model, run).float().cpu()

    def weights_for(self, user: UserRef) -> torch.Tensor:
        if user.weights is not None:
            return torch.tensor(user.weights, dtype=torch.float32)
        if user.demonstrations is not None:
            demos = user.demonstrations
            prompts = [d.prompt for d in demos]
            diffs = (self.attribute_scores(prompts, [d.chosen for d in demos])
                     - self.attribute_scores(prompts, [d.rejected for d in demos]))
            return fit_weights(diffs)
        if user.is_generic:
            return torch.full((len(self.attributes),), 1.0 / len(self.attributes))
        if user.user_id not in self.user_weights:
            raise UnknownUserError(f"MultiObjectiveReward: unknown user id {user.user_id}; "
                                   f"known: {sorted(self.user_weights)} and 0 (generic)")
        return self.user_weights[user.user_id]

    def _score(self, prompts, responses, user):
        return self.attribute_scores(prompts, responses) @ self.weights_for(user)


class PersonalizedReward(RewardFunction):
    def __init__(self, model: PersonalizedRewardModel, fallback_to_generic: bool = False):
        self.model, self.fallback_to_generic = model, fallback_to_generic

    def user_index(self, user: UserRef) -> int:
        if user.demonstrations is not None:
            raise UnsupportedUserError("PersonalizedReward: a user-model RM knows users by id; "
                                       "it does not read demonstrations")
        seen = self.model.user_model.users
        if user.user_id not in seen and not user.is_generic and not self.fallback_to_generic:
            raise UnknownUserError(f"PersonalizedReward: unknown user id {user.user_id}; known: "
                                   f"{sorted(seen)} and 0 (generic); build it with "
                                   "fallback_to_generic=True to score unseen users as generic")
        return int(self.model.user_model.index([user.user_id])[0])

    def _score(self, prompts, responses, user):
        index = self.user_index(user)

        def run():
            out = []
            for i in range(0, len(prompts), _CHUNK):
                tokens = _encode(self.model.encoder, self.model, prompts[i:i + _CHUNK],
                                 responses[i:i + _CHUNK])
                users = torch.full((tokens["input_ids"].shape[0],), index, dtype=torch.long,
                                   device=_device(self.model))
                out.append(self.model(**tokens, user_index=users))
            return torch.cat(out) if out else torch.zeros(0)
        return _in_eval(self.model, run)


class VAEReward(RewardFunction):
    def __init__(self, model: VAERewardModel, demo_encoder: TextEncoder, n_demos: int,
                 user_demos: dict[int, Sequence[PreferenceRecord]] | None = None):
        if n_demos < 1:
            raise ValueError(f"VAEReward: n_demos must be >= 1, got {n_demos}")
        self.model, self.demo_encoder, self.n_demos = model, demo_encoder, n_demos
        self.user_demos = {}
        for uid, demos in (user_demos or {}).items():
            if len(demos) < n_demos:
                raise ValueError(f"VAEReward: user {uid} has {len(demos)} demonstrations, "
                                 f"fewer than the model's N = {n_demos}")
            self.user_demos[uid] = list(demos)[:n_demos]

    def _demos_for(self, user: UserRef) -> Sequence[PreferenceRecord]:
        if user.demonstrations is not None:
            if len(user.demonstrations) < self.n_demos:
                raise ValueError(f"VAEReward: {len(user.demonstrations)} demonstrations given, "
                                 f"fewer than the model's N = {self.n_demos}")
            return user.demonstrations
        if user.user_id not in self.user_demos:
            raise UnknownUserError(f"VAEReward: unknown user id {user.user_id}; known: "
                                   f"{sorted(self.user_demos)} and 0 (generic)")
        return self.user_demos[user.user_id]

    def latent_mean(self, user: UserRef) -> torch.Tensor:
        """The user's latent mean mu [latent] (zeros, the prior mean, for the generic user)."""
        if user.weights is not None:
            raise UnsupportedUserError("VAEReward: a VAE reward model conditions on "
                                       "demonstrations, not on a weight vector")
        if user.is_generic:
            return torch.zeros(self.model.cfg.latent)
        demos = self._demos_for(user)
        prompts = [d.prompt for d in demos]
        chosen = embed_frozen(self.demo_encoder, prompts, [d.chosen for d in demos])
        rejected = embed_frozen(self.demo_encoder, prompts, [d.rejected for d in demos])
        dev = _device(self.model)

        def run():
            _, mu, _ = self.model.user_latent(chosen[None].to(dev), rejected[None].to(dev),
                                              sample=False)
            return mu[0]
        return _in_eval(self.model, run)

    def _score(self, prompts, responses, user):
        mu = self.latent_mean(user).to(_device(self.model))

        def run():
            out = []
            for i in range(0, len(prompts), _CHUNK):
                tokens = _encode(self.model.query_encoder, self.model,
                                 prompts[i:i + _CHUNK], responses[i:i + _CHUNK])
                z = mu.expand(tokens["input_ids"].shape[0], -1)
                out.append(self.model.reward(tokens["input_ids"], tokens["attention_mask"], z))
            return torch.cat(out) if out else torch.zeros(0)
        return _in_eval(self.model, run)
