"""Finding the served run through MLflow: the soups job's run id, or a soup it registered."""
from __future__ import annotations

import mlflow
import pytest

from raypref import tracking
from raypref.serve.app import ServerArgs
from raypref.serve.demo import build_demo_run
from raypref.serve.policies import PolicyDiscoveryError, find_policies


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory):
    """A demo soups run whose folder is logged like the soups job logs it (run tag + a registered soup)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _log_demo_run(tmp_path_factory.mktemp("mlflow"), monkeypatch)


def _log_demo_run(tmp_path, monkeypatch):
    out = build_demo_run(tmp_path / "soups")
    uri = f"sqlite:///{(out / 'mlflow.db').resolve()}"
    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # mlflow.set_tracking_uri writes it too; undone at teardown
    # artifacts in tmp (a new experiment's default artifact root is ./mlruns in the working directory)
    mlflow.MlflowClient(uri).create_experiment("raypref-soups", artifact_location=(tmp_path / "artifacts").as_uri())
    try:
        with tracking.start_run("soups", {"seed": 0}, out) as run:
            version = tracking.register_model_dir(out / "sft", "soup_demo")
        mlflow.MlflowClient(uri).set_registered_model_alias("soup_demo", "best", version.version)
        # a run of another job, without an output folder tag
        with mlflow.start_run() as untagged:
            pass
    finally:
        mlflow.set_tracking_uri(previous)
    return out, uri, run.info.run_id, version.version, untagged.info.run_id


def test_run_id_and_registered_models_lead_to_the_output_folder(logged_run):
    out, uri, run_id, version, _ = logged_run
    expected = find_policies(out).run_dir
    for source in ({"mlflow_run_id": run_id}, {"registered_model": f"soup_demo/{version}"},
                   {"registered_model": "soup_demo@best"}):
        args = ServerArgs.model_validate({**source, "tracking_uri": uri})
        assert find_policies(args.resolved_output_dir()).run_dir == expected, source


def test_mlflow_lookup_errors_name_what_is_missing(logged_run):
    out, uri, _, _, untagged = logged_run
    cases = [({"mlflow_run_id": "0" * 32}, "not found"), ({"mlflow_run_id": untagged}, "raypref.output_dir"),
             ({"registered_model": "nope/1"}, "'nope/1' not found"), ({"registered_model": "soup_demo"}, "name@alias")]
    for source, match in cases:
        with pytest.raises(PolicyDiscoveryError, match=match):
            ServerArgs.model_validate({**source, "tracking_uri": uri}).resolved_output_dir()


def test_exactly_one_source_and_a_store(logged_run, monkeypatch):
    out, uri, run_id, _, _ = logged_run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for bad, match in (({}, "exactly one"), ({"output_dir": str(out), "mlflow_run_id": run_id}, "exactly one"),
                       ({"mlflow_run_id": run_id}, "needs tracking_uri")):
        with pytest.raises(ValueError, match=match):
            ServerArgs.model_validate(bad)
