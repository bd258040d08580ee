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


# ---------------------------------------------------------------- atomic writes

_KILLER = r'''
import os, shutil, sys
from pathlib import Path
from raypref import atomic

target, kill_at, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
calls = [0]

def step(fn):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os._exit(17)  # a kill: no exception handler, no cleanup runs
        return fn(*args, **kwargs)
    return wrapped

os.replace, os.fsync, shutil.rmtree = step(os.replace), step(os.fsync), step(shutil.rmtree)

def export(tmp):
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        step(Path.write_text)(tmp / name, "new " + name)

if mode == "dir":
    atomic.replace_dir(target, export)
else:
    atomic.write_text(target, "new file")
'''


def _contents(folder: Path) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("mode", ["dir", "file"])
def test_an_export_killed_at_any_step_leaves_the_old_or_the_new_never_a_mix(tmp_path, mode):
    import subprocess
    import sys

    from raypref import atomic

    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    names = ("model.safetensors", "config.json", "tokenizer.json")
    old = {n: "old " + n for n in names}
    new = {n: "new " + n for n in names}
    outcomes = set()
    for kill_at in range(1, 40):
        target = tmp_path / f"k{kill_at}" / ("final" if mode == "dir" else "summary.json")
        if mode == "dir":
            target.mkdir(parents=True)
            for n, text in old.items():
                (target / n).write_text(text)
        else:
            target.parent.mkdir()
            target.write_text("old file")
        proc = subprocess.run([sys.executable, str(script), str(target), str(kill_at), mode],
                              env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode in (0, 17), proc.stderr
        if mode == "dir":
            atomic.recover_dir(target)  # what the next reader or writer does first
            seen = _contents(target)
            assert seen in (old, new), f"killed at step {kill_at}: {seen}"
            leftovers = [p.name for p in target.parent.iterdir() if p.name != "final"]
            assert not leftovers, f"killed at step {kill_at}: left {leftovers}"
        else:
            seen = target.read_text()
            assert seen in ("old file", "new file"), f"killed at step {kill_at}: {seen!r}"
        outcomes.add("new" if seen in (new, "new file") else "old")
        if proc.returncode == 0:
            break
    else:
        pytest.fail("the write never finished within 39 steps")
    assert outcomes == {"old", "new"} and kill_at > 3  # the kills did land inside the write


def test_write_shards_keeps_the_old_set_when_writing_the_new_one_fails(tmp_path, monkeypatch):
    from raypref.data import simulate
    from raypref.data.records import PreferenceRecord

    rows = [PreferenceRecord(f"p{i}", f"c{i}", f"r{i}", user_id=1) for i in range(6)]
    simulate.write_shards(rows, tmp_path / "shards", shard_size=2)
    (tmp_path / "shards" / "notes.txt").write_text("kept")
    real = simulate.pq.write_table
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate.pq, "write_table", failing)
    with pytest.raises(OSError, match="disk full"):
        simulate.write_shards(rows[:2], tmp_path / "shards", shard_size=1)
    assert len(simulate.read_shards(tmp_path / "shards")) == 6  # the old set, whole
    monkeypatch.setattr(simulate.pq, "write_table", real)
    simulate.write_shards(rows[:2], tmp_path / "shards", shard_size=1)
    assert [r.prompt for r in simulate.read_shards(tmp_path / "shards")] == ["p0", "p1"]
    assert (tmp_path / "shards" / "notes.txt").read_text() == "kept"


def test_a_uri_export_is_published_by_a_marker_after_the_upload(tmp_path, monkeypatch):
    target = f"file://{tmp_path}/bucket/run/final"

    def folder(text):
        local = tmp_path / text
        local.mkdir()
        (local / "a.txt").write_text(text)
        (local / "b.txt").write_text(text)
        return local

    first = storage.publish_dir(folder("v1"), target)
    assert storage.published(target) == first
    real_write = storage.write_text
    monkeypatch.setattr(storage, "write_text", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        storage.publish_dir(folder("v2"), target)  # uploaded, but the marker was never written
    assert storage.published(target) == first
    assert {p.read_text() for p in Path(first.removeprefix("file://")).iterdir()} == {"v1"}
    monkeypatch.setattr(storage, "write_text", real_write)
    second = storage.publish_dir(folder("v3"), target)
    assert storage.published(target) == second != first
    assert {p.read_text() for p in Path(second.removeprefix("file://")).iterdir()} == {"v3"}
    assert not Path(first.removeprefix("file://")).exists()  # the old copy went after the switch


def test_runner_checkpoints_are_staged_beside_the_run_not_in_the_system_temp(tmp_path):
    from raypref.train.runner import _staging_dir

    staged = Path(_staging_dir(str(tmp_path), "r"))
    assert staged.parent == tmp_path / "r" and staged.stat().st_dev == tmp_path.stat().st_dev
    assert _staging_dir("s3://bucket/runs", "r") is None


# ---------------------------------------------------------------- checkpoints without code

class _Evil:
    """Unpickling it writes a file: what a tampered checkpoint could do on every worker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_worker_state_round_trips_through_json_and_safetensors(tmp_path):
    import random

    import numpy as np
    import torch

    from raypref.train.runner import _rng_state, _set_rng_state
    from raypref.train.state_io import load_state, save_state

    torch.manual_seed(3), np.random.seed(4), random.seed(5)
    state = {"spec": {"passes": 2, "examples": [(1, [2, 3])], "latents": {"u1": torch.ones(2, 3)},
                      "by_int": {7: "seven"}, "buffer": {"ids": torch.arange(4), "stats": {"kl": 0.5}}},
             "rng": _rng_state(), "history": [{"step": 1, "loss": 0.25}]}
    save_state(state, tmp_path, "worker_state_rank0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker_state_rank0.json",
                                                          "worker_state_rank0.safetensors"]
    expected = (torch.rand(3), np.random.rand(3), random.random())
    back = load_state(tmp_path, "worker_state_rank0")
    _set_rng_state(back["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
    assert back["spec"]["examples"] == [(1, [2, 3])] and back["spec"]["by_int"] == {7: "seven"}
    assert torch.equal(back["spec"]["latents"]["u1"], torch.ones(2, 3))
    assert torch.equal(back["spec"]["buffer"]["ids"], torch.arange(4))
    assert back["history"] == state["history"]
    with pytest.raises(TypeError, match=r"worker_state_rank0\.spec\.obj: a _Evil cannot be saved"):
        save_state({"spec": {"obj": _Evil(tmp_path / "x")}}, tmp_path, "worker_state_rank0")


def test_a_checkpoint_holding_a_pickle_is_refused_unopened(tmp_path):
    import pickle

    from raypref.train.runner import read_spec_state
    from raypref.train.state_io import UnsafeCheckpoint, refuse_pickles

    marker = tmp_path / "pwned"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "worker_state_rank0.pkl").write_bytes(pickle.dumps({"spec": _Evil(marker)}))
    with pytest.raises(UnsafeCheckpoint, match=r"holds pickle file\(s\) \['worker_state_rank0.pkl'\]"):
        refuse_pickles(tmp_path / "ckpt")
    with pytest.raises(UnsafeCheckpoint):
        read_spec_state(tmp_path / "ckpt")
    assert not marker.exists()


def test_deepspeed_files_load_weights_only(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from raypref.train.state_io import UnsafeCheckpoint, load_torch_weights_only

    good = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "state": {0: torch.ones(2)}},
                "ds_version": "0.19.8"}, good)
    loaded = load_torch_weights_only(str(good))
    assert isinstance(loaded["optimizer_state_dict"]["loss_scaler"], LossScaler)
    marker = tmp_path / "pwned"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "client_state": _Evil(marker)}, evil)
    with pytest.raises(UnsafeCheckpoint, match="mp_rank_00_model_states.pt holds objects"):
        load_torch_weights_only(str(evil))
    assert not marker.exists()


# ---------------------------------------------------------------- resume after a fix or damage

def _fake_checkpoint(folder: Path, step: int) -> Path:
    import torch

    from raypref.train.state_io import save_state

    ckpt = folder / f"checkpoint_{step:06d}"
    (ckpt / "ds-policy").mkdir(parents=True)
    torch.save({"module": {"w": torch.full((64,), float(step))}}, ckpt / "ds-policy" / "mp_rank_00_model_states.pt")
    save_state({"spec": {}, "history": [{"step": step}]}, ckpt, "worker_state_rank0")
    return ckpt


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    from ray.train import Checkpoint

    from raypref.train.runner import _restorable

    _fake_checkpoint(tmp_path, 2)
    latest = _fake_checkpoint(tmp_path, 4)
    assert _restorable(Checkpoint(str(latest)), 0, "r").path == str(latest)  # intact: kept

    model = latest / "ds-policy" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data
    model.write_bytes(bytes(data))
    picked = _restorable(Checkpoint(str(latest)), 0, "r")
    assert picked.path == str(tmp_path / "checkpoint_000002")
    out = capsys.readouterr().out
    assert "checkpoint_000004 cannot be restored (ds-policy/mp_rank_00_model_states.pt" in out
    assert "resuming from" in out and "checkpoint_000002" in out

    (tmp_path / "checkpoint_000002" / "worker_state_rank0.safetensors").write_bytes(b"\0\0")
    with pytest.raises(RuntimeError, match="no checkpoint can be restored: .*checkpoint_000004.*checkpoint_000002"):
        _restorable(Checkpoint(str(latest)), 0, "r")


def test_refusals_end_a_job_with_one_error_line(tmp_path, capsys):
    from raypref.cli import EXIT_EXPECTED, run_job
    from raypref.ray_session import ResourceWaitTimeout
    from raypref.train.state_io import UnsafeCheckpoint

    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "rows.jsonl").write_text("{}\n")

    def restart_foreign(argv):
        check_fingerprint(str(tmp_path), "mydata", _fp(), restart=True)

    for main in (restart_foreign, lambda argv: (_ for _ in ()).throw(UnsafeCheckpoint("pickle in ckpt")),
                 lambda argv: (_ for _ in ()).throw(ResourceWaitTimeout("trial waited"))):
        with pytest.raises(SystemExit) as info:
            run_job(main, [], quiet=False)
        assert info.value.code == EXIT_EXPECTED
        assert capsys.readouterr().err.startswith("error: ")
