#!/usr/bin/env bash
# Run the test suite (all of it, slow tests included, unless arguments say otherwise) in the
# project virtualenv, offline and on the CPU. Arguments go to pytest unchanged.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

bash scripts/setup.sh

# Nothing may come from a model hub at run time: models and data are built or shipped locally.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
# Every worker's log line, not Ray's deduplicated summary: failures are easier to read.
export RAY_DEDUP_LOGS=0
# No usage report to send (no network), and tests start their own local Ray, never a cluster.
export RAY_USAGE_STATS_ENABLED=0
unset RAY_ADDRESS

start=$SECONDS
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
status=$?
set -e
echo "test.sh: pytest finished with exit code $status in $((SECONDS - start)) s"

# pytest's 5 means "no tests collected": for CI that is a failure, not a pass.
if [[ $status -eq 5 ]]; then
    echo "test.sh: no tests were collected; treating that as a failure" >&2
    exit 1
fi
exit "$status"
