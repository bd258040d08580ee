import mlflow
import pytest

from raypref import tracking


def test_run_logs_params_metrics_artifacts_in_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    art = tmp_path / "plot.txt"
    art.write_text("x")
    with tracking.start_run("unit", {"a": {"b": 3}}, tmp_path / "out") as run:
        tracking.log_metrics({"loss": 0.5, "note": "skip"}, step=2)
        tracking.log_artifact(art)
    assert (tmp_path / "out" / "mlflow.db").exists()
    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["a.b"] == "3"
    assert got.data.metrics == {"loss": 0.5}
    client = mlflow.MlflowClient()
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plot.txt", "config.json"} <= names


def test_failing_job_ends_run_failed(tmp_path):
    with pytest.raises(RuntimeError):
        with tracking.start_run("unit", {"a": 1}, tmp_path) as run:
            raise RuntimeError("boom")
    assert mlflow.get_run(run.info.run_id).info.status == "FAILED"
