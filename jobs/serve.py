"""Serve a P-Soups run over HTTP (Ray Serve): per-request weighted soups, batched.

    python jobs/serve.py --config configs/serve.yaml [--output_dir outputs/soups] [--port 8000]
    python jobs/serve.py --demo outputs/serve-demo     # builds a tiny random run first, then serves it
    curl -s 127.0.0.1:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"prompt": "tell me about rivers", "preferences": {"P1A": 0.5, "P2A": 0.5}}'

The config file is a Ray Serve config; flags override its app args and HTTP options
(every flag: --help, or raypref/experiments/serve.py).
"""
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raypref.cli import run_job
from raypref.experiments.serve import main

if __name__ == "__main__":
    run_job(main)
