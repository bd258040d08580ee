"""Sweeps at an equal time budget: ASHA vs FIFO (no early stopping) on the same seeded search.

Both sweeps use the same job, search space, Optuna seed and trial config and the same wall-
clock budget (Tune's `time_budget_s`: no new trials and running trials stopped when it is
spent). With ASHA, trials whose metric trails the others at a rung (grace_period steps, then
x reduction_factor) stop early, so the budget buys more configurations. Printed side by side:
trials started, trials run to the end, trials stopped early, best metric, and ratios.

    .venv/bin/python bench/sweep_asha.py                       # dpo space, 2 x 600 s
    .venv/bin/python bench/sweep_asha.py --budget 300 --steps 20

Each sweep gets a fresh name under --out (nothing resumes); results to <out>/asha-vs-fifo.json.
Run it on an otherwise idle machine: both sweeps must see the same machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.sweep.run import SweepConfig, run_sweep  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="dpo")
    p.add_argument("--budget", type=float, default=600.0, help="seconds per sweep")
    p.add_argument("--samples", type=int, default=64, help="trial cap (the budget should bind first)")
    p.add_argument("--steps", type=int, default=40, help="DPO steps of a full trial")
    p.add_argument("--report-every", type=int, default=10)
    p.add_argument("--grace", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-sweep")
    args = p.parse_args()

    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    job_config = {"training": {"steps": args.steps}, "report_every": args.report_every} \
        if args.job == "dpo" else {}
    results = {}
    for scheduler in ("asha", "fifo"):
        cfg = SweepConfig(job=args.job, name=f"{scheduler}-{stamp}", storage_path=args.out,
                          num_samples=args.samples, seed=args.seed, scheduler=scheduler,
                          grace_period=args.grace, time_budget_s=args.budget,
                          progress_every_s=60, job_config=job_config)
        summary = run_sweep(cfg)
        results[scheduler] = {
            "trials": summary["trials"], "done": summary["counts"]["done"],
            "stopped_early": summary["counts"]["stopped early"], "failed": summary["counts"]["failed"],
            "best": summary["best"]["metric"] if summary["best"] else None,
            "seconds": summary["seconds"], "metric": summary["metric"], "mode": summary["mode"]}
    a, f = results["asha"], results["fifo"]
    print(f"\nequal budget of {args.budget:.0f} s per sweep, job {args.job}, seed {args.seed}, "
          f"metric {a['metric']} ({a['mode']})")
    print(f"{'':24}{'ASHA':>10}{'FIFO':>10}{'ASHA/FIFO':>11}")
    for key in ("trials", "done", "stopped_early", "failed", "best", "seconds"):
        va, vf = a[key], f[key]
        ratio = f"{va / vf:.2f}" if isinstance(va, (int, float)) and isinstance(vf, (int, float)) and vf else "-"
        fmt = (lambda v: f"{v:.4f}") if key == "best" else (lambda v: f"{v}")
        print(f"{key:24}{fmt(va) if va is not None else '-':>10}{fmt(vf) if vf is not None else '-':>10}{ratio:>11}")
    out = Path(args.out) / "asha-vs-fifo.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
