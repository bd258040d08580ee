"""The simulated world's judges behind the reward interface.

A user's reward is ``w · judge(text, prompt)`` over the attribute scores the world reads from
the response text. Users by id come from a population (e.g. `users.two_user_conflict()`);
id 0 is the generic user with uniform aspect weights (`users.UNIFORM_WEIGHTS`); a weight
vector weighs ``attributes`` in order; demonstrations give weights fitted by BT likelihood
on the judged score differences of the chosen vs rejected responses.
"""
from __future__ import annotations

from typing import Sequence

import torch

from raypref.data.users import DIRICHLET_ASPECT_ORDER, UNIFORM_WEIGHTS, User
from raypref.data.world import World
from raypref.rewards.base import RewardFunction, UnknownUserError, UserRef, fit_weights


class WorldJudgeReward(RewardFunction):
    def __init__(self, world: World, users: Sequence[User] = (),
                 attributes: Sequence[str] = DIRICHLET_ASPECT_ORDER):
        from raypref.data.world import ATTRIBUTES

        unknown = set(attributes) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"WorldJudgeReward: unknown attribute(s) {sorted(unknown)}; "
                             f"the world judges {ATTRIBUTES}")
        self.world, self.attributes = world, tuple(attributes)
        self.users = {u.user_id: u for u in users}
        if len(self.users) != len(users):
            raise ValueError("WorldJudgeReward: duplicate user ids in users")

    def _judged(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """[n, len(ATTRIBUTES judged)] judged scores in ``self.attributes`` order."""
        return torch.tensor([[self.world.judge(r, p)[a] for a in self.attributes]
                             for p, r in zip(prompts, responses)], dtype=torch.float64)

    def weights_for(self, user: UserRef) -> torch.Tensor:
        """The user's weight vector over ``attributes``."""
        if user.weights is not None:
            return torch.tensor(user.weights, dtype=torch.float64)
        if user.demonstrations is not None:
            demos = user.demonstrations
            chosen = self._judged([d.prompt for d in demos], [d.chosen for d in demos])
            rejected = self._judged([d.prompt for d in demos], [d.rejected for d in demos])
            return fit_weights(chosen - rejected).double()
        if user.is_generic:
            return torch.tensor([UNIFORM_WEIGHTS.get(a, 0.0) for a in self.attributes],
                                dtype=torch.float64)
        if user.user_id not in self.users:
            raise UnknownUserError(f"WorldJudgeReward: unknown user id {user.user_id}; known: "
                                   f"{sorted(self.users)} and 0 (generic)")
        weights = self.users[user.user_id].weights
        outside = {a for a, w in weights.items() if w and a not in self.attributes}
        if outside:
            raise ValueError(f"WorldJudgeReward: user {user.user_id} weighs {sorted(outside)}, "
                             f"outside this reward's attributes {self.attributes}")
        return torch.tensor([weights.get(a, 0.0) for a in self.attributes], dtype=torch.float64)

    def _score(self, prompts, responses, user):
        return self._judged(prompts, responses) @ self.weights_for(user)
