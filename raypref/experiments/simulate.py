"""The simulate job (``jobs/simulate.py``): simulate the preference world's user populations and write them as parquet + jsonl shards.

    python jobs/simulate.py                          # every population, difficulty 0
    python jobs/simulate.py --difficulty 0.5 --populations '[psoups]'

Per population: ``<out>/<population>/shard-*.{parquet,jsonl}`` (train prompts),
``<out>/<population>_test/`` (held-out prompts), and ``<out>/analysis/<population>/`` with
per-user counts, the opinion-difference and similarity matrices and the mutual top-5 graph.
Everything is logged to one MLflow run.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raypref import atomic, tracking
from raypref.config import ConfigError
from raypref.data.analysis import plot_counts, sample_queries, write_population_analysis
from raypref.data.simulate import (POPULATIONS, population_users, simulate_population,
                                   user_counts, write_shards)
from raypref.data.world import World


@dataclass
class SimulateConfig:
    """Simulated preference data for every user population of the seed papers."""
    output_dir: str = "outputs/simulate"
    seed: int = 0
    difficulty: float = 0.0  # 0: attributes show cleanly; 1: weak, noisy markers + 25% label flips
    populations: list[str] = field(default_factory=lambda: list(POPULATIONS))
    pairs_per_user: int = 200            # each user of ultrafeedback_* and length_conflict
    conflict_pairs_per_user: int = 2000  # each of the two users of two_user_conflict
    pairs_per_preference: int = 1000     # each P-Soups preference P1A..P3B
    test_pairs_per_user: int = 20        # held-out pairs on test prompts, per user / preference
    length_annotators: int = 10          # 10 or 40 in P-RLHF §5.1
    shard_size: int = 5000
    analysis_queries: int = 95           # non-dominated test queries, as in Liu 2024 §3.3.1

    def __post_init__(self):
        unknown = sorted(set(self.populations) - set(POPULATIONS))
        if unknown:
            raise ConfigError(f"populations: unknown {unknown}; known: {list(POPULATIONS)}")
        for name in ("pairs_per_user", "conflict_pairs_per_user", "pairs_per_preference",
                     "shard_size", "analysis_queries", "length_annotators"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.test_pairs_per_user < 0:
            raise ConfigError(f"test_pairs_per_user must be >= 0, got {self.test_pairs_per_user}")
        if not 0.0 <= self.difficulty <= 1.0:
            raise ConfigError(f"difficulty must be in [0, 1], got {self.difficulty}")


def _pairs_per_user(cfg: SimulateConfig, population: str) -> int:
    return {"two_user_conflict": cfg.conflict_pairs_per_user,
            "psoups": cfg.pairs_per_preference}.get(population, cfg.pairs_per_user)


def run_simulate(cfg: SimulateConfig) -> dict:
    """Simulate, write and analyse every population of ``cfg``; returns the summary."""
    out = Path(cfg.output_dir)
    world = World(cfg.seed, cfg.difficulty)
    summary: dict = {"output_dir": str(out.resolve()), "populations": {}}
    with tracking.start_run("simulate", cfg, out) as mlflow_run:
        for population in cfg.populations:
            start = time.perf_counter()
            # one stream per population, so a population's data does not depend on the others chosen
            rng = np.random.default_rng([cfg.seed, POPULATIONS.index(population)])
            users = population_users(population, cfg.seed, cfg.length_annotators)
            n = _pairs_per_user(cfg, population)
            train = simulate_population(world, population, users, n, rng, "train")
            shards = write_shards(train, out / population, cfg.shard_size)
            test = (simulate_population(world, population, users, cfg.test_pairs_per_user, rng,
                                        "test") if cfg.test_pairs_per_user else [])
            if test:
                write_shards(test, out / f"{population}_test", cfg.shard_size)

            analysis_dir = out / "analysis" / population
            counts = user_counts(train)
            analysis_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(analysis_dir / "counts.json", json.dumps(counts, indent=1))
            plot_counts(counts, analysis_dir / "counts.png", f"{population}: pairs per user")
            queries = sample_queries(world, cfg.analysis_queries, rng)
            stats = write_population_analysis(users, queries, analysis_dir, population)

            metrics = {"pairs": len(train), "test_pairs": len(test), "users": len(users),
                       "shards": len(shards), "seconds": time.perf_counter() - start, **stats}
            tracking.log_metrics({f"{population}.{k}": v for k, v in metrics.items()})
            tracking.log_artifact(analysis_dir, f"analysis/{population}")
            summary["populations"][population] = metrics
            print(f"[simulate] {population}: {len(train)} train + {len(test)} test pairs "
                  f"from {len(users)} users in {metrics['seconds']:.1f}s -> {out / population}",
                  flush=True)
        atomic.write_text(out / "summary.json", json.dumps(summary, indent=1))
        tracking.log_artifact(out / "summary.json")
        summary["mlflow"] = tracking.run_url(mlflow_run)
    print(f"[simulate] done: data and plots under {out.resolve()}; {summary['mlflow']}")
    return summary
