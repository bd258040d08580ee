"""DPA rejection-sampling fine-tuning (DPA §2.2) on the simulated world: directions v over
(overall helpfulness, verbosity), the best of n sampled responses by v·r kept, v in the system prompt.

    python jobs/rsf.py                                   # on the SFT warm start, 3 iterations
    python jobs/rsf.py --training.steps 120 --steps_per_iteration 40 --n_samples 16

Then sweeps directions on held-out prompts: length and judged objectives, base vs policy.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.rsf import RSFJobConfig, train_rsf

main = job_main(RSFJobConfig, train_rsf, __doc__)

if __name__ == "__main__":
    run_job(main)
