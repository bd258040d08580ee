"""Simulated users of the seed papers: weight vectors over the world's attributes.

A user scores a response by ``w · scores`` over the response's latent attribute scores
(Liu 2024 §3.3.1). User ids start at 1; id 0 is the unknown / generic user (P-RLHF §4.1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

# UltraFeedback aspect order of the Dirichlet parameters in Liu 2024 §3.3.1 / Liu 2025 §3.3.1
# ("instruction-following, honesty, truthfulness, and helpfulness")
DIRICHLET_ASPECT_ORDER = ("instruction_following", "honesty", "truthfulness", "helpfulness")
UNIFORM_WEIGHTS = {aspect: 0.25 for aspect in DIRICHLET_ASPECT_ORDER}
CLUSTER_SPECS = (  # (group, size, Dirichlet concentration in DIRICHLET_ASPECT_ORDER)
    ("cluster1", 49, (2.5, 2.5, 2.5, 2.5)),
    ("cluster2", 30, (0.7, 0.3, 6.0, 3.0)),
    ("cluster3", 20, (7.5, 0.5, 1.2, 0.8)),
)


@dataclass
class User:
    """A simulated annotator: utility = sum of weight * latent score per attribute."""
    user_id: int
    weights: dict[str, float]
    text: str | None = None
    group: str = ""

    def __post_init__(self):
        if self.user_id < 1:
            raise ValueError(f"User.user_id must be >= 1 (0 is the unknown user), got {self.user_id}")
        if not self.weights:
            raise ValueError(f"User {self.user_id}: weights must name at least one attribute")

    def utility(self, scores: dict[str, float]) -> float:
        """The user's score of a response with attribute ``scores``."""
        try:
            return float(sum(w * scores[name] for name, w in self.weights.items()))
        except KeyError as err:
            raise KeyError(f"User {self.user_id} weighs attribute {err.args[0]!r}, "
                           f"missing from scores {sorted(scores)}") from None


def _dirichlet_users(rng: np.random.Generator, alpha, count: int, first_id: int,
                     group: str) -> list[User]:
    draws = rng.dirichlet(alpha, size=count)
    return [User(first_id + i, dict(zip(DIRICHLET_ASPECT_ORDER, map(float, w))), None, group)
            for i, w in enumerate(draws)]


def ultrafeedback_random(seed: int = 0) -> list[User]:
    """99 users from Dirichlet(1,1,1,1) plus the uniform user (id 100)."""
    rng = np.random.default_rng(seed)
    users = _dirichlet_users(rng, (1.0, 1.0, 1.0, 1.0), 99, 1, "random")
    return users + [User(100, dict(UNIFORM_WEIGHTS), None, "uniform")]


def ultrafeedback_cluster(seed: int = 0) -> list[User]:
    """49 / 30 / 20 users from the three cluster Dirichlets plus the uniform user (id 100)."""
    rng = np.random.default_rng(seed)
    users: list[User] = []
    for group, size, alpha in CLUSTER_SPECS:
        users += _dirichlet_users(rng, alpha, size, len(users) + 1, group)
    return users + [User(len(users) + 1, dict(UNIFORM_WEIGHTS), None, "uniform")]


def two_user_conflict() -> list[User]:
    """Liu 2025 §3.5.1: weights [1,0,0,0] vs [0,1,0,0] in its order (helpfulness, honesty, ...)."""
    zeros = {aspect: 0.0 for aspect in DIRICHLET_ASPECT_ORDER}
    return [User(1, {**zeros, "helpfulness": 1.0}, None, "helpfulness"),
            User(2, {**zeros, "honesty": 1.0}, None, "honesty")]


def length_conflict(n_annotators: int = 10, seed: int = 0) -> list[User]:
    """P-RLHF §5.1: a random 70% of annotators prefer longer responses, the other 30% shorter."""
    if n_annotators < 2:
        raise ValueError(f"length_conflict: n_annotators must be >= 2, got {n_annotators}")
    rng = np.random.default_rng(seed)
    n_short = round(0.3 * n_annotators)
    minority = set((rng.permutation(n_annotators)[:n_short] + 1).tolist())
    return [User(i, {"verbosity": -1.0}, None, "shorter") if i in minority
            else User(i, {"verbosity": 1.0}, None, "longer")
            for i in range(1, n_annotators + 1)]


class PSoupsProfile(NamedTuple):
    """One preference of P-Soups Table 4."""
    name: str           # P1A ... P3B
    dimension: str      # the paper's dimension: expertise / informativeness / style
    attribute: str      # the world attribute that measures it
    direction: float    # +1: more of the attribute is better, -1: less
    prompt: str         # Table 4 text
    instruction: str    # the same, as word-level text the world's tokenizer knows

    def as_user(self, user_id: int) -> User:
        return User(user_id, {self.attribute: self.direction}, self.instruction, self.name)


def psoups_profiles(extended: bool = False) -> list[PSoupsProfile]:
    """The six conflicting preferences of P-Soups Table 4 (user ids 1..6 in this order); with
    ``extended``, also the style preferences P3C (sassy) and P3D (sarcastic) of P-Soups §B.2
    (ids 7, 8), which the world shows only when built with ``extra_styles=True``."""
    rows = (
        ("P1A", "expertise", "expertise", -1.0,
         "Generate/Choose a response that can be easily understood by an elementary school student."),
        ("P1B", "expertise", "expertise", 1.0,
         "Generate/Choose a response that only a PhD Student in that specific field could understand."),
        ("P2A", "informativeness", "verbosity", -1.0,
         "Generate/Choose a response that is concise and to the point, without being verbose."),
        ("P2B", "informativeness", "verbosity", 1.0,
         "Generate/Choose a response that is very informative, without missing any background information."),
        ("P3A", "style", "style", 1.0,
         "Generate/Choose a response that is friendly, witty, funny, and humorous, like a close friend."),
        ("P3B", "style", "style", -1.0,
         "Generate/Choose a response (that answers) in an unfriendly manner."),
    )
    if extended:
        rows += (
            ("P3C", "style", "sass", 1.0,
             "Generate/Choose a response (that answers) in a sassy manner."),
            ("P3D", "style", "sarcasm", 1.0,
             "Generate/Choose a response (that answers) in a sarcastic manner."),
        )
    return [PSoupsProfile(name, dim, attr, direction, prompt, _word_level(prompt))
            for name, dim, attr, direction, prompt in rows]


def _word_level(prompt: str) -> str:
    """Table-4 text -> lowercase words and punctuation tokens ("Generate/Choose" -> generate)."""
    text = prompt.replace("Generate/Choose", "generate").replace("(that answers)", "that answers")
    for mark in ",.":
        text = text.replace(mark, f" {mark}")
    return " ".join(text.lower().split())


def psoups_users() -> list[User]:
    """The six P-Soups preferences as users 1..6 (in `psoups_profiles` order)."""
    return [profile.as_user(i + 1) for i, profile in enumerate(psoups_profiles())]


def psoups_profile(name: str) -> PSoupsProfile:
    """The profile called ``name`` (e.g. "P2B")."""
    for profile in psoups_profiles(extended=True):
        if profile.name == name:
            return profile
    raise ValueError(f"unknown P-Soups preference {name!r}; known: "
                     f"{[p.name for p in psoups_profiles(extended=True)]}")


def psoups_combinations(extended: bool = False) -> list[list[str]]:
    """The 8 combinations AAA, AAB, ..., BBB (one preference per dimension, P-Soups Table 4);
    ``extended``: the 16 of P-Soups §B.2 (style also C = sassy, D = sarcastic)."""
    styles = "ABCD" if extended else "AB"
    return [[f"P1{a}", f"P2{b}", f"P3{c}"] for a in "AB" for b in "AB" for c in styles]


# the text judge (rewards/text.py) that measures each P-Soups dimension on real text: a reading
# grade for expertise, words for informativeness, sentiment for style (P3C / P3D have none)
TEXT_ATTRIBUTES = {"expertise": "expertise", "informativeness": "verbosity", "style": "friendliness"}


def text_attribute(name: str) -> str:
    """The text judge of preference ``name``'s dimension ("P3A" -> "friendliness")."""
    profile = psoups_profile(name)
    if profile.attribute not in ("expertise", "verbosity", "style"):
        raise ValueError(f"preference {name!r} ({profile.attribute}) has no text judge; the text "
                         f"judges measure {sorted(TEXT_ATTRIBUTES)} (P1A-P3B)")
    return TEXT_ATTRIBUTES[profile.dimension]


def preference_table(names: list[str]) -> dict[str, tuple[str, int]]:
    """{preference: (world judge attribute, +1 / -1)} for the win-rate code."""
    return {name: (psoups_profile(name).attribute, int(psoups_profile(name).direction))
            for name in names}
