#!/usr/bin/env bash
# Run the Personalized Soups job (jobs/soups.py) in the project virtualenv. With no arguments it
# uses the job's embedded default (a tiny model, local CPU); arguments go to the job unchanged,
# e.g. `bash scripts/run-soups.sh --config configs/soups-7b-8gpu.yaml`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/setup.sh

# Offline by default (the default run needs no hub); export HF_HUB_OFFLINE=0 to allow downloads.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-$HF_HUB_OFFLINE}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-$HF_HUB_OFFLINE}"
export TOKENIZERS_PARALLELISM=false

exec .venv/bin/python jobs/soups.py "$@"
