"""DPA rejection-sampling fine-tuning (seed 003 §2.2) on the simulated world: directions v over
(overall helpfulness = the mean of the four UltraFeedback aspects as in 003 §3.1, verbosity), the best
of n sampled responses by v·r kept, v written in the system prompt.

    python jobs/rsf.py                                   # on the SFT warm start, 3 iterations
    python jobs/rsf.py --training.steps 120 --steps_per_iteration 40 --n_samples 16
    python jobs/rsf.py --config rsf.yaml --run_name my-run   # an existing run name resumes it

Trains through the Ray Train + DeepSpeed runner (checkpoints in <output_dir>/<run_name>/runs), then
sweeps directions from (1, 0) to (√2/2, −√2/2) on held-out prompts and prints, for the base and
the policy, the mean response length and judged objectives per direction.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.config import parse_args
from raypref.experiments.policy import RSFJobConfig, RSFJobResult, train_rsf


def main(argv: list[str] | None = None) -> RSFJobResult:
    result = train_rsf(parse_args(RSFJobConfig, argv, description=__doc__))
    s = result.summary
    first, second = s["objectives"]
    for iteration, kept in s["selection"].items():
        print(f"[rsf] iteration {iteration} kept data: " + " ".join(f"{k}={v}" for k, v in kept.items()))
    print(f"[rsf] {s['steps']} steps in {s['iterations']} iteration(s); direction sweep on held-out prompts:")
    for label, rows in s["sweep"].items():
        print(f"[rsf] {label:6s} " + "  ".join(
            f"v=({r['direction'][0]:.2f},{r['direction'][1]:.2f}): len {r['length']:.1f} {first} {r[first]:.2f} "
            f"{second} {r[second]:.2f}" for r in rows))
    print(f"[rsf] policy length decreases monotonically over the sweep: {s['length_monotone_decreasing']}")
    print(f"[rsf] policy: {result.policy_dir}")
    print(f"[rsf] summary: {result.output_dir / 'summary.json'}; MLflow run {result.run_id} in "
          f"{result.tracking_uri}")
    return result


if __name__ == "__main__":
    run_job(main)
