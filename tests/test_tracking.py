"""MLflow tracking of a search: nested runs in a real local store, an unreachable server refused at
start, and logging calls kept (not dropped) when the server goes away mid-search."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.tracking import MLflowTracker, check_reachable, default_tracking_uri, resumed_tracking
from unlearn_search.tracking.mlflow_tracking import PENDING_FILE

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def _trial(trial_id: str, tmp_path: Path, **config):
    return SimpleNamespace(trial_id=trial_id, config=config, last_result={}, error_file=None)


def test_nested_runs_params_metrics_and_artifacts_in_a_local_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tmp_path)
    tracker = MLflowTracker(uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"})
    tracker.setup()
    trial = _trial("t1", tmp_path, lr=1e-4, method="gd")
    tracker.on_trial_start(0, [], trial)
    for step, value in enumerate([0.2, 0.5], start=1):  # the boundaries' quick estimates
        tracker.on_trial_result(
            0,
            [],
            trial,
            {
                "task_aggregate": value,
                "aggregate": value / 2,
                "loss": 1.5 * step,
                "training_iteration": step,
                "boundary": "epoch",
                "done": False,
            },
        )
    (tmp_path / "t1").mkdir()
    (tmp_path / "t1" / "evaluation_results.json").write_text(json.dumps({"aggregate-score": 0.4}))
    trial.last_result = {
        "aggregate": 0.4,
        "task_aggregate": 0.45,
        "training_iteration": 3,
        "trial_output": str(tmp_path / "t1"),
    }
    tracker.on_trial_result(0, [], trial, trial.last_result)  # the full evaluation
    tracker.on_trial_complete(0, [], trial)
    failed = _trial("t2", tmp_path, lr=1e-3, method="gd")
    failed.error_file = str(tmp_path / "error.txt")
    Path(failed.error_file).write_text("Traceback ...\nDivergedError: loss is nan at step 3\n")
    tracker.on_trial_start(0, [], failed)
    tracker.on_trial_error(0, [], failed)
    tracker.on_experiment_end([])

    client = MlflowClient(tracking_uri=uri)
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("unlearn-search/unit").experiment_id])
    }
    parent, one, two = runs["search-unit"], runs["t1"], runs["t2"]
    assert one.data.tags["mlflow.parentRunId"] == parent.info.run_id == two.data.tags["mlflow.parentRunId"]
    assert one.data.params["lr"] == "0.0001" and one.data.tags["status"] == "completed"
    # Defaults too (the method's own knobs included): the run alone says how to reproduce it.
    assert one.data.params["max_length"] == "512" and one.data.params["forget_weight"] == "1.0"

    # Estimates apart from the evaluation: the run's "aggregate" is only ever a full evaluation's.
    def history(name):
        return [(m.step, m.value) for m in client.get_metric_history(one.info.run_id, name)]

    assert history("estimate.task_aggregate") == [(1, 0.2), (2, 0.5)]
    assert history("estimate.aggregate") == [(1, 0.1), (2, 0.25)]
    assert history("task_aggregate") == [(3, 0.45)] and history("aggregate") == [(3, 0.4)]
    assert history("loss") == [(1, 1.5), (2, 3.0)]  # not an estimate: the training loss itself
    assert "done" not in one.data.metrics
    assert [a.path for a in client.list_artifacts(one.info.run_id)] == ["evaluation_results.json"]
    assert two.info.status == "FAILED" and two.data.tags["failure_reason"] == "DivergedError: loss is nan at step 3"
    # A resumed search continues the same parent run.
    again = MLflowTracker(uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"})
    assert again.parent_id == parent.info.run_id and again.trial_runs["t1"] == one.info.run_id


def test_a_stopped_trial_is_ended_and_reopened_when_a_resumed_search_continues_it(tmp_path):
    """Tune reports no end for a trial an interrupt (or the time budget) cuts: the tracker ends
    its run as stopped when the experiment ends, and reopens it when --resume continues it."""
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tmp_path)
    tracker = MLflowTracker(uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"})
    tracker.setup()
    done, cut = _trial("t1", tmp_path, lr=1e-4, method="gd"), _trial("t2", tmp_path, lr=1e-3, method="gd")
    for trial in (done, cut):
        tracker.on_trial_start(0, [], trial)
    done.last_result = {"aggregate": 0.4, "trial_output": str(tmp_path)}
    tracker.on_trial_complete(0, [], done)
    cut.last_result = {"aggregate": 0.2, "progress": 50.0}  # a quick estimate, then the interrupt
    tracker.on_experiment_end([done, cut])

    client = MlflowClient(tracking_uri=uri)

    def run(trial):
        return client.get_run(tracker.trial_runs[trial.trial_id])

    assert (run(done).info.status, run(done).data.tags["status"]) == ("FINISHED", "completed")
    assert (run(cut).info.status, run(cut).data.tags["status"]) == ("KILLED", "stopped")

    resumed = MLflowTracker(uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"})
    resumed.setup()
    resumed.on_trial_start(0, [], cut)
    assert (run(cut).info.status, run(cut).data.tags["status"]) == ("RUNNING", "running")
    cut.last_result = {"aggregate": 0.5, "trial_output": str(tmp_path)}
    resumed.on_trial_complete(0, [], cut)
    resumed.on_experiment_end([done, cut])
    assert (run(cut).info.status, run(cut).data.tags["status"]) == ("FINISHED", "completed")
    assert run(done).info.status == "FINISHED"  # ended in the first run, not again

    # A trial that finished just before the driver died, re-reported by the resumed search (Tune's
    # experiment state had not caught up): its run is not reopened and nothing is logged twice.
    again = MLflowTracker(uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"})
    again.setup()
    history = client.get_metric_history(run(done).info.run_id, "aggregate")
    again.on_trial_start(0, [], done)
    again.on_trial_result(0, [], done, {"aggregate": 0.4, "trial_output": str(tmp_path), "training_iteration": 3})
    again.on_trial_complete(0, [], done)
    again.on_experiment_end([done, cut])
    assert (run(done).info.status, run(done).data.tags["status"]) == ("FINISHED", "completed")
    assert len(client.get_metric_history(run(done).info.run_id, "aggregate")) == len(history)

    # The driver died after the trial's evaluation was logged but before its end: the re-report
    # ends the run, and its evaluation stays logged once.
    late = _trial("t3", tmp_path, lr=1e-3, method="gd")
    final = {"aggregate": 0.3, "trial_output": str(tmp_path), "training_iteration": 2}
    again.on_trial_start(0, [], late)
    again.on_trial_result(0, [], late, final)
    last = MLflowTracker(uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"})
    last.setup()
    last.on_trial_start(0, [], late)
    last.on_trial_result(0, [], late, {**final, "training_iteration": 1})
    late.last_result = final
    last.on_trial_complete(0, [], late)
    late_run = client.get_run(last.trial_runs["t3"])
    assert (late_run.info.status, late_run.data.tags["status"]) == ("FINISHED", "completed")
    assert len(client.get_metric_history(late_run.info.run_id, "aggregate")) == 1


def test_a_resumed_search_keeps_the_tracking_store_of_its_first_run(tmp_path, monkeypatch):
    """Its parent and trial runs live there: another store would start a second parent run. A
    relative store is saved as an absolute one, so a search resumed from another directory finds it."""
    first_dir, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first_dir.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(first_dir)
    MLflowTracker("sqlite:///first.db", "unlearn-search/a", tmp_path, "search-a", {})._save()
    first = f"sqlite:///{first_dir / 'first.db'}"
    monkeypatch.chdir(elsewhere)
    assert resumed_tracking(tmp_path, None, None) == (first, "unlearn-search/a")
    assert resumed_tracking(tmp_path, first, "unlearn-search/a") == (first, "unlearn-search/a")
    assert resumed_tracking(tmp_path, "sqlite:///../first/first.db", None)[0] == "sqlite:///../first/first.db"
    # The same relative name from here is another file: another store.
    with pytest.raises(
        UnlearnSearchError,
        match=r"^--tracking-uri sqlite:///first.db: this search's runs are in "
        rf"{re.escape(first)} \(mlflow.json\); omit --tracking-uri",
    ):
        resumed_tracking(tmp_path, "sqlite:///first.db", None)
    with pytest.raises(UnlearnSearchError, match=r"^--experiment b: this search's runs are in unlearn-search/a"):
        resumed_tracking(tmp_path, None, "b")
    assert resumed_tracking(tmp_path / "never-tracked", "sqlite:///x.db", None) == ("sqlite:///x.db", None)


def test_a_stores_uri_names_the_same_store_from_any_directory(tmp_path, monkeypatch):
    from unlearn_search.search.driver import absolute_uri

    monkeypatch.chdir(tmp_path)
    assert absolute_uri("sqlite:///studies.db") == f"sqlite:///{tmp_path / 'studies.db'}"
    assert absolute_uri(f"sqlite:///{tmp_path}/studies.db") == f"sqlite:///{tmp_path / 'studies.db'}"
    assert absolute_uri("sqlite:///s.db?timeout=5") == f"sqlite:///{tmp_path / 's.db'}?timeout=5"
    assert absolute_uri("sqlite:///:memory:") == "sqlite:///:memory:"
    assert absolute_uri("file:mlruns") == f"file://{tmp_path / 'mlruns'}"
    assert absolute_uri("mlruns") == str(tmp_path / "mlruns")
    assert absolute_uri("sqlite+pysqlite:///studies.db") == f"sqlite+pysqlite:///{tmp_path / 'studies.db'}"
    assert absolute_uri("./mlruns") == str(tmp_path / "mlruns")
    assert absolute_uri("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    # Not paths here: left exactly as given.
    for uri in (
        "postgresql://user@host/optuna",
        "databricks",
        "databricks://profile",
        "sqlite://",
        "sqlite:///file:studies.db?mode=ro&uri=true",
        "file:///abs/mlruns",
    ):
        assert absolute_uri(uri) == uri


def test_unreachable_server_is_one_clear_error_before_anything_starts(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(UnlearnSearchError) as caught:
        check_reachable(uri, timeout=2)
    assert f"--tracking-uri {uri}: the MLflow server does not answer" in str(caught.value)
    import subprocess

    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "run_search.py"),
            "--space",
            str(REPO / "tests" / "spaces" / "tiny_gd.yaml"),
            "--model",
            "tiny",
            "--output",
            str(tmp_path / "out"),
            "--tracking-uri",
            uri,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("unlearn-search: error: --tracking-uri")
    assert "Ray" not in result.stdout  # refused before Ray started


def test_logging_calls_are_kept_when_the_server_goes_away(tmp_path, capsys):
    uri = f"http://127.0.0.1:{_closed_port()}"
    tracker = MLflowTracker(uri, "e", tmp_path, "search", {}, retries=2, retry_wait_s=0.01)
    trial = _trial("t1", tmp_path, lr=1e-4)
    # MLflow's own defaults: the tracker's client fails fast by itself (with them, one call to a
    # closed port took about 4 minutes, and a search would stall at every trial event).
    assert not {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"} & set(os.environ)
    started = time.monotonic()
    tracker.setup()
    tracker.on_trial_start(0, [], trial)
    tracker.on_trial_result(0, [], trial, {"task_aggregate": 0.3, "training_iteration": 1})
    assert len(tracker.pending) == 3  # queued in order, nothing dropped
    tracker.on_experiment_end([])
    # The search's outcome after the trials: refused at once as well, and said so.
    from unlearn_search.search.driver import SearchOutcome

    tracker.log_outcome(
        SearchOutcome(
            output=tmp_path,
            rows=[],
            best=None,
            best_dir=None,
            best_evaluation=None,
            seconds=1.0,
            dashboard_url=None,
            study_name="s",
            storage="sqlite://",
        ),
        [],
    )
    assert time.monotonic() - started < 60  # eight failed calls, each refused at once
    assert "did not take the search's outcome" in capsys.readouterr().out
    assert not {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"} & set(os.environ)  # restored
    kept = [json.loads(line) for line in (tmp_path / PENDING_FILE).read_text().splitlines()]
    assert [k["what"] for k in kept] == ["parent", "trial_start", "metrics"]
    assert kept[2]["values"] == {"estimate.task_aggregate": 0.3} and "error" in kept[0]
    # No call got through, and --resume still finds the store and experiment the runs belong in.
    assert resumed_tracking(tmp_path, None, None) == (uri, "e")


def test_params_are_logged_on_the_retry_when_the_first_attempt_fails_after_creating_the_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tmp_path)
    tracker = MLflowTracker(
        uri, "unlearn-search/unit", tmp_path, "search-unit", {"space": "unit"}, retries=2, retry_wait_s=0.01
    )
    client = MlflowClient(tracking_uri=uri)
    real_log_batch, failures = client.log_batch, []

    def log_batch_failing_once(run_id, *args, **kwargs):  # the store is real; one call is made to fail
        if kwargs.get("params") and not failures:
            failures.append(run_id)
            raise ConnectionError("server went away")
        return real_log_batch(run_id, *args, **kwargs)

    client.log_batch = log_batch_failing_once
    tracker._client = client
    tracker.setup()  # the parent run is created, its params fail: the call stays queued
    assert failures and tracker.pending and tracker.pending[0]["what"] == "parent"
    trial = _trial("t1", tmp_path, lr=1e-4, method="gd")
    tracker.on_trial_start(0, [], trial)
    tracker.on_experiment_end([])
    assert not tracker.pending
    runs = {
        r.info.run_name: r
        for r in client.search_runs([client.get_experiment_by_name("unlearn-search/unit").experiment_id])
    }
    assert set(runs) == {"search-unit", "t1"}  # no second parent run
    assert runs["search-unit"].data.params == {"space": "unit"}
    assert runs["t1"].data.params["lr"] == "0.0001"
