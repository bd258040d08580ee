"""The fronts of P-Soups, DPA and P-MORL (and Prompting) side by side on two objectives: the same
prompts, judges and budget for every method; one plot, a table of points, each front's
hypervolume with a bootstrap interval over prompts.

    python jobs/fronts.py                                     # the simulated world: verbosity x style
    python jobs/fronts.py --objectives '[verbosity, expertise]'
    python jobs/fronts.py --config configs/fronts-smollm2.yaml  # SmolLM2, text judges: verbosity x friendliness
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import job_main, run_job
from raypref.experiments.fronts import FrontsConfig, run_fronts

main = job_main(FrontsConfig, run_fronts, __doc__)

if __name__ == "__main__":
    run_job(main)
