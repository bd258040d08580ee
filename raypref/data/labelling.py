"""One labelling path for every arm of a preference experiment (P-Soups §2).

Every learner (each P-Soups preference, P-MORL's combinations, a later PPO reward) gets its
pairs the same way: the same candidate pairs (prompts and two responses, drawn from
``seed`` alone), the same label noise and the same budget ``n``; only *who labels* differs.
A labeller is any callable ``(prompt, response) -> reward`` (higher is better):

- `preference_labeller(["P1A"])`: one P-Soups preference's judge;
- `preference_labeller(["P1A", "P2B", "P3A"])`: P-MORL's combination, the mean of the
  per-preference rewards (P-Soups §2.2);
- a reward model: ``lambda prompt, response: rm(prompt, response.text)``.

The preference labellers read the *latent* scores, the truth the annotator sees; the text
shows them only as clearly as the world's difficulty allows. Candidates are independent of
the labeller, so a pair the labeller cannot order (equal rewards) is decided by a fair coin,
as a forced-choice annotator would, and counted in `LabelStats`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from raypref.data.records import UNKNOWN_USER, PreferenceRecord
from raypref.data.users import psoups_profile

# Judge score ranges, to put attributes on one 0..1 scale before averaging rewards.
ATTRIBUTE_RANGES = {"verbosity": (0.0, 1.0), "expertise": (0.0, 1.0), "style": (-1.0, 1.0),
                    "instruction_following": (1.0, 5.0), "honesty": (1.0, 5.0),
                    "truthfulness": (1.0, 5.0), "helpfulness": (1.0, 5.0),
                    "sass": (0.0, 1.0), "sarcasm": (0.0, 1.0)}
# attributes a "contrast" pair sets far apart in its two responses (the P-Soups dimensions)
CONTRAST_ATTRIBUTES = ("verbosity", "expertise", "style")
CONSTRUCTIONS = ("contrast", "random")

Labeller = Callable[[str, "object"], float]


@dataclass(frozen=True)
class CandidatePair:
    prompt: str
    first: object   # world.Response
    second: object


@dataclass
class LabelStats:
    """What labelling did: ``flipped`` by label noise, ``ties`` decided by a coin."""
    n: int = 0
    flipped: int = 0
    ties: int = 0


def preference_reward(name: str, scores: dict[str, float]) -> float:
    """The 0..1 reward P-Soups preference ``name`` gives a response with ``scores``."""
    profile = psoups_profile(name)
    lo, hi = ATTRIBUTE_RANGES[profile.attribute]
    unit = (scores[profile.attribute] - lo) / (hi - lo)
    return unit if profile.direction > 0 else 1.0 - unit


def preference_labeller(names: Sequence[str]) -> Labeller:
    """Mean reward of the preferences ``names`` over a response's latent scores."""
    names = list(names)
    if not names:
        raise ValueError("preference_labeller: names is empty")
    for name in names:
        psoups_profile(name)  # unknown names fail here, not in the middle of labelling

    def label(prompt: str, response) -> float:
        return float(np.mean([preference_reward(name, response.latent) for name in names]))
    return label


def _streams(seed) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent candidate and label streams of one seed (int or sequence of ints)."""
    candidates, labels = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(candidates), np.random.default_rng(labels)


def candidate_pairs(world, n: int, seed, construction: str = "contrast",
                    split: str = "train") -> list[CandidatePair]:
    """``n`` unlabelled pairs; the same (world, n, seed, construction, split) gives the same
    pairs whoever labels them.

    ``contrast``: both responses share every attribute but the P-Soups dimensions, each of
    which is set far apart with a random side (so any preference, or combination of them,
    finds the pair decisive, and the other dimensions carry no signal on average);
    ``random``: two independent responses.
    """
    if construction not in CONSTRUCTIONS:
        raise ValueError(f"construction={construction!r}: use one of {CONSTRUCTIONS}")
    if n < 0:
        raise ValueError(f"candidate_pairs: n must be >= 0, got {n}")
    rng, _ = _streams(seed)
    pool = world.prompt_pool(split)
    pairs = []
    for _ in range(n):
        prompt = pool[int(rng.integers(len(pool)))]
        if construction == "random":
            first, second = world.candidates(prompt, 2, rng)
        else:
            shared = world.sample_response(prompt, rng).latent
            a, b = dict(shared), dict(shared)
            for attribute in CONTRAST_ATTRIBUTES + tuple(getattr(world, "extra_styles", ())):
                high, low = world.clear_pair(attribute, rng)
                if rng.random() < 0.5:
                    high, low = low, high
                a[attribute], b[attribute] = high, low
            first = world.sample_response(prompt, rng, a)
            second = world.sample_response(prompt, rng, b)
        pairs.append(CandidatePair(prompt, first, second))
    return pairs


def label_pairs(world, pairs: Sequence[CandidatePair], labeller: Labeller, seed, *,
                instruction: str | None = None, user_id: int = UNKNOWN_USER,
                user_text: str | None = None, source: str = "world:labelled",
                stats: LabelStats | None = None) -> list[PreferenceRecord]:
    """Records of ``pairs`` ordered by ``labeller``, each flipped with probability
    ``world.label_noise``. The noise and tie draws come from ``seed``'s label stream, two per
    pair whatever happens, so arms with one seed flip the same pair positions.

    ``instruction`` is written after the prompt (P-MORL's combination text, or a soup's).
    """
    return _label(world, pairs, seed, lambda i: (labeller, instruction, user_text), user_id,
                  source, stats)


COMBINATION_SEP = "+"  # a P-MORL pair's user_text names its combination: "P1A+P2B+P3A"


def combination_instruction(user_text: str) -> str:
    """The instruction a chat-templated policy reads for the combination a P-MORL pair names
    ("P1A+P2B+P3A"): P-Soups Table 4's sentences, one per preference, as its system message."""
    names = [n for n in (user_text or "").split(COMBINATION_SEP) if n]
    if not names:
        raise ValueError(f"combination_instruction: {user_text!r} names no P-Soups preference "
                         f"(expected e.g. 'P1A{COMBINATION_SEP}P2B')")
    return " ".join(psoups_profile(name).prompt for name in names)  # an unknown name is an error naming it


def combination_labelled_pairs(world, pairs: Sequence[CandidatePair],
                               combinations: Sequence[Sequence[str]], seed, *,
                               source: str = "world:pmorl", instruction_in_prompt: bool = True,
                               stats: LabelStats | None = None) -> list[PreferenceRecord]:
    """P-MORL's pairs (P-Soups §2.2) from the same candidates as every other arm: pair i goes to
    combination ``i % len(combinations)``, named in its ``user_text``, whose mean reward labels
    it; noise and tie draws as in `label_pairs` with ``seed``. The combination's word-level
    instruction is written after the prompt; ``instruction_in_prompt=False`` leaves the prompt
    bare, for a chat-templated policy that reads `combination_instruction` as its system message."""
    if not combinations:
        raise ValueError("combination_labelled_pairs: no combinations")
    arms = [(preference_labeller(combo),
             world.preference_instruction(list(combo)) if instruction_in_prompt else None,
             COMBINATION_SEP.join(combo)) for combo in combinations]
    return _label(world, pairs, seed, lambda i: arms[i % len(arms)], UNKNOWN_USER, source, stats)


def weighted_labelled_pairs(world, pairs: Sequence[CandidatePair], preferences: Sequence[str],
                            weights: Sequence[Sequence[float]], seed, *, user_texts: Sequence[str],
                            source: str = "world:weighted",
                            stats: LabelStats | None = None) -> list[PreferenceRecord]:
    """P-MORL with its weights written out: pair i labelled by Σ_j weights[i][j] · reward of
    ``preferences[j]`` (each reward on 0..1, `preference_reward`), with ``user_texts[i]`` (the
    instruction stating those weights) as its user text; noise and tie draws as in `label_pairs`."""
    if not (len(pairs) == len(weights) == len(user_texts)):
        raise ValueError(f"weighted_labelled_pairs: {len(pairs)} pairs, {len(weights)} weight vectors and "
                         f"{len(user_texts)} user texts must be as many")
    for name in preferences:
        psoups_profile(name)
    bad = [i for i, w in enumerate(weights) if len(w) != len(preferences)]
    if bad:
        raise ValueError(f"weighted_labelled_pairs: weights[{bad[0]}]={list(weights[bad[0]])} needs one weight "
                         f"per preference {list(preferences)}")

    def arm(i: int):
        w = [float(x) for x in weights[i]]

        def label(prompt: str, response) -> float:
            return sum(wj * preference_reward(name, response.latent) for wj, name in zip(w, preferences))
        return label, None, user_texts[i]

    return _label(world, pairs, seed, arm, UNKNOWN_USER, source, stats)


def _label(world, pairs, seed, arm_of, user_id, source, stats) -> list[PreferenceRecord]:
    """``arm_of(i)`` -> (labeller, instruction, user_text) of pair i."""
    _, rng = _streams(seed)
    records = []
    for i, pair in enumerate(pairs):
        noise_draw, tie_draw = rng.random(2)
        labeller, instruction, user_text = arm_of(i)
        try:
            margin = float(labeller(pair.prompt, pair.first)) - float(labeller(pair.prompt, pair.second))
        except Exception as err:
            raise RuntimeError(f"label_pairs: the labeller failed on pair {i} "
                               f"(prompt {pair.prompt!r}): {err}") from err
        if not np.isfinite(margin):
            raise ValueError(f"label_pairs: the labeller gave a non-finite reward on pair {i}")
        tie = bool(margin == 0)
        first_wins = bool(tie_draw < 0.5) if tie else margin > 0
        flipped = bool(noise_draw < world.label_noise)
        if flipped:
            first_wins = not first_wins
        chosen, rejected = (pair.first, pair.second) if first_wins else (pair.second, pair.first)
        if stats is not None:
            stats.n, stats.flipped, stats.ties = stats.n + 1, stats.flipped + flipped, stats.ties + tie
        prompt = f"{pair.prompt} {instruction}" if instruction else pair.prompt
        records.append(PreferenceRecord(prompt, chosen.text, rejected.text, user_id, user_text,
                                        dict(chosen.latent), dict(rejected.latent), source))
    return records


def labelled_pairs(world, labeller: Labeller, n: int, seed, *, construction: str = "contrast",
                   split: str = "train", **label_kwargs) -> list[PreferenceRecord]:
    """`candidate_pairs` then `label_pairs`: ``n`` pairs of ``split`` labelled by ``labeller``."""
    pairs = candidate_pairs(world, n, seed, construction, split)
    return label_pairs(world, pairs, labeller, seed, **label_kwargs)

