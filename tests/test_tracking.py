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


def test_child_runs_are_nested_named_and_keep_their_own_data(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    adapter = tmp_path / "adapter.txt"
    adapter.write_text("weights")
    with tracking.start_run("unit", {"seeds": 2}, tmp_path / "out") as parent:
        for seed in (0, 1):
            with tracking.child_run(f"policy P1A seed {seed}", kind="policy",
                                    params={"preference": "P1A", "train": {"seed": seed}},
                                    tags={"raypref.seed": str(seed)}):
                tracking.log_step_metrics([{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.5 - seed}])
                tracking.log_artifact(adapter, artifact_path="adapter")
        with pytest.raises(ValueError):
            with tracking.child_run("baseline P-MORL seed 0", kind="baseline"):
                raise ValueError("diverged")
        tracking.log_metrics({"win_rate": 0.6})  # back on the parent
    client = mlflow.MlflowClient()
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {r.info.run_name: r for r in children}
    assert set(by_name) == {"policy P1A seed 0", "policy P1A seed 1", "baseline P-MORL seed 0"}
    one = by_name["policy P1A seed 1"]
    assert one.data.params == {"preference": "P1A", "train.seed": "1"}
    assert one.data.tags["raypref.kind"] == "policy" and one.data.tags["raypref.seed"] == "1"
    assert [m.value for m in client.get_metric_history(one.info.run_id, "loss")] == [0.7, -0.5]
    assert [a.path for a in client.list_artifacts(one.info.run_id, "adapter")] == ["adapter/adapter.txt"]
    assert by_name["baseline P-MORL seed 0"].info.status == "FAILED"
    assert one.info.status == "FINISHED"
    got = mlflow.get_run(parent.info.run_id)
    assert got.data.metrics == {"win_rate": 0.6} and got.info.status == "FINISHED"


def test_child_run_needs_a_parent_and_step_rows_need_a_step():
    with pytest.raises(RuntimeError, match="parent"):
        with tracking.child_run("orphan"):
            pass
    with pytest.raises(KeyError, match="row 0"):
        tracking.log_step_metrics([{"loss": 1.0}])


def test_step_metrics_writer_logs_only_new_rows_to_the_live_run(tmp_path, capsys):
    with tracking.start_run("unit", {}, tmp_path) as run:
        target = tracking.live_metrics("train.")
        assert target == tracking.LiveMetrics(mlflow.get_tracking_uri(), run.info.run_id, "train.")
        writer = tracking.StepMetricsWriter(target)
        history = [{"step": 1, "loss": 0.9, "lr": 0.1}, {"step": 2, "loss": 0.8, "lr": 0.1}]
        writer.write(history)
        client = mlflow.MlflowClient()
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train.loss")] == [1, 2]
        history.append({"step": 3, "loss": 0.7, "lr": 0.05})
        writer.write(history)  # only step 3 is new
        losses = client.get_metric_history(run.info.run_id, "train.loss")
        assert sorted((m.step, m.value) for m in losses) == [(1, 0.9), (2, 0.8), (3, 0.7)]
    # a store that fails stops the live curves, not the training
    broken = tracking.StepMetricsWriter(tracking.LiveMetrics(target.tracking_uri, "no-such-run"))
    broken.write(history)
    assert broken.failed and "live metrics to run no-such-run" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="no active MLflow run"):
        tracking.live_metrics()


def test_progress_line_gives_steps_per_second_and_eta():
    from raypref.train.runner import _throughput

    assert _throughput(10, 50, 5.0) == " | 2 steps/s, ETA 0:00:25"
    assert _throughput(1, 7200, 2.0) == " | 0.5 steps/s, ETA 4:00:00"
    assert _throughput(0, 10, 1.0) == ""
