"""The reward-model comparison table (001 Tables 2-4): each arm × each seed trained with
jobs/reward.py's settings, then mean ± std test accuracy, converged runs (acc > 0.6), steps
to 95% of the final accuracy, the worst user's accuracy and the wall time of a run.

    python jobs/reward_compare.py [--arms '[BT, VAE]'] [--seeds '[0, 1, 2]']
        [--training.steps 200] [--data.difficulty 0.1] ...   (any jobs/reward.py flag)

Writes <output_dir>/comparison.md and comparison.json and prints the table; its last row is
the world judge's own accuracy on the same test pairs (a reference, not a bound).

The issue-8 table (fine-tuned MiniLM, 200 steps, 3 seeds) was run at difficulty 0.1 with the
fresh parts at lr 1e-3 (``--head_lr 1e-3 --data.difficulty 0.1``, now jobs/reward.py's
defaults). Mean test accuracy over 3 seeds: BT 0.505, VAE 0.500, VAE + adaptive 0.905,
VAE + contrastive 0.953, VAE + PCGrad 0.512; the world judge's reference 0.912. The plain VAE
(and PCGrad on it) scored both users as one in every seed; with the contrastive loss, or with
adaptive sampling (later in training), it told them apart. With every part at 1e-4 the plain
VAE stayed at chance even on the clean world; at difficulty 0.25 even VAE + contrastive still
scored both users as one after 100 steps.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.reward import RewardJobConfig, train  # noqa: E402
from raypref import atomic  # noqa: E402
from raypref.config import parse_args  # noqa: E402
from raypref.experiments.reward_comparison import ARMS, format_table, summarize  # noqa: E402
from raypref.recipes.reward_data import WORLD, judge_reference  # noqa: E402


@dataclass
class RewardCompareConfig(RewardJobConfig):
    arms: list[str] = field(default_factory=lambda: list(ARMS))
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


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_args(RewardCompareConfig, argv)
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in cfg.arms}
    seconds: dict[str, list[float]] = {arm: [] for arm in cfg.arms}
    for arm in cfg.arms:
        for seed in cfg.seeds:
            print(f"[reward_compare] {arm} seed {seed}", flush=True)
            start = time.perf_counter()
            _, history = train(arm_config(cfg, arm, seed))
            seconds[arm].append(time.perf_counter() - start)
            runs[arm].append(history)
    rows = summarize(runs, seconds)
    reference = (judge_reference(cfg.data, cfg.eval_pairs_per_user) if cfg.data.source == WORLD
                 else None)
    table = format_table(rows, reference)
    out = Path(cfg.output_dir)
    atomic.write_text(out / "comparison.md", table + "\n")
    atomic.write_text(out / "comparison.json", json.dumps(
        {"rows": rows, "judge_reference": reference, "config": dataclasses.asdict(cfg)},
        indent=1, default=str))
    print(table)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
