"""Greedy information-gain selection of demonstrations (Liu 2025 eq. 5-7)."""
import numpy as np
import pytest

from raypref.algos.info_gain import (greedy_select, heldout_prediction_accuracy,
                                     mutual_information, random_select)


def test_mutual_information_is_partition_entropy():
    choices = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert mutual_information(choices, []) == 0.0
    assert mutual_information(choices, [0]) == pytest.approx(np.log(2))
    assert mutual_information(choices, [0, 1]) == pytest.approx(np.log(4))
    # eq. 7 (sum over users of -log(count/|Z|)) is |Z| times this
    skew = np.array([[0], [0], [0], [1]])
    eq7 = -3 * np.log(3 / 4) - np.log(1 / 4)
    assert mutual_information(skew, [0]) * 4 == pytest.approx(eq7)


def test_greedy_picks_the_most_informative_question():
    # q0: everyone agrees; q1: 7 vs 1; q2: an even split; q3 duplicates q2
    choices = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1],
                        [0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]])
    first = greedy_select(choices, 1)
    assert first == [2]
    # after q2, q3 adds nothing; q1 splits a group
    assert greedy_select(choices, 2) == [2, 1]


def test_greedy_beats_random_in_expectation():
    rng = np.random.default_rng(0)
    n_users, n_q = 60, 40
    groups = rng.integers(0, 6, size=n_users)
    # half the questions are consensus (little information), half follow the user's group
    prefs = rng.integers(0, 4, size=(6, n_q))
    choices = prefs[groups]
    choices[:, :20] = 0
    noise = rng.random(choices.shape) < 0.05
    choices[noise] = rng.integers(0, 4, size=noise.sum())
    k = 3
    greedy = greedy_select(choices, k, candidates=range(30))
    random_mi = [mutual_information(choices, random_select(30, k, rng)) for _ in range(200)]
    assert mutual_information(choices, greedy) > np.mean(random_mi) + 0.3
    random_acc = [heldout_prediction_accuracy(choices, random_select(30, k, rng)) for _ in range(30)]
    assert heldout_prediction_accuracy(choices, greedy) > np.mean(random_acc)


def test_bad_inputs():
    with pytest.raises(ValueError, match="integer"):
        mutual_information(np.zeros((2, 2)), [0])
    with pytest.raises(ValueError, match="k=5"):
        greedy_select(np.zeros((2, 3), int), 5)
