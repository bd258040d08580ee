"""Find the policies of a P-Soups run on disk: the shared base and one LoRA adapter per preference.

The soups job (``raypref.experiments.soups.run``) writes each preference's policy to
``<output_dir>/runs/<training key>/<preference>/final``: ``adapter_model.safetensors``,
``adapter_config.json`` and ``soup_policy.json`` (``{"preference", "sft_dir", ...}``); every policy
of a run names the same base (``sft_dir``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from raypref.models.factory import resolve_model

POLICY_INFO_FILE = "soup_policy.json"  # written by the DPO spec's export
FINAL_DIR = "final"  # the runner's export folder
BASELINE_RUNS = ("P-MORL",)  # trained in the same run, but a baseline, not a soup ingredient


class PolicyDiscoveryError(ValueError):
    """The folder does not hold a usable soups run (names the folder and what is missing)."""


@dataclass(frozen=True)
class SoupPolicies:
    base_dir: Path
    adapters: dict[str, Path]  # preference -> adapter folder
    run_dir: Path  # runs/<training key>
    version: str  # training key + content hash of the adapters and base config

    @property
    def preferences(self) -> list[str]:
        return list(self.adapters)


def _content_hash(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:12]


def _valid_run_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "\x00" not in name and Path(name).name == name \
        and "\\" not in name


def finished_runs(output_dir: str | Path) -> list[str]:
    """Names (training keys) of the runs under ``output_dir/runs`` with at least one finished policy."""
    runs = Path(output_dir).expanduser().resolve() / "runs"
    if not runs.is_dir():
        return []
    return sorted(p.name for p in runs.iterdir()
                  if p.is_dir() and any(p.glob(f"*/{FINAL_DIR}/{POLICY_INFO_FILE}")))


def is_finished_run(output_dir: str | Path, name: str) -> bool:
    """Cheap check (no hashing, no loading) that ``name`` is a run of ``output_dir`` with a
    finished policy: the server asks this before Serve's multiplexer may evict a loaded run."""
    if not isinstance(name, str) or len(name) > 255 or not _valid_run_name(name):
        return False
    run_dir = Path(output_dir).expanduser().resolve() / "runs" / name
    try:
        return run_dir.is_dir() and any(run_dir.glob(f"*/{FINAL_DIR}/{POLICY_INFO_FILE}"))
    except (OSError, ValueError):  # e.g. a name too long for the filesystem
        return False


def find_policies(output_dir: str | Path, training_key: str | None = None,
                  preferences: list[str] | None = None) -> SoupPolicies:
    """The policies of the soups run in ``output_dir`` (its newest ``runs/<key>`` unless ``training_key``)."""
    out = Path(output_dir).expanduser().resolve()
    runs = out / "runs"
    if not runs.is_dir():
        raise PolicyDiscoveryError(f"{out} is not a soups output folder: it has no runs/ folder")
    if training_key:
        if not _valid_run_name(training_key):
            raise PolicyDiscoveryError(f"run name {training_key!r} is not a folder name under {runs}")
        run_dir = runs / training_key
        if not run_dir.is_dir():
            have = sorted(p.name for p in runs.iterdir() if p.is_dir())
            raise PolicyDiscoveryError(f"{runs} has no run {training_key!r}; it has {have}")
    else:
        candidates = [p for p in runs.iterdir() if p.is_dir() and any(p.glob(f"*/{FINAL_DIR}/{POLICY_INFO_FILE}"))]
        if not candidates:
            raise PolicyDiscoveryError(f"{runs} holds no finished policy (no */{FINAL_DIR}/{POLICY_INFO_FILE})")
        run_dir = max(candidates, key=lambda p: p.stat().st_mtime)
    adapters, bases = {}, {}
    for info_file in sorted(run_dir.glob(f"*/{FINAL_DIR}/{POLICY_INFO_FILE}")):
        info = json.loads(info_file.read_text())
        name = info.get("preference") or info_file.parent.parent.name
        if name in BASELINE_RUNS:
            continue
        adapters[name] = info_file.parent
        bases[name] = info.get("sft_dir")
    if preferences:
        missing = sorted(set(preferences) - set(adapters))
        if missing:
            raise PolicyDiscoveryError(f"preferences {missing} have no finished policy in {run_dir}; "
                                       f"found {sorted(adapters)}")
        adapters = {p: adapters[p] for p in preferences}
    if not adapters:
        raise PolicyDiscoveryError(f"{run_dir} holds no preference policy")
    distinct = {bases[p] for p in adapters}
    if len(distinct) != 1 or None in distinct:
        raise PolicyDiscoveryError(f"policies in {run_dir} do not share one base (sft_dir): "
                                   f"{ {p: bases[p] for p in adapters} }")
    # a named base (smollm2-135m-instruct) is its converted folder, as load_pretrained finds it
    base_dir = Path(resolve_model(distinct.pop()))
    if not (base_dir / "config.json").is_file():
        raise PolicyDiscoveryError(f"base model folder {base_dir} (sft_dir of {run_dir}) has no config.json")
    files = [base_dir / "config.json"] + [adapters[p] / "adapter_model.safetensors" for p in adapters]
    return SoupPolicies(base_dir, adapters, run_dir, f"{run_dir.name}/{_content_hash(files)}")
