"""Sweeps at an equal time budget: ASHA vs FIFO (no early stopping) on the same seeded search.

Both sweeps use the same job, search space, Optuna seed and trial config and the same wall-
clock budget (Tune's `time_budget_s`: no new trials and running trials stopped when it is
spent). With ASHA, trials whose metric trails the others at a rung (grace_period steps, then
x reduction_factor) stop early, so the budget buys more configurations. Printed side by side:
trials started, trials run to the end, trials stopped early, best metric, and ratios.

    .venv/bin/python bench/sweep_asha.py                       # dpo space, 400-step trials, 2 x 600 s
    .venv/bin/python bench/sweep_asha.py --budget 300 --steps 200 --report-every 25 --grace 25

Each sweep runs in its own Python process with its own local Ray instance (`--arm`), one after
the other, so that trials torn down at the end of one sweep's budget cannot hold CPUs the next
sweep's first trial waits for. Each sweep gets a fresh name under
--out (nothing resumes); results to <out>/asha-vs-fifo.json. Run it on an otherwise idle
machine: both sweeps must see the same machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.sweep.run import SweepConfig, run_sweep  # noqa: E402


def run_arm(args) -> dict:
    """One sweep (args.arm) in this process; its figures as a dict."""
    import ray

    # run_sweep starts Ray as jobs/sweep.py does (with the dashboard, which Ray Train needs to free
    # the CPUs of trials ASHA stops; without it the sweep stalls after its first stopped trial)
    job_config = {"training": {"steps": args.steps}, "report_every": args.report_every} \
        if args.job == "dpo" else {}
    cfg = SweepConfig(job=args.job, name=f"{args.arm}-{args.stamp}", storage_path=args.out,
                      num_samples=args.samples, seed=args.seed, scheduler=args.arm,
                      grace_period=args.grace, time_budget_s=args.budget,
                      progress_every_s=60, job_config=job_config)
    summary = run_sweep(cfg)
    ray.shutdown()
    return {"trials": summary["trials"], "done": summary["counts"]["done"],
            "stopped_early": summary["counts"]["stopped early"], "failed": summary["counts"]["failed"],
            "cut_by_budget": summary["counts"]["cut by budget"],
            "best": summary["best"]["metric"] if summary["best"] else None,
            "seconds": summary["seconds"], "metric": summary["metric"], "mode": summary["mode"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="dpo")
    p.add_argument("--budget", type=float, default=600.0, help="seconds per sweep")
    p.add_argument("--samples", type=int, default=64, help="trial cap (the budget should bind first)")
    # A trial spends ~20 s starting its Ray Train worker whatever its length, and a DPO step of the
    # embedded default takes ~0.2 s: at 40 steps (the default sweep's) start-up dominates and
    # stopping early saves little. 400 steps make training most of a full trial, as on a cluster.
    p.add_argument("--steps", type=int, default=400, help="DPO steps of a full trial")
    p.add_argument("--report-every", type=int, default=50)
    p.add_argument("--grace", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/bench-sweep")
    p.add_argument("--arm", choices=["asha", "fifo"], help=argparse.SUPPRESS)  # internal: one sweep
    p.add_argument("--stamp", default=time.strftime("%Y%m%d-%H%M%S"), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.arm:
        Path(args.result).write_text(json.dumps(run_arm(args)))
        return
    results = {}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for arm in ("asha", "fifo"):
        result = Path(args.out) / f".{arm}-{args.stamp}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--arm", arm, "--stamp", args.stamp, "--result", str(result)]
        print(f"== {arm}: {args.budget:.0f} s sweep in a fresh process", flush=True)
        subprocess.run(cmd, check=True)
        results[arm] = json.loads(result.read_text())
        result.unlink()
    a, f = results["asha"], results["fifo"]
    print(f"\nequal budget of {args.budget:.0f} s per sweep, job {args.job}, seed {args.seed}, "
          f"metric {a['metric']} ({a['mode']})")
    print(f"{'':24}{'ASHA':>10}{'FIFO':>10}{'ASHA/FIFO':>11}")
    for key in ("trials", "done", "stopped_early", "cut_by_budget", "failed", "best", "seconds"):
        va, vf = a[key], f[key]
        ratio = f"{va / vf:.2f}" if isinstance(va, (int, float)) and isinstance(vf, (int, float)) and vf else "-"
        fmt = (lambda v: f"{v:.4f}") if key == "best" else (lambda v: f"{v}")
        print(f"{key:24}{fmt(va) if va is not None else '-':>10}{fmt(vf) if vf is not None else '-':>10}{ratio:>11}")
    out = Path(args.out) / "asha-vs-fifo.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
