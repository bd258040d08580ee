"""No silent stalls: the Ray a raypref process starts is pinned to its own address, so a second
local Ray on the machine changes nothing; a wait for resources is reported, then stopped."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raypref.sweep.report import DONE, STOPPED

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def second_ray():
    """Another local Ray instance (1 CPU), as a test suite or a notebook beside a job."""
    import shutil
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray2-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    started = subprocess.run([str(RAY), "start", "--head", "--port", str(port), "--num-cpus", "1",
                              "--include-dashboard", "false", "--temp-dir", temp],
                             env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}"
    finally:
        # stop only this instance (plain `ray stop` would stop every Ray on the machine)
        subprocess.run([sys.executable, "-c", _STOP, temp, str(port)], env=env, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


# the processes of the instance started under --temp-dir, found by their command lines (the GCS
# server's names its port, not the folder)
_STOP = r'''
import os, signal, sys
import psutil
marks = (sys.argv[1], f"--gcs_server_port={sys.argv[2]}")
mine = [p for p in psutil.process_iter(["cmdline"])
        if p.pid != os.getpid() and any(m in a for a in (p.info["cmdline"] or []) for m in marks)]
for p in mine:
    try:
        p.send_signal(signal.SIGTERM)
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(mine, timeout=10)
for p in alive:  # the GCS server outlives SIGTERM (so does `ray stop`'s first try)
    p.kill()
psutil.wait_procs(alive, timeout=10)
'''

_PROBE = r'''
import json, os, ray
from raypref import ray_session
ray_session.init(num_cpus=1, include_dashboard=True, configure_logging=False, log_to_driver=False)

@ray.remote
def seen():
    from ray.util.state import list_actors
    list_actors()  # what Ray Train's PlacementGroupCleaner does in its actor
    return os.environ.get("RAY_ADDRESS")

from ray.util.state import list_actors
list_actors()
pinned = os.environ.pop("RAY_ADDRESS")
try:  # what any lookup met before the address was pinned
    list_actors()
    unpinned = "found"
except ConnectionError as err:
    unpinned = str(err)
os.environ["RAY_ADDRESS"] = pinned
print(json.dumps({"driver": pinned, "worker": ray.get(seen.remote()), "unpinned": unpinned,
                  "mine": ray.get_runtime_context().gcs_address}))
ray_session.shutdown()
'''


@pytest.mark.slow
def test_the_state_api_finds_our_ray_beside_a_second_instance(second_ray, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["driver"] == seen["worker"] != second_ray
    assert seen["driver"].rsplit(":")[-1] == seen["mine"].rsplit(":")[-1]  # our GCS port
    assert "multiple" in seen["unpinned"].lower()  # the failure the pin avoids


def test_a_wait_for_resources_is_reported_then_stopped(ray_local, capsys):
    from ray.util.placement_group import placement_group, remove_placement_group

    from raypref.ray_session import ResourceWaitTimeout, watch_resources

    holder = placement_group([{"CPU": 1}], name="holder-run")
    ray_local.get(holder.ready(), timeout=60)
    waiting = placement_group([{"CPU": 64}], name="too-big-trial")
    try:
        with pytest.raises(ResourceWaitTimeout) as err:
            with watch_resources(warn_after_s=1, limit_s=4, poll_s=0.5):
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    time.sleep(0.1)
        message = str(err.value)
        assert "too-big-trial (CPU 64) waited" in message and "held by holder-run (CPU 1)" in message
        assert "'CPU': 2.0" in message  # the cluster's size
        assert "[ray] waiting: too-big-trial (CPU 64)" in capsys.readouterr().out
    finally:
        remove_placement_group(waiting)
        remove_placement_group(holder)


def test_no_report_while_nothing_waits(ray_local, capsys):
    from raypref.ray_session import watch_resources

    with watch_resources(warn_after_s=0.5, limit_s=1, poll_s=0.2):
        time.sleep(2)
    assert "[ray]" not in capsys.readouterr().out


def _p1a_shards(tmp_path: Path) -> dict:
    """The preference job's train and test shards: P1A's pairs from the simulated world."""
    import dataclasses

    import numpy as np

    from raypref.data.simulate import write_shards
    from raypref.data.world import World

    world, paths = World(seed=0), {}
    for key, n, split in (("train_data", 64, "train"), ("test_data", 32, "test")):
        pairs = world.pairs_for_preference("P1A", n, np.random.default_rng(0), split=split)
        write_shards([dataclasses.replace(p, user_id=1) for p in pairs], tmp_path / "shards" / split, 1000)
        paths[key] = str(tmp_path / "shards" / split)
    return paths


@pytest.mark.slow
def test_a_sweep_whose_trial_asha_stops_finishes_beside_a_second_ray(second_ray, tmp_path):
    """The stall of issue 21: ASHA stops a trial, its Ray Train controller dies with it and only
    Ray Train's PlacementGroupCleaner frees its workers' CPUs; with a second local Ray up, the
    cleaner's address lookup failed and the next trial waited forever."""
    # seed 0 draws lr 1e-2, 1e-7, 1e-2 (TPE's random start): the second trial learns nothing by
    # step 4, below the first's, and ASHA stops it there; the third needs the CPUs it held
    space = {"training.lr": {"distribution": "choice", "values": [1e-7, 1e-2]}}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({"params": space}))
    job = {"sft": {"output_dir": str(ROOT / "outputs" / "sft")}, **_p1a_shards(tmp_path),
           "training": {"steps": 8, "warmup_steps": 0}, "resources": {"eval_every": 2}}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAYPREF_RESOURCE_WAIT_LIMIT_S="300")
    args = ["--name", "beside", "--output_dir", str(tmp_path / "sweeps"), "--space", str(space_file),
            "--num_samples", "3", "--grace_period", "4", "--reduction_factor", "2",
            "--progress_every_s", "10", "--seed", "0", "--job_config", json.dumps(job)]
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "sweep.py"), *args], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "sweeps" / "beside" / "summary.json").read_text())["rows"]
    statuses = [r["status"] for r in sorted(rows, key=lambda r: r["name"])]
    assert statuses == [DONE, STOPPED, DONE], statuses  # the trial after the stopped one ran too
