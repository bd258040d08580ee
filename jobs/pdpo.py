"""P-DPO / P-IPO (seed 004) on the simulated length conflict: 70% of annotators prefer longer
responses, 30% shorter; a LoRA and a user model (soft prompt of T_u user tokens) trained jointly.

    python jobs/pdpo.py                                          # individual user model, DPO loss
    python jobs/pdpo.py --user_model cluster --n_clusters 5 --loss ipo --alpha 0.5
    python jobs/pdpo.py --user_model none                        # vanilla DPO on the same pairs

Trains through the Ray Train + DeepSpeed runner (checkpoints in <output_dir>/<run_name>/runs) and
prints held-out accuracy per seen annotator, Accuracy-top (seen annotators), Accuracy-generic
(unseen annotators, scored as the generic user), the minority ("shorter") group's accuracy, and
where the adapter + user model and the MLflow run are.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.config import parse_args
from raypref.experiments.policy import PDPOJobConfig, PDPOJobResult, train_pdpo


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def main(argv: list[str] | None = None) -> PDPOJobResult:
    result = train_pdpo(parse_args(PDPOJobConfig, argv, description=__doc__))
    s = result.summary
    users = " ".join(f"{u}({s['groups'][u][0]}):{_pct(a)}" for u, a in s["per_user"].items())
    print(f"[pdpo] user_model={s['user_model']} loss={s['loss']} alpha={s['alpha']} steps={s['steps']}")
    print(f"[pdpo] per annotator (l = longer, s = shorter): {users}")
    print(f"[pdpo] Accuracy-top {_pct(s['accuracy_top'])}  generic {_pct(s['accuracy_generic'])}  "
          f"minority (shorter) {_pct(s['accuracy_minority'])}  majority (longer) {_pct(s['accuracy_majority'])}")
    print(f"[pdpo] adapter + user model: {result.policy_dir}")
    print(f"[pdpo] summary: {result.output_dir / 'summary.json'}; MLflow run {result.run_id} in "
          f"{result.tracking_uri}")
    return result


if __name__ == "__main__":
    run_job(main)
