"""User-similarity analysis, shard writing and the simulate job end to end (tiny config)."""
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest

from raypref.config import ConfigError, parse_args
from raypref.data.analysis import (mutual_top_k_edges, opinion_difference_matrix,
                                   preference_vectors, sample_queries, similarity_matrix)
from raypref.data.records import ROW_COLUMNS
from raypref.data.simulate import (POPULATIONS, population_users, read_shards, simulate_population,
                                   user_counts, write_shards)
from raypref.data.users import User, ultrafeedback_cluster
from raypref.data.world import ASPECTS, World

REPO = Path(__file__).resolve().parents[1]


def _load_job():
    import raypref.experiments.simulate as job

    return job


@pytest.fixture(scope="module")
def queries():
    return sample_queries(World(0), 40, np.random.default_rng(0))


def test_queries_are_mutually_non_dominated(queries):
    for query in queries:
        table = np.array([[s[a] for a in ASPECTS] for s in query])
        for i in range(4):
            for j in range(4):
                assert i == j or not np.all(table[i] >= table[j]) or np.all(table[i] == table[j])


def test_similarity_matrix_is_symmetric_and_finds_identical_users(queries):
    users = ultrafeedback_cluster(0)[:12]
    twin = User(99, dict(users[0].weights), None, "twin")
    users = users + [twin]
    sim = similarity_matrix(preference_vectors(users, queries))
    assert sim.shape == (13, 13)
    np.testing.assert_allclose(sim, sim.T)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    assert sim.min() >= -1 and sim.max() <= 1
    assert sim[0, 12] == pytest.approx(1.0)
    diff = opinion_difference_matrix(users, queries)
    assert diff[0, 12] == 0 and np.all(np.diag(diff) == 0)
    np.testing.assert_array_equal(diff, diff.T)
    # opposite tastes disagree on (almost) every pair of candidates
    a = User(1, {"honesty": 1.0})
    b = User(2, {"honesty": -1.0})
    assert similarity_matrix(preference_vectors([a, b], queries))[0, 1] == pytest.approx(-1.0)


def test_difference_counts_queries_with_different_best_choice():
    query = [{"honesty": 5.0, "helpfulness": 1.0}, {"honesty": 1.0, "helpfulness": 5.0}]
    honest, helpful = User(1, {"honesty": 1.0}), User(2, {"helpfulness": 1.0})
    diff = opinion_difference_matrix([honest, helpful], [query, query, list(reversed(query))])
    assert diff[0, 1] == 3


def test_mutual_top_k_edges_need_both_directions():
    sim = np.array([[1.0, 0.9, 0.1, 0.0],
                    [0.9, 1.0, 0.8, 0.0],
                    [0.1, 0.8, 1.0, 0.7],
                    [0.0, 0.0, 0.7, 1.0]])
    # node 2's top-1 is 1, node 1's top-1 is 0: only (0, 1) is mutual
    assert sorted(mutual_top_k_edges(sim, k=1)) == [(0, 1)]
    assert sorted(mutual_top_k_edges(sim, k=2)) == [(0, 1), (1, 2), (2, 3)]
    assert len(mutual_top_k_edges(sim, k=5)) == 6  # k >= n-1: everyone is linked


def test_write_shards_round_trips_parquet_and_jsonl(tmp_path):
    world = World(0)
    records = world.pairs_for_preference("P2A", 25, np.random.default_rng(0))
    paths = write_shards(records, tmp_path, shard_size=10)
    assert [p.name for p in paths] == ["shard-00000.parquet", "shard-00001.parquet",
                                       "shard-00002.parquet"]
    for fmt in ("parquet", "jsonl"):
        back = read_shards(tmp_path, fmt)
        assert [r.to_row() for r in back] == [r.to_row() for r in records]
    write_shards(records[:5], tmp_path, shard_size=10)  # a rerun replaces old shards
    assert len(read_shards(tmp_path)) == 5
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(records, tmp_path, shard_size=0)


def test_population_registry_builds_users_and_names_the_known():
    # the order seeds the simulate job's rngs: changing it would change every data set
    assert POPULATIONS == ("ultrafeedback_random", "ultrafeedback_cluster", "two_user_conflict",
                           "length_conflict", "psoups")
    assert [u.group for u in population_users("psoups")] == ["P1A", "P1B", "P2A", "P2B", "P3A", "P3B"]
    assert [u.user_id for u in population_users("length_conflict", seed=1, n_annotators=4)] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"unknown population 'martians'; known: \['ultrafeedback_random', "):
        population_users("martians")
    with pytest.raises(ValueError, match="unknown population 'martians'"):
        simulate_population(World(0), "martians", [], 1, np.random.default_rng(0))


def test_each_population_draws_pairs_its_own_way():
    world, rng = World(0), np.random.default_rng(0)
    helpful, honest = population_users("two_user_conflict")
    conflict = simulate_population(world, "two_user_conflict", [helpful, honest], 3, rng)
    for record in conflict:  # both users order every pair oppositely (Liu 2025 §3.5.1)
        user, other = (helpful, honest) if record.user_id == 1 else (honest, helpful)
        assert user.utility(record.chosen_scores) > user.utility(record.rejected_scores)
        assert other.utility(record.chosen_scores) < other.utility(record.rejected_scores)
    psoups = simulate_population(world, "psoups", population_users("psoups")[:2], 2, rng)
    assert [r.source for r in psoups] == ["world:psoups:P1A"] * 2 + ["world:psoups:P1B"] * 2
    assert [r.user_id for r in psoups] == [1, 1, 2, 2]


def test_simulate_job_writes_valid_shards_plots_and_metrics(tmp_path):
    job = _load_job()
    cfg = parse_args(job.SimulateConfig, [
        "--output_dir", str(tmp_path / "out"), "--pairs_per_user", "3",
        "--conflict_pairs_per_user", "5", "--pairs_per_preference", "4",
        "--test_pairs_per_user", "1", "--analysis_queries", "8", "--shard_size", "100",
        "--difficulty", "0.2"])
    summary = job.run_simulate(cfg)
    out = tmp_path / "out"
    expected_users = {"ultrafeedback_random": 100, "ultrafeedback_cluster": 100,
                      "two_user_conflict": 2, "length_conflict": 10, "psoups": 6}
    per_user = {"two_user_conflict": 5, "psoups": 4}
    for population in POPULATIONS:
        n_users = expected_users[population]
        parquet = sorted((out / population).glob("shard-*.parquet"))
        jsonl = sorted((out / population).glob("shard-*.jsonl"))
        assert len(parquet) == len(jsonl) >= 1
        records = read_shards(out / population)
        assert [r.to_row() for r in records] == \
            [r.to_row() for r in read_shards(out / population, "jsonl")]
        counts = user_counts(records)
        assert counts == {uid: per_user.get(population, 3) for uid in range(1, n_users + 1)}
        assert json.loads((out / "analysis" / population / "counts.json").read_text()) == \
            {str(k): v for k, v in counts.items()}
        assert len(read_shards(out / f"{population}_test")) == n_users
        for plot in ("counts", "difference", "similarity", "neighbours"):
            assert (out / "analysis" / population / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
        sim = np.load(out / "analysis" / population / "similarity.npy")
        assert sim.shape == (n_users, n_users)
        assert summary["populations"][population]["pairs"] == len(records)
    first = read_shards(out / "psoups")[0].to_row()
    assert tuple(first) == ROW_COLUMNS and first["user_text"]

    run = mlflow.search_runs(experiment_names=["raypref-simulate"], output_format="list")[0]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["psoups.pairs"] == 24
    assert run.data.metrics["two_user_conflict.pairs"] == 10


def test_simulate_config_rejects_bad_values():
    job = _load_job()
    with pytest.raises(ConfigError, match="populations"):
        parse_args(job.SimulateConfig, ["--populations", "[martians]"])
    with pytest.raises(ConfigError, match="difficulty"):
        parse_args(job.SimulateConfig, ["--difficulty", "2.0"])
    cfg = parse_args(job.SimulateConfig, ["--populations", "[psoups]", "--seed", "3"])
    assert cfg.populations == ["psoups"] and cfg.seed == 3
