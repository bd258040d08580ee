"""The simulated world's judges as rewards: the one home of every reward read from `World.judge`.

* `WorldJudgeReward`: the per-user reward interface (`rewards.base.RewardFunction`);
* `WeightedJudgeReward`: a frozen PPO reward role, Σ_a weight_a · judge_a (weights fixed, or per prompt);
* `WorldObjectives`: a multi-objective reward on a 0..1 scale for RSF's v·r.

A user's reward is ``w · judge(text, prompt)`` over the attribute scores the world reads from
the response text. Users by id come from a population (e.g. `users.two_user_conflict()`);
id 0 is the generic user with uniform aspect weights (`users.UNIFORM_WEIGHTS`); a weight
vector weighs ``attributes`` in order; demonstrations give weights fitted by BT likelihood
on the judged score differences of the chosen vs rejected responses.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from raypref.data.labelling import ATTRIBUTE_RANGES
from raypref.data.users import DIRICHLET_ASPECT_ORDER, UNIFORM_WEIGHTS, User
from raypref.data.world import ATTRIBUTES, World
from raypref.rewards.base import JudgeWeightedReward


class WorldJudgeReward(JudgeWeightedReward):
    def __init__(self, world: World, users: Sequence[User] = (),
                 attributes: Sequence[str] = DIRICHLET_ASPECT_ORDER):
        unknown = set(attributes) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"WorldJudgeReward: unknown attribute(s) {sorted(unknown)}; "
                             f"the world judges {ATTRIBUTES}")
        self.world, self.attributes = world, tuple(attributes)
        self.users = {u.user_id: u for u in users}
        if len(self.users) != len(users):
            raise ValueError("WorldJudgeReward: duplicate user ids in users")

    def attribute_scores(self, prompts, responses) -> torch.Tensor:
        """[n, len(ATTRIBUTES judged)] judged scores in ``self.attributes`` order."""
        return torch.tensor([[self.world.judge(r, p)[a] for a in self.attributes]
                             for p, r in zip(prompts, responses)], dtype=torch.float64)

    def generic_weights(self) -> torch.Tensor:
        return torch.tensor([UNIFORM_WEIGHTS.get(a, 0.0) for a in self.attributes], dtype=torch.float64)


class WeightedJudgeReward(nn.Module):
    """Reward = Σ_a weight_a · judge_a(response) from the simulated world's attribute judges; with
    ``per_prompt``, each prompt has its own weights (P-MORL: those of the combination it names),
    keyed by (prompt, system text or None): a chat-templated P-MORL policy reads the same bare
    prompt under each combination's instruction, given in its system message."""

    def __init__(self, weights: dict[str, float], world_seed: int = 0,
                 per_prompt: dict[tuple[str, str | None], dict[str, float]] | None = None):
        super().__init__()
        for w in ([weights] if per_prompt is None else per_prompt.values()):
            unknown = sorted(set(w) - set(ATTRIBUTES))
            if not w or unknown:
                raise ValueError(f"WeightedJudgeReward: weights {w} must name attributes of {ATTRIBUTES}")
        self.weights, self.per_prompt, self.world = dict(weights), per_prompt, World(seed=world_seed)

    def _weights(self, prompt: str, system: str | None) -> dict[str, float]:
        if self.per_prompt is None:
            return self.weights
        if (prompt, system) not in self.per_prompt:
            shown = f" with system text {system[:60]!r}" if system is not None else ""
            raise ValueError(f"WeightedJudgeReward: no weights for prompt {prompt!r}{shown} (per_prompt "
                             f"has {len(self.per_prompt)} prompts)")
        return self.per_prompt[(prompt, system)]

    def score(self, prompts: Sequence[str], responses: Sequence[str],
              systems: Sequence[str | None] | None = None) -> torch.Tensor:
        """One reward per response; ``systems``: the system text each prompt was shown with."""
        systems = [None] * len(prompts) if systems is None else systems
        judged = [(self._weights(p, s), self.world.judge(r, p)) for p, r, s in zip(prompts, responses, systems)]
        return torch.tensor([sum(w * s[a] for a, w in weights.items()) for weights, s in judged])


# DPA §3.1 takes "helpfulness" as the mean of UltraFeedback's four ratings; the world judges the
# same four aspects. Unlike the world's single helpfulness rating (marker words, steps of 0.25 on
# the 0..1 scale) the mean is graded, so v·r can trade it against length a little at a time.
OVERALL_HELPFULNESS = "overall_helpfulness"
DERIVED_OBJECTIVES = {OVERALL_HELPFULNESS: ("instruction_following", "honesty", "truthfulness", "helpfulness")}


def objective_ranges() -> dict[str, tuple[float, float]]:
    """Every objective WorldObjectives can score and its judged range."""
    return {**ATTRIBUTE_RANGES, OVERALL_HELPFULNESS: (1.0, 5.0)}


def judge_objectives(world, response: str, prompt: str) -> dict[str, float]:
    """The world's judged scores of ``response``, plus the derived objectives."""
    scores = world.judge(response, prompt)
    for name, parts in DERIVED_OBJECTIVES.items():
        scores[name] = sum(scores[p] for p in parts) / len(parts)
    return scores


# DPA §3.1 builds on helpfulness and verbosity rewards that correlate positively (Singhal et al.:
# reward models favour longer answers), which is why it samples only v2 <= 0. The world's judged
# helpfulness barely tracks length (correlation -0.2..+0.1 on the SFT policy's samples), so the
# reward model's length bias is modelled: helpfulness' = (1 - b) helpfulness + b length.
HELPFULNESS_OBJECTIVES = ("helpfulness", OVERALL_HELPFULNESS)


class WorldObjectives(nn.Module):
    """The simulated world's judges as a multi-objective reward: ``score_objectives`` gives each
    objective on a 0..1 scale (data.labelling.ATTRIBUTE_RANGES), so v·r weighs them alike.

    ``helpfulness_length_bias`` b: a helpfulness objective reads (1 - b) × judged + b × length,
    length = words / (the word count where the verbosity judge reads 1), clipped to [0, 1]; the
    length bias DPA's reward model has and the world's judge lacks (HELPFULNESS_OBJECTIVES).

    ``verbosity_by_length``: verbosity reads words / (the word count where the judge reads 1),
    clipped to [0, 1]. The world's judge reads 0 for anything shorter than its one-sentence
    response (~62 words), which is where a small policy's conditioned answers fall; there v·r
    would rank by helpfulness alone and a direction could not ask for shorter answers."""

    def __init__(self, objectives: list[str], world_seed: int = 0, verbosity_by_length: bool = False,
                 helpfulness_length_bias: float = 0.0):
        super().__init__()
        if not 0.0 <= helpfulness_length_bias < 1.0:
            raise ValueError(f"WorldObjectives: helpfulness_length_bias={helpfulness_length_bias} must be in [0, 1)")

        ranges = objective_ranges()
        unknown = [o for o in objectives if o not in ranges]
        if not objectives or unknown:
            raise ValueError(f"WorldObjectives: objectives {objectives} must name judged attributes "
                             f"{sorted(ranges)}")
        self.objectives, self.world = list(objectives), World(seed=world_seed)
        self.ranges = [ranges[o] for o in objectives]
        self.verbosity_by_length = verbosity_by_length
        self.helpfulness_length_bias = helpfulness_length_bias

    def score_objectives(self, prompts, responses) -> torch.Tensor:
        judged = [judge_objectives(self.world, r, p) for p, r in zip(prompts, responses)]
        one = self.world.verbosity_words()[1]
        if self.verbosity_by_length and "verbosity" in self.objectives:
            for scores, response in zip(judged, responses):
                scores["verbosity"] = min(len(response.split()) / one, 1.0)
        unit = torch.tensor([[(s[o] - lo) / (hi - lo) for o, (lo, hi) in zip(self.objectives, self.ranges)]
                             for s in judged])
        b = self.helpfulness_length_bias
        if b:
            length = torch.tensor([min(len(r.split()) / one, 1.0) for r in responses])
            for i, name in enumerate(self.objectives):
                if name in HELPFULNESS_OBJECTIVES:
                    unit[:, i] = (1 - b) * unit[:, i] + b * length
        return unit
