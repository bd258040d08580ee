"""One reward interface: score (prompt, response) pairs for a user.

The user is a `UserRef`: an id (0 = the generic user), a weight / direction vector over the
reward function's ``attributes``, or a few labelled demonstrations (preference records the
user chose). Every adapter answers `score(prompts, responses, user) -> Tensor[n]` and raises
a clear error for a user it cannot serve; none returns a score for a different user silently.
"""
from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from raypref.data.records import UNKNOWN_USER, PreferenceRecord

GENERIC_USER = UNKNOWN_USER


class UnknownUserError(KeyError):
    """A user id the reward function has no data or weights for."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnsupportedUserError(ValueError):
    """The reward function cannot condition on this kind of user description."""


@dataclass(frozen=True)
class UserRef:
    """Exactly one of: ``user_id``, ``weights``, ``demonstrations``."""
    user_id: int | None = None
    weights: tuple[float, ...] | None = None
    demonstrations: tuple[PreferenceRecord, ...] | None = None

    def __post_init__(self):
        given = [name for name in ("user_id", "weights", "demonstrations")
                 if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"UserRef: give exactly one of user_id, weights, demonstrations; "
                             f"got {given or 'none'}")
        # checked here, not only in the constructors below, so no path builds a bad UserRef
        uid = self.user_id
        if uid is not None and (isinstance(uid, bool) or not isinstance(uid, int) or uid < 0):
            raise ValueError(f"UserRef.user_id must be an int >= 0, got {uid!r}")
        if self.weights is not None and (
                not self.weights or not all(isinstance(w, numbers.Real) and not isinstance(w, bool)
                                            and np.isfinite(w)
                                            for w in self.weights)):
            raise ValueError(f"UserRef.weights must be non-empty and finite, got {self.weights!r}")
        if self.demonstrations is not None:
            if not self.demonstrations:
                raise ValueError("UserRef.demonstrations: the demonstration set is empty")
            bad = [type(d).__name__ for d in self.demonstrations if not isinstance(d, PreferenceRecord)]
            if bad:
                raise ValueError(f"UserRef.demonstrations must be PreferenceRecords, got {bad[:3]}")

    @classmethod
    def by_id(cls, user_id: int) -> "UserRef":
        return cls(user_id=user_id)

    @classmethod
    def generic(cls) -> "UserRef":
        return cls(user_id=GENERIC_USER)

    @classmethod
    def by_weights(cls, weights: Sequence[float]) -> "UserRef":
        return cls(weights=tuple(float(w) for w in weights))

    @classmethod
    def by_demonstrations(cls, records: Sequence[PreferenceRecord]) -> "UserRef":
        return cls(demonstrations=tuple(records))

    @property
    def is_generic(self) -> bool:
        return self.user_id == GENERIC_USER


class RewardFunction(ABC):
    """What policy training and evaluation call; they never see the model behind it."""

    attributes: tuple[str, ...] = ()  # what a weight vector weighs, in order (() = none)

    @abstractmethod
    def _score(self, prompts: list[str], responses: list[str], user: UserRef) -> torch.Tensor:
        ...

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              user: UserRef) -> torch.Tensor:
        """Rewards [n] (float32, no grad) of each (prompts[i], responses[i]) for ``user``."""
        if not isinstance(user, UserRef):
            raise TypeError(f"score: user must be a UserRef, got {type(user).__name__}")
        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        if user.weights is not None:
            self.check_weights(user.weights)
        with torch.no_grad():
            out = self._score(list(prompts), list(responses), user)
        return out.detach().float().reshape(len(prompts))

    def check_weights(self, weights: Sequence[float]) -> None:
        if not self.attributes:
            raise UnsupportedUserError(f"{type(self).__name__} has no attributes to weigh; "
                                       "give a user id or demonstrations")
        if len(weights) != len(self.attributes):
            raise ValueError(f"{type(self).__name__}: weight vector has {len(weights)} entries "
                             f"but the attributes are {len(self.attributes)}: {self.attributes}")


def fit_weights(score_diffs: torch.Tensor, steps: int = 500, lr: float = 1.0) -> torch.Tensor:
    """Simplex weights w maximizing the BT likelihood Σ log σ(w · Δs) of demonstrations
    whose chosen-minus-rejected attribute scores are the rows of ``score_diffs`` [n, k].
    How a weight-based reward function reads a user from a few labelled pairs.

    Exponentiated-gradient ascent (mirror descent on the simplex) in numpy: a few hundred
    tiny steps cost microseconds each there, milliseconds each through autograd."""
    if score_diffs.dim() != 2 or score_diffs.shape[0] == 0:
        raise ValueError(f"fit_weights: need [n >= 1, k] score differences, got "
                         f"{tuple(score_diffs.shape)}")
    diffs = score_diffs.double().cpu().numpy()
    diffs = diffs / max(float(np.abs(diffs).max()), 1e-12) * 4.0  # unit-free step size
    w = np.full(diffs.shape[1], 1.0 / diffs.shape[1])
    for _ in range(steps):
        p_wrong = 1.0 / (1.0 + np.exp(diffs @ w))       # 1 − σ(w · Δs)
        grad = (p_wrong[:, None] * diffs).mean(0)        # ∇ of the mean log-likelihood
        w = w * np.exp(lr * grad)
        w /= w.sum()
    return torch.from_numpy(w).float()


class JudgeWeightedReward(RewardFunction):
    """A reward that is a user's weighted sum of judged attribute scores. Subclasses give
    ``attributes``, ``users`` (id -> profile with ``weights``), ``attribute_scores`` and
    ``generic_weights``; a user is read from explicit weights, demonstrations (weights fitted to
    their score differences), the generic id, or a known id."""

    attributes: list[str]
    users: dict

    @abstractmethod
    def attribute_scores(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        """[n, k] scores in ``attributes`` order."""

    @abstractmethod
    def generic_weights(self) -> torch.Tensor:
        """[k] weights of the generic user (id 0)."""

    def weights_for(self, user: UserRef) -> torch.Tensor:
        """The user's weight vector over ``attributes``."""
        name = type(self).__name__
        if user.weights is not None:
            return torch.tensor(user.weights, dtype=torch.float64)
        if user.demonstrations is not None:
            demos = user.demonstrations
            prompts = [d.prompt for d in demos]
            diffs = (self.attribute_scores(prompts, [d.chosen for d in demos])
                     - self.attribute_scores(prompts, [d.rejected for d in demos]))
            return fit_weights(diffs).double()
        if user.is_generic:
            return self.generic_weights()
        if user.user_id not in self.users:
            raise UnknownUserError(f"{name}: unknown user id {user.user_id}; known: "
                                   f"{sorted(self.users)} and 0 (generic)")
        weights = self.users[user.user_id].weights
        outside = {a for a, w in weights.items() if w and a not in self.attributes}
        if outside:
            raise ValueError(f"{name}: user {user.user_id} weighs {sorted(outside)}, "
                             f"outside this reward's attributes {self.attributes}")
        return torch.tensor([weights.get(a, 0.0) for a in self.attributes], dtype=torch.float64)

    def _score(self, prompts, responses, user):
        return self.attribute_scores(prompts, responses) @ self.weights_for(user)
