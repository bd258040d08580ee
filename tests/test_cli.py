"""The job wrapper: expected failures exit 2 with one line, bugs keep their traceback;
quiet_console keeps library noise off the console but in a log file."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from raypref.cli import EXIT_EXPECTED, error_line, expected_error, is_worker_noise, run_job
from raypref.config import ConfigError
from raypref.data.quarantine import QuarantineExceeded

ROOT = Path(__file__).resolve().parents[1]


def _exit_of(main, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run_job(main, [], quiet=False)
    return info.value.code, capsys.readouterr().err


def _raiser(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc, text", [
    (ConfigError("--runner.lr: expected a number, got 'abc'"), "--runner.lr: expected a number"),
    (QuarantineExceeded("train: 12 of 100 rows quarantined (limit 5%)"), "12 of 100 rows"),
    (FileNotFoundError(2, "No such file or directory", "/data/shards"),
     "No such file or directory: /data/shards"),
    (FileNotFoundError("no .parquet shards under /data (looked for: parquet)"), "looked for"),
])
def test_expected_failures_exit_2_with_one_line(exc, text, capsys):
    code, err = _exit_of(_raiser(exc), capsys)
    assert code == EXIT_EXPECTED
    assert err.count("\n") == 1 and err.startswith("error: ") and text in err


class Settings:
    def validate(self):
        raise ValueError("Settings.steps=0: must be >= 1")


def test_value_error_from_validate_is_expected_but_others_are_bugs(capsys):
    code, err = _exit_of(lambda argv: Settings().validate(), capsys)
    assert (code, err) == (2, "error: Settings.steps=0: must be >= 1\n")
    with pytest.raises(ValueError, match="math domain"):  # a bug: traceback kept
        run_job(_raiser(ValueError("math domain error")), [], quiet=False)
    with pytest.raises(RuntimeError):
        run_job(_raiser(RuntimeError("boom")), [], quiet=False)


def test_wrapped_errors_are_found():
    class TaskError(Exception):  # shaped like ray.exceptions.RayTaskError
        def __init__(self, cause):
            self.cause = cause

    class WorkerGroupError(Exception):  # shaped like Ray Train's worker failures
        def __init__(self, failures):
            self.worker_failures = failures

    inner = QuarantineExceeded("too many bad rows")
    assert expected_error(TaskError(inner)) is inner
    assert expected_error(WorkerGroupError({0: RuntimeError("x"), 1: inner})) is inner
    try:
        try:
            raise FileNotFoundError("shards missing")
        except FileNotFoundError as err:
            raise RuntimeError("loading failed") from err
    except RuntimeError as outer:
        assert str(expected_error(outer)) == "shards missing"
    assert expected_error(TaskError(RuntimeError("bug"))) is None


def test_run_mismatch_is_found_by_name_once_it_exists(monkeypatch, capsys):
    fingerprint = types.ModuleType("raypref.train.fingerprint")

    class RunMismatch(RuntimeError):
        pass

    fingerprint.RunMismatch = RunMismatch
    monkeypatch.setitem(sys.modules, "raypref.train.fingerprint", fingerprint)
    code, err = _exit_of(_raiser(RunMismatch("config changed: lr 1e-3 -> 2e-3; use --restart")), capsys)
    assert code == 2 and "use --restart" in err


def test_error_line_is_one_line():
    assert error_line(ValueError("a\n  b\tc")) == "error: a b c"


def _job(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAYPREF_NOISE_LOG": os.devnull}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_real_job_bad_config_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  lr: 0.1\n  lr: 0.2\n")
    runs = [["jobs/sft.py", "--training.lr", "-1"], ["jobs/sft.py", "--config", str(bad)],
            ["jobs/dpo.py", "--training.lr", "abc"]]
    procs = [subprocess.Popen([sys.executable, *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for args in runs]
    results = [(p.wait(timeout=300), p.stderr.read(), p.stdout.read()) for p in procs]
    for proc in procs:
        proc.stdout.close(), proc.stderr.close()
    expected = ["error: training.lr=-1.0: must be > 0\n",
                f"error: {bad}:3: duplicate key 'lr' (first set on line 2)\n",
                "error: --training.lr: expected a number, got 'abc'\n"]
    for (code, err, out), want in zip(results, expected):
        assert (code, err, out) == (2, want, "")


QUIET_PROBE = r'''
import json, logging, os, sys, warnings
from raypref.cli import quiet_console
log = quiet_console(sys.argv[1])
from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
seen = []
dispatcher.add_handler("probe", lambda data: seen.append(data["lines"]))
dispatcher.emit({"lines": ["DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
                           "[runner] sft step 5: loss=6.0", "Reporting training result 1: x"],
                 "pid": 1, "is_err": False})
dispatcher.emit({"lines": ["Checkpoint successfully created at: /x"], "pid": 1, "is_err": True})
# a warning raised inside a library file vs one about our own code
exec(compile("import warnings; warnings.warn('library says hi', FutureWarning)",
             os.path.join(sys.prefix, "lib", "site-packages", "somelib", "mod.py"), "exec"))
warnings.warn("our own warning", UserWarning)
logging.getLogger("mlflow").info("Creating initial MLflow database tables...")
logging.getLogger("mlflow").error("mlflow failed loudly")
import transformers
from transformers.utils import logging as tlog
print(json.dumps({"seen": seen, "bars": tlog.is_progress_bar_enabled(),
                  "verbosity": tlog.get_verbosity(),
                  "env": {k: os.environ.get(k) for k in ("HF_HUB_DISABLE_PROGRESS_BARS",
                          "PYTHONWARNINGS", "RAY_TRAIN_ENABLE_PRINT_PATCH")}}))
'''


def test_quiet_console_keeps_noise_in_the_log(tmp_path):
    log = tmp_path / "noise.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS",
                                                             "PYTHONWARNINGS", "MLFLOW_LOGGING_LEVEL")}
    proc = subprocess.run([sys.executable, "-c", QUIET_PROBE, str(log)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["seen"] == [["[runner] sft step 5: loss=6.0"]]  # all-noise batch not sent
    assert result["bars"] is False and result["verbosity"] == 40  # transformers: ERROR
    assert result["env"]["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "ignore::FutureWarning" in result["env"]["PYTHONWARNINGS"]
    assert result["env"]["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    console = proc.stderr
    assert "our own warning" in console and "mlflow failed loudly" in console
    for noise in ("library says hi", "Creating initial MLflow", "built successfully",
                  "Reporting training result"):
        assert noise not in console
    kept = log.read_text()
    for noise in ("library says hi", "built successfully", "Checkpoint successfully created"):
        assert noise in kept


def test_worker_noise_patterns_spare_progress_and_errors():
    assert is_worker_noise("Setting up process group for: env:// [rank=0, world_size=1]")
    assert is_worker_noise("Loading weights:  50%|#####     | 14/28 [00:00<00:00]")
    assert is_worker_noise("Failed to query Ray Train Controller actor state. State API may be "
                           "temporarily unavailable. Continuing to monitor. [repeated 35x across cluster]")
    assert not is_worker_noise("[runner] sft-1 step 5: lr=0.0003 loss=6.014")
    assert not is_worker_noise("Traceback (most recent call last):")
    assert not is_worker_noise("RuntimeError: CUDA out of memory")
