"""Greedy information-gain choice of few-shot demonstrations (Liu 2025 §3.3.1, eq. 5-7).

``choices[z, j]`` is the answer user z prefers most for question j (an index into that
question's responses). Users are equally likely and deterministic, so the information the
answers to a question set S carry about the user is the entropy of the partition of users
by their joint answers:

    I(Z; Q_S) = Σ_z p(z) · (−log p(a_z^S)),   p(a_z^S) = #users answering S as z does / |Z|

which is eq. 7 divided by |Z| (same argmax). Greedy: add the j maximizing I(Z; Q_{S∪{j}}).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _check(choices: np.ndarray) -> np.ndarray:
    choices = np.asarray(choices)
    if choices.ndim != 2 or choices.shape[0] < 1 or choices.shape[1] < 1:
        raise ValueError(f"choices must be [users, questions] with both >= 1, got {choices.shape}")
    if not np.issubdtype(choices.dtype, np.integer):
        raise ValueError(f"choices must hold integer answer indices, got dtype {choices.dtype}")
    return choices


def mutual_information(choices: np.ndarray, selected: Sequence[int]) -> float:
    """I(Z; Q_S) in nats for the question set ``selected`` (0 for the empty set)."""
    choices = _check(choices)
    if not len(selected):
        return 0.0
    _, inverse, counts = np.unique(choices[:, list(selected)], axis=0,
                                   return_inverse=True, return_counts=True)
    p_answer = counts[inverse.reshape(-1)] / choices.shape[0]
    return float(np.mean(-np.log(p_answer)))


def greedy_select(choices: np.ndarray, k: int,
                  candidates: Sequence[int] | None = None) -> list[int]:
    """k questions chosen greedily by information gain; ties go to the lowest index."""
    choices = _check(choices)
    pool = list(range(choices.shape[1])) if candidates is None else list(candidates)
    if not 0 < k <= len(pool):
        raise ValueError(f"greedy_select: k={k} must be in 1..{len(pool)} (the candidates)")
    selected: list[int] = []
    for _ in range(k):
        gains = [mutual_information(choices, selected + [j]) for j in pool]
        best = pool[int(np.argmax(gains))]
        selected.append(best)
        pool.remove(best)
    return selected


def random_select(n_questions: int, k: int, rng: np.random.Generator) -> list[int]:
    """The baseline: k distinct questions uniformly at random."""
    if not 0 < k <= n_questions:
        raise ValueError(f"random_select: k={k} must be in 1..{n_questions}")
    return rng.choice(n_questions, size=k, replace=False).tolist()


def heldout_prediction_accuracy(choices: np.ndarray, selected: Sequence[int]) -> float:
    """How well the answers on ``selected`` predict a user's other answers: for each user,
    the users answering ``selected`` the same way vote (majority) on every other question;
    the mean fraction of correct votes. A downstream check that more information helps."""
    choices = _check(choices)
    rest = [j for j in range(choices.shape[1]) if j not in set(selected)]
    if not rest:
        raise ValueError("heldout_prediction_accuracy: no question left out of the selection")
    key = choices[:, list(selected)] if len(selected) else np.zeros((choices.shape[0], 0), int)
    correct = []
    for z in range(choices.shape[0]):
        peers = np.all(key == key[z], axis=1)
        for j in rest:
            answers, counts = np.unique(choices[peers, j], return_counts=True)
            correct.append(answers[np.argmax(counts)] == choices[z, j])
    return float(np.mean(correct))
