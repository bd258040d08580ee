"""Personalized Soups: per-preference policies trained concurrently, merged post hoc, evaluated.

    python jobs/soups.py                                  # embedded default, one CPU machine
    python jobs/soups.py --config configs/soups-7b-8gpu.yaml
    ray job submit --address http://127.0.0.1:8265 -- python jobs/soups.py
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.config import parse_args
from raypref.experiments.soups.config import SoupsConfig
from raypref.experiments.soups.run import run_soups


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(SoupsConfig, argv, description=__doc__)
    result = run_soups(cfg)
    print(f"\nreport: {result.report_path}")
    print(f"mlflow: run {result.run_id} in {result.tracking_uri}")
    if result.failed:
        print(f"failed runs: {sorted(result.failed)}; combinations left out of the comparison: "
              f"{result.excluded or 'none'} (a rerun retrains only the failed runs)")


if __name__ == "__main__":
    run_job(main)
