"""A run's fingerprint: what must be equal for a checkpoint to be resumed.

Stored as ``<storage>/<name>/raypref_fingerprint.json`` when a run starts. Its parts that give
a checkpoint its meaning (config, spec, data, base model, and the checkpoint layout: workers,
ZeRO stage, roles) must be equal: a rerun of the same name with others refuses to resume and
names what changed; ``restart`` deletes the old run and starts over. The code version is kept
apart: a hotfix must not strand a long run, so a code-only change resumes with a warning that
names both versions (``strict_code`` refuses it instead), and the file records every version
that trained the run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from raypref.train import storage

FINGERPRINT_FILE = "raypref_fingerprint.json"
# RunnerConfig fields that change what is trained (not where it is written or how it is logged)
TRAINING_FIELDS = ("lr", "weight_decay", "warmup_steps", "schedule", "max_steps", "micro_batch_size",
                   "grad_accum", "grad_clip", "seed", "bf16")
LAYOUT_FIELDS = ("num_workers", "zero_stage")


class RunMismatch(RuntimeError):
    """A run folder holds a run with another fingerprint: resuming it would mix two runs."""


def code_version() -> str:
    """raypref's version and a hash of its source files (a code change is a new run)."""
    import raypref

    root = Path(raypref.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return f"{getattr(raypref, '__version__', '0')}+{h.hexdigest()[:12]}"


def model_identity(name_or_path: str, revision: str | None = None) -> dict:
    """A base model's identity: for a local folder its files' names and sizes and the hash of
    its config; for a hub id, the id and revision."""
    local = Path(name_or_path).expanduser()
    if not local.is_dir():
        return {"id": name_or_path, "revision": revision or "main"}
    files = {p.name: p.stat().st_size for p in sorted(local.iterdir()) if p.is_file()}
    config = local / "config.json"
    return {"path": str(local.resolve()), "files": files,
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.exists() else None}


def run_fingerprint(spec, cfg, data: dict | None = None) -> dict:
    config = asdict(cfg)
    return {
        "config": {k: config[k] for k in TRAINING_FIELDS},
        "spec": spec.fingerprint(),
        "data": data or {},
        "code": code_version(),
        "layout": {**{k: config[k] for k in LAYOUT_FIELDS},
                   "trainable_roles": [n for n, r in spec.roles().items() if r.trainable]},
    }


CODE_KEYS = ("code", "code_history")  # provenance, not meaning


def meaning(fingerprint: dict) -> dict:
    """The parts of a fingerprint that must match for a checkpoint to be resumed."""
    return {k: v for k, v in fingerprint.items() if k not in CODE_KEYS}


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of what differs, with both values (short)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {json.dumps(a, default=str)[:80]} -> {json.dumps(b, default=str)[:80]}")
    return out


def check_fingerprint(root: str, name: str, fingerprint: dict, restart: bool = False,
                      strict_code: bool = False) -> None:
    """Write the fingerprint of a new run; for an existing run, raise RunMismatch unless its
    meaning is equal (or ``restart``: delete the old run first). A run whose code version alone
    changed resumes with a printed warning, or raises RunMismatch when ``strict_code``."""
    if not storage.is_run_name(name):
        raise ValueError(f"run name {name!r}: {storage.RUN_NAME_RULE}")
    run_dir = storage.join(root, name)
    path = storage.join(run_dir, FINGERPRINT_FILE)
    fingerprint = json.loads(json.dumps(fingerprint, default=str))  # as it reads back from disk
    if restart and storage.exists(run_dir):
        if storage.delete_run(root, name, FINGERPRINT_FILE):
            print(f"[runner] {name}: --restart, deleted the old run in {run_dir}", flush=True)
    elif storage.exists(path):
        old = json.loads(storage.read_text(path))
        changed = differences(meaning(old), meaning(fingerprint))
        if changed:
            raise RunMismatch(
                f"run {name!r} in {root} was made with another fingerprint, so it is not resumed; "
                f"changed: {'; '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}. "
                "Use another run name / output folder, or restart it (--restart true).")
        if old.get("code") == fingerprint["code"]:
            return
        if strict_code:
            raise RunMismatch(f"run {name!r} in {root} was trained by raypref {old.get('code')}, this is "
                              f"{fingerprint['code']}; strict_code refuses to resume it with other code")
        print(f"[runner] WARNING {name}: resuming a run trained by raypref {old.get('code')} with "
              f"raypref {fingerprint['code']} (only the code changed: config, data, base and layout "
              "are the same); pass --strict_code true to refuse", flush=True)
        fingerprint["code_history"] = [*old.get("code_history", [old.get("code")]), fingerprint["code"]]
    elif storage.exists(run_dir) and not storage.is_uri(run_dir) and any(Path(run_dir).glob("checkpoint_*")):
        raise RunMismatch(f"run {name!r} in {root} has no {FINGERPRINT_FILE} (made by an older "
                          "raypref?): cannot tell whether it is the same run; delete the folder or use another name")
    storage.write_text(path, json.dumps(fingerprint, indent=2, sort_keys=True))
