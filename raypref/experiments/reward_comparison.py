"""The reward-model comparison of 001 Tables 2-4: arms (BT, VAE, VAE + adaptive sampling,
VAE + contrastive, VAE + PCGrad) × seeds, summarized as mean ± std test accuracy, the number
of runs that converged (final accuracy > 0.6) and the steps to reach 95% of the final
accuracy. Training is `jobs/reward_compare.py`'s; this file holds the arms and the table.
"""
from __future__ import annotations

import numpy as np

# every arm names all four knobs, so a base config's own choice never leaks into an arm
ARMS: dict[str, dict] = {
    "BT": dict(method="bt", sampling="uniform", contrastive=0.0, gradient="sum"),
    "VAE": dict(method="vae", sampling="uniform", contrastive=0.0, gradient="sum"),
    "VAE+adaptive": dict(method="vae", sampling="adaptive", contrastive=0.0, gradient="sum"),
    "VAE+contrastive": dict(method="vae", sampling="uniform", contrastive=0.5, gradient="sum"),
    "VAE+PCGrad": dict(method="vae", sampling="uniform", contrastive=0.0, gradient="pcgrad"),
}
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


def format_table(rows: list[dict], reference: dict[str, float] | None = None) -> str:
    """A markdown table like 001 Tables 2-4; ``reference`` (`recipes.reward_data.judge_reference`)
    adds the world judge's own accuracy on the same pairs as a last row."""
    lines = ["| arm | test acc (mean ± std) | converged (acc > 0.6) | steps to 95% of final "
             "| worst user acc | s / run |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f} | "
                     f"{r['converged']}/{r['runs']} | {r['steps95_mean']:.0f} ± "
                     f"{r['steps95_std']:.0f} | {r['min_user_acc']:.3f} | "
                     f"{r['seconds_per_run']:.0f} |")
    if reference:
        lines.append(f"| world judge, true weights (reference) | {reference['mean']:.3f} | – | – | "
                     f"{reference['min']:.3f} | – |")
    return "\n".join(lines)
