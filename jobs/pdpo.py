"""P-DPO / P-IPO on the simulated length conflict: 70% of annotators prefer longer
responses, 30% shorter; a LoRA and a user model (soft prompt of T_u user tokens) trained jointly.

    python jobs/pdpo.py                                          # individual user model, DPO loss
    python jobs/pdpo.py --user_model cluster --n_clusters 5 --loss ipo --alpha 0.5
    python jobs/pdpo.py --user_model none                        # vanilla DPO on the same pairs

Prints held-out accuracy per seen annotator, Accuracy-top, Accuracy-generic and the minority group's.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.pdpo import PDPOJobConfig, train_pdpo

main = job_main(PDPOJobConfig, train_pdpo, __doc__)

if __name__ == "__main__":
    run_job(main)
