"""User populations of the seed papers."""
import numpy as np
import pytest

from raypref.data.users import (DIRICHLET_ASPECT_ORDER, CLUSTER_SPECS, User, length_conflict,
                                psoups_combinations, psoups_profiles, two_user_conflict,
                                ultrafeedback_cluster, ultrafeedback_random)


def _weights(users):
    return np.array([[u.weights[a] for a in DIRICHLET_ASPECT_ORDER] for u in users])


@pytest.mark.parametrize("make", [ultrafeedback_random, ultrafeedback_cluster])
def test_ultrafeedback_populations_have_100_users_on_the_simplex(make):
    users = make(0)
    assert [u.user_id for u in users] == list(range(1, 101))
    np.testing.assert_allclose(_weights(users).sum(axis=1), 1.0)
    assert users[-1].group == "uniform"
    np.testing.assert_allclose(_weights(users[-1:]), 0.25)
    assert _weights(make(0)).tolist() == _weights(users).tolist()  # seeded
    assert _weights(make(1)).tolist() != _weights(users).tolist()


def test_random_population_has_the_dirichlet_one_mean():
    users = ultrafeedback_random(0)[:99]
    assert {u.group for u in users} == {"random"}
    np.testing.assert_allclose(_weights(users).mean(axis=0), 0.25, atol=0.06)


def test_cluster_population_groups_have_their_dirichlet_means_in_the_paper_order():
    users = ultrafeedback_cluster(0)
    for group, size, alpha in CLUSTER_SPECS:
        members = [u for u in users if u.group == group]
        assert len(members) == size
        expected = np.array(alpha) / sum(alpha)
        np.testing.assert_allclose(_weights(members).mean(axis=0), expected, atol=0.1)
    # Liu 2024 §3.3.1 order: instruction-following, honesty, truthfulness, helpfulness
    cluster2 = [u for u in users if u.group == "cluster2"]
    assert np.argmax(_weights(cluster2).mean(axis=0)) == DIRICHLET_ASPECT_ORDER.index("truthfulness")
    cluster3 = [u for u in users if u.group == "cluster3"]
    assert np.argmax(_weights(cluster3).mean(axis=0)) == \
        DIRICHLET_ASPECT_ORDER.index("instruction_following")


def test_two_user_conflict_is_helpfulness_against_honesty():
    first, second = two_user_conflict()
    assert (first.user_id, second.user_id) == (1, 2)
    assert first.weights["helpfulness"] == 1 and sum(first.weights.values()) == 1
    assert second.weights["honesty"] == 1 and sum(second.weights.values()) == 1


@pytest.mark.parametrize("n", [10, 40])
def test_length_conflict_is_seventy_thirty(n):
    users = length_conflict(n, seed=0)
    longer = [u for u in users if u.weights["verbosity"] > 0]
    shorter = [u for u in users if u.weights["verbosity"] < 0]
    assert (len(longer), len(shorter)) == (round(0.7 * n), round(0.3 * n))
    assert {u.group for u in shorter} == {"shorter"}
    assert [u.user_id for u in users] == list(range(1, n + 1))
    with pytest.raises(ValueError, match="n_annotators"):
        length_conflict(1)


def test_utility_is_the_weighted_sum_and_names_missing_scores():
    user = User(3, {"honesty": 0.5, "helpfulness": 2.0})
    assert user.utility({"honesty": 4.0, "helpfulness": 1.0, "style": 9.0}) == 4.0
    with pytest.raises(KeyError, match="helpfulness"):
        user.utility({"honesty": 4.0})
    with pytest.raises(ValueError, match="user_id"):
        User(0, {"honesty": 1.0})


def test_psoups_profiles_are_three_dimensions_of_opposite_pairs():
    profiles = psoups_profiles()
    assert [p.name for p in profiles] == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    for a, b in zip(profiles[::2], profiles[1::2]):
        assert a.attribute == b.attribute and a.direction == -b.direction
    assert profiles[0].prompt.startswith("Generate/Choose") and "elementary" in profiles[0].prompt
    for p in profiles:
        assert p.instruction == p.instruction.lower() and "/" not in p.instruction
        assert p.as_user(7).weights == {p.attribute: p.direction}


def test_psoups_combinations_are_the_eight_aaa_to_bbb():
    combos = psoups_combinations()
    assert len(combos) == 8 and len({tuple(c) for c in combos}) == 8
    assert combos[0] == ["P1A", "P2A", "P3A"] and combos[1] == ["P1A", "P2A", "P3B"]
    assert combos[-1] == ["P1B", "P2B", "P3B"]
    assert all([c[0][:2], c[1][:2], c[2][:2]] == ["P1", "P2", "P3"] for c in combos)
