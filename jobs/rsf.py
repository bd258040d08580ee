"""DPA rejection-sampling fine-tuning (DPA §2.2): directions v over two objectives, the best of n
sampled responses by v·r kept, v in the system prompt. On the simulated world (overall
helpfulness, verbosity; the tiny model) or on real text (--judges text: the project's questions,
SmolLM2 with v in its chat template's system message, helpfulness = the text quality judge).

    python jobs/rsf.py                                   # on the SFT warm start, 3 iterations
    python jobs/rsf.py --training.steps 120 --steps_per_iteration 40 --n_samples 16
    python jobs/rsf.py --config configs/rsf-smollm2.yaml # SmolLM2 on real questions

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
