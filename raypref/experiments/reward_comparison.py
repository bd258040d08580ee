"""The reward-model comparison of Liu 2025 Tables 2-4 (``jobs/reward_compare.py``): arms (BT, VAE,
VAE + adaptive sampling, VAE + contrastive, VAE + PCGrad; the user-model RM of P-RLHF on request)
× seeds, each trained by the reward
job's experiment with its settings, summarized as mean ± std test accuracy, the number of runs
that converged (final accuracy > 0.6), the steps to reach 95% of the final accuracy, the worst
user's accuracy and the wall time of a run. Writes <output_dir>/comparison.md and
comparison.json; the table's last row is the world judge's own accuracy on the same test pairs
(a reference, not a bound). Each finished run's curve is kept under <output_dir>/runs/, so a
killed comparison (or one run arm by arm) picks up the runs it already has.

``--data.source pool`` runs the same table on real text: the shared candidate pool of a base
LM labelled by the text judges (recipes/pool.py, recipes/reward_data.py `pool_pairs`;
configs/reward-compare-smollm2.yaml).

Measured tables: docs/RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raypref import atomic
from raypref.experiments.reward import RewardJobConfig, run_name, train_reward
from raypref.recipes.reward_data import POOL, judge_reference

# every arm names all four knobs, so a base config's own choice never leaks into an arm
ARMS: dict[str, dict] = {
    "BT": dict(method="bt", sampling="uniform", contrastive=0.0, gradient="sum"),
    "VAE": dict(method="vae", sampling="uniform", contrastive=0.0, gradient="sum"),
    "VAE+adaptive": dict(method="vae", sampling="adaptive", contrastive=0.0, gradient="sum"),
    "VAE+contrastive": dict(method="vae", sampling="uniform", contrastive=0.5, gradient="sum"),
    "VAE+PCGrad": dict(method="vae", sampling="uniform", contrastive=0.0, gradient="pcgrad"),
    "UserModel": dict(method="user_model", sampling="uniform", contrastive=0.0, gradient="sum"),
}
DEFAULT_ARMS = ["BT", "VAE", "VAE+adaptive", "VAE+contrastive", "VAE+PCGrad"]
CONVERGED = 0.6
METRIC = "eval.acc.mean"


def accuracy_curve(history: list[dict], metric: str = METRIC) -> list[tuple[int, float]]:
    """(step, accuracy) of every evaluation in a run's metrics history."""
    return [(int(row["step"]), float(row[metric])) for row in history if metric in row]


def steps_to_fraction(curve: list[tuple[int, float]], fraction: float = 0.95) -> int:
    """The first evaluated step whose accuracy reaches ``fraction`` of the final one."""
    if not curve:
        raise ValueError("steps_to_fraction: the run has no evaluation")
    final = curve[-1][1]
    return next(step for step, acc in curve if acc >= fraction * final)


def summarize(runs: dict[str, list[list[dict]]], seconds: dict[str, list[float]] | None = None
              ) -> list[dict]:
    """One row per arm from its runs' histories (one list of metric rows per seed)."""
    rows = []
    for arm, histories in runs.items():
        curves = [accuracy_curve(h) for h in histories]
        finals = np.array([c[-1][1] for c in curves])
        steps = np.array([steps_to_fraction(c) for c in curves])
        rows.append({"arm": arm, "runs": len(curves), "acc_mean": float(finals.mean()),
                     "acc_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
                     "converged": int((finals > CONVERGED).sum()),
                     "steps95_mean": float(steps.mean()),
                     "steps95_std": float(steps.std(ddof=1)) if len(steps) > 1 else 0.0,
                     "min_user_acc": float(np.mean([h_min(h) for h in histories])),
                     "seconds_per_run": float(np.mean(seconds[arm])) if seconds else float("nan")})
    return rows


def h_min(history: list[dict]) -> float:
    """The final accuracy of the worst-served user."""
    return accuracy_curve(history, "eval.acc.min")[-1][1]


def format_table(rows: list[dict], reference: dict[str, float] | None = None,
                 judge: str = "world judge") -> str:
    """A markdown table like Liu 2025 Tables 2-4; ``reference`` (`recipes.reward_data.judge_reference`)
    adds the world judge's own accuracy on the same pairs as a last row."""
    lines = ["| arm | test acc (mean ± std) | converged (acc > 0.6) | steps to 95% of final "
             "| worst user acc | s / run |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | "
                     f"{r['converged']}/{r['runs']} | {r['steps95_mean']:.0f} ± "
                     f"{r['steps95_std']:.0f} | {r['min_user_acc']:.3f} | "
                     f"{r['seconds_per_run']:.0f} |")
    if reference:
        lines.append(f"| {judge}, true weights (reference) | {reference['mean']:.3f} | – | – | "
                     f"{reference['min']:.3f} | – |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the comparison job

@dataclass
class RewardCompareConfig(RewardJobConfig):
    arms: list[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "outputs/reward_compare"

    def validate(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"arms={self.arms!r}: pick from {list(ARMS)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r}: must be distinct and not empty")
        for arm in self.arms:  # every arm's config must be valid before any training
            arm_config(self, arm, self.seeds[0]).validate()


def arm_config(cfg: RewardCompareConfig, arm: str, seed: int) -> RewardJobConfig:
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RewardJobConfig)}
    return RewardJobConfig(**{**base, **ARMS[arm], "seed": seed})


def run_comparison(cfg: RewardCompareConfig) -> list[dict]:
    """Train every arm x seed, then write and print the table; returns its rows."""
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in cfg.arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in cfg.arms}
    out = Path(cfg.output_dir)
    for arm in cfg.arms:
        for seed in cfg.seeds:
            run_cfg = arm_config(cfg, arm, seed)
            kept = out / "runs" / f"{run_name(run_cfg)}.json"  # the name hashes every setting
            if kept.exists():
                saved = json.loads(kept.read_text())
                print(f"[reward_compare] {arm} seed {seed}: finished before ({kept})", flush=True)
            else:
                print(f"[reward_compare] {arm} seed {seed}", flush=True)
                start = time.perf_counter()
                saved = {"history": train_reward(run_cfg).metrics, "seconds": time.perf_counter() - start}
                atomic.write_text(kept, json.dumps(saved))
            seconds[arm].append(saved["seconds"])
            runs[arm].append(saved["history"])
    rows = summarize(runs, seconds)
    reference = judge_reference(cfg.data, cfg.eval_pairs_per_user) if cfg.data.has_judge else None
    table = format_table(rows, reference, "text judges" if cfg.data.source == POOL else "world judge")
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "comparison.md", table + "\n")
    atomic.write_text(out / "comparison.json", json.dumps(
        {"rows": rows, "judge_reference": reference, "config": dataclasses.asdict(cfg)},
        indent=1, default=str))
    print(table)
    return rows
