"""Runs that cannot hurt what lies beside them: run names, --restart deletes, atomic writes,
pickle-free checkpoints, fingerprints that survive a code fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypref.train import storage
from raypref.train.fingerprint import FINGERPRINT_FILE, RunMismatch, check_fingerprint, run_fingerprint
from raypref.train.runner import RunnerConfig
from raypref.train.spec import LoopSpec


class TinySpec(LoopSpec):
    def fingerprint(self):
        return {"pairs": [1, 2]}


def _fp(cfg=None):
    return run_fingerprint(TinySpec(), cfg or RunnerConfig())


def _make_run(root: Path, name: str) -> Path:
    check_fingerprint(str(root), name, _fp())
    (root / name / "checkpoint_000001").mkdir()
    return root / name


# ---------------------------------------------------------------- run names and --restart

@pytest.mark.parametrize("name", ["..", ".", "/abs/run", "a/b", "", "-x", ".hidden", "a b", "..\\x"])
def test_run_names_that_could_leave_their_folder_are_refused(name):
    with pytest.raises(ValueError, match=r"RunnerConfig\.name=.*must match"):
        RunnerConfig(name=name).validate()


def test_plain_run_names_pass():
    for name in ("run", "dpo-P1A.seed_0", "7b"):
        RunnerConfig(name=name).validate()


@pytest.mark.parametrize("name", ["..", ".", "/abs/run"])
def test_restart_with_a_climbing_name_deletes_nothing(tmp_path, name):
    root = tmp_path / "out" / "runs"
    sibling = _make_run(root, "sibling")
    (tmp_path / "out" / "mydata.csv").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / "mydata.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="must match"):
        check_fingerprint(str(root), name, _fp(), restart=True)
    assert (sibling / "checkpoint_000001").exists() and (tmp_path / "out" / "mydata.csv").exists()
    with pytest.raises(PermissionError, match="refusing to delete"):
        storage.delete_run(str(root), name, FINGERPRINT_FILE)
    assert (sibling / "checkpoint_000001").exists()


def test_restart_never_follows_a_symlink_out(tmp_path):
    root, outside = tmp_path / "runs", tmp_path / "elsewhere"
    _make_run(outside.parent, "elsewhere")  # a real run folder, but outside the root
    root.mkdir()
    (root / "linked").symlink_to(outside)
    with pytest.raises(PermissionError, match="symlink"):
        check_fingerprint(str(root), "linked", _fp(), restart=True)
    assert (outside / "checkpoint_000001").exists() and (outside / FINGERPRINT_FILE).exists()


def test_restart_leaves_a_symlink_inside_a_run_pointing_at_its_target(tmp_path):
    run = _make_run(tmp_path / "runs", "r")
    keep = tmp_path / "precious"
    keep.mkdir()
    (keep / "data.txt").write_text("x")
    (run / "link").symlink_to(keep)
    check_fingerprint(str(tmp_path / "runs"), "r", _fp(RunnerConfig(lr=2.0)), restart=True)
    assert (keep / "data.txt").read_text() == "x" and not (run / "checkpoint_000001").exists()


def test_restart_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "rows.jsonl").write_text("{}\n")
    with pytest.raises(PermissionError, match="holds no raypref_fingerprint.json"):
        check_fingerprint(str(tmp_path), "mydata", _fp(), restart=True)
    assert (tmp_path / "mydata" / "rows.jsonl").exists()
    # a fingerprint that is a symlink to one elsewhere does not make a folder a run either
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / FINGERPRINT_FILE).write_text("{}")
    (tmp_path / "mydata" / FINGERPRINT_FILE).symlink_to(tmp_path / "real" / FINGERPRINT_FILE)
    with pytest.raises(PermissionError):
        storage.delete_run(str(tmp_path), "mydata", FINGERPRINT_FILE)
    assert (tmp_path / "mydata" / "rows.jsonl").exists()


def test_restart_deletes_a_real_run_and_starts_it_over(tmp_path):
    run = _make_run(tmp_path, "r")
    check_fingerprint(str(tmp_path), "r", _fp(RunnerConfig(lr=2.0)), restart=True)
    assert not (run / "checkpoint_000001").exists()
    assert json.loads((run / FINGERPRINT_FILE).read_text())["config"]["lr"] == 2.0
    with pytest.raises(RunMismatch):  # and without restart the changed run is refused
        check_fingerprint(str(tmp_path), "r", _fp(RunnerConfig(lr=3.0)))
