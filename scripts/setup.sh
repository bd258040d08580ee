#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv) and install raypref into it, editable, with its
# test extra, from the lock files: every package at the exact version and sha256 hash recorded
# there (scripts/lock.sh regenerates them). Skips the install when nothing that decides it
# changed since the last successful run (a hash kept in .venv), so calling it before every
# command is cheap.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv=.venv
stamp="$venv/.raypref-install-stamp"
# A pinned torch, installed first and outside hash checking: on these machines 2.13.0 is a CPU
# wheel on local disk (pip finds it through its find-links), whose hash is not the registry's
# CUDA wheel's, and a bare range would let pip pull a multi-GB CUDA build. Its own dependencies
# are in requirements.lock.
torch_pin="torch==2.13.0"
locks=(requirements.lock requirements-nodeps.lock)
start=$SECONDS

for lock in "${locks[@]}"; do
    [[ -f "$lock" ]] || { echo "setup: $lock is missing: run scripts/lock.sh" >&2; exit 1; }
done
wanted_stamp="$({ sha256sum pyproject.toml "${locks[@]}" scripts/setup.sh scripts/check_installed.py
                  echo "$torch_pin"; } | sha256sum | cut -d' ' -f1)"

# A venv whose interpreter no longer runs (e.g. the system Python moved) is rebuilt from scratch.
if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup: $venv is broken, recreating it"
    python3 -m venv --clear "$venv"
elif [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv"
    python3 -m venv "$venv"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted_stamp" ]]; then
    echo "setup: $venv is up to date (pyproject.toml and the locks unchanged); $((SECONDS - start)) s"
    exit 0
fi

pip=("$venv/bin/python" -m pip install --quiet)
echo "setup: installing $torch_pin"
"${pip[@]}" --no-deps "$torch_pin"
echo "setup: installing the locked dependencies (${locks[*]}), hashes checked"
"${pip[@]}" --require-hashes -r requirements.lock
"${pip[@]}" --require-hashes --no-deps -r requirements-nodeps.lock
echo "setup: installing raypref (editable, its dependencies come from the lock)"
# No build isolation: the build uses the locked setuptools instead of fetching an unpinned one.
"${pip[@]}" --no-deps --no-build-isolation -e .
"$venv/bin/python" scripts/check_installed.py
# Written last, so an interrupted install is retried next time.
echo "$wanted_stamp" > "$stamp"
echo "setup: done in $((SECONDS - start)) s"
