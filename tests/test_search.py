"""A real search end to end: run_search.py on the tiny target, a real MLflow server, the Ray dashboard.

Two Tune trials (each a 2-worker Ray Train run with DeepSpeed ZeRO-3), Optuna TPE with SQLite
storage, ASHA, the driver killed and resumed; then everything read back through the MLflow
client and the Optuna storage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "tests" / "spaces" / "tiny_gd.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(2000).decode(errors="replace")
    except Exception as error:  # noqa: BLE001 - any failure means "not answering yet"
        return getattr(error, "code", 0) or 0, str(error)


def _tree_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(directory).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture()
def mlflow_server(tmp_path):
    port = _free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while _get(uri + "/health")[0] != 200:
        if process.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'mlflow-server.log').read_text()[-2000:]}")
        time.sleep(1)
    yield uri
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


@pytest.mark.slow
def test_search_end_to_end_killed_and_resumed_with_mlflow_server_and_dashboard(
    tmp_path, tiny_target, data_paths, mlflow_server, capsys
):
    """The whole search on a real MLflow server, with the Ray dashboard asked while it runs; its
    driver killed (with everything it started) once a trial has finished, then resumed. Nothing
    done is lost or repeated, and everything is then read back from the study, the output and
    the MLflow server. The best trial's export is then made to fail, and the error says how to retry."""
    import signal
    import sqlite3

    import mlflow
    import optuna
    import pandas as pd
    from mlflow.tracking import MlflowClient

    before = _tree_digest(tiny_target)
    output = tmp_path / "search"
    # The study outside the output: --resume must find it, and the tracking server, untold.
    database = tmp_path / "elsewhere" / "study.db"
    database.parent.mkdir()
    # Constraints every finished trial meets: they reach the trials and their results, and change
    # nothing else; an lr range test before the trials; a signal beside the objective for the sampler.
    space = tmp_path / "tiny_gd.yaml"
    # One epoch per trial (one boundary each): the kill and resume are between trials.
    space.write_text(
        SPACE.read_text()
        .replace(
            "objective: {metric: aggregate, mode: max}",
            "objective: {metric: aggregate, mode: max, signal: forget_signal}",
        )
        .replace("  epochs: {distribution: int, low: 1, high: 2}\n", "")
        .replace("epochs: 2, forget_weight", "forget_weight")
        .replace("  batch_size: 8\n", "  batch_size: 8\n  epochs: 1\n")
        + "constraints: [{metric: retain_utility, min: 0.0}, {metric: mmlu, max: 1.0}]\n"
        + "lr_range_test: {steps: 8, probe_every: 4, probe_items: 4}\n"
    )
    options = ["--model", str(tiny_target), "--data", str(data_paths.root), "--output", str(output)]
    options += ["--num-cpus", "2", "--final-mmlu-limit", "2", "--final-split", "validation"]
    options += ["--final-max-new-tokens", "32", "--verbose", "0"]
    search = [sys.executable, str(REPO / "run_search.py"), "--space", str(space), *options]
    command = search + ["--storage", f"sqlite:///{database}", "--tracking-uri", mlflow_server]
    first = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, start_new_session=True
    )
    lines: list[str] = []
    dashboard: dict = {}

    def read():
        for line in first.stdout:
            lines.append(line)
            if line.startswith("Ray dashboard: http") and "url" not in dashboard:
                dashboard["url"] = line.split(": ", 1)[1].strip()
                # Asked while the search runs: the dashboard answers on 127.0.0.1.
                dashboard["status"], dashboard["body"] = _get(dashboard["url"])

    def completed() -> int:
        if not database.exists():
            return 0
        try:
            with sqlite3.connect(database) as connection:
                return connection.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.time() + 900
    try:
        while completed() < 1:
            assert first.poll() is None, "".join(lines)[-3000:]
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started, at once
        first.wait(timeout=60)
        reader.join(timeout=30)
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120)
    (tmp_path / "first.log").write_text("".join(lines))
    assert dashboard.get("url", "").startswith("http://127.0.0.1:"), "".join(lines)[-3000:]
    assert dashboard["status"] == 200 and "Ray" in dashboard["body"], dashboard
    storage = f"sqlite:///{database}"
    done_before = {
        t.number: t.params
        for t in optuna.load_study(study_name="tiny_gd", storage=storage).trials
        if t.state == optuna.trial.TrialState.COMPLETE
    }
    assert len(done_before) >= 1

    # A fresh start on the same output is refused: nothing already done can be overwritten. (These
    # refusals come before Ray or any model is started, so the CLI's main runs them in this process.)
    from unlearn_search.cli import main

    assert main(["search", *command[2:]]) == 2
    assert "already holds a search (use --resume" in capsys.readouterr().err
    # Resuming with another study or tracking store is refused; with neither named, the first
    # run's are used. The space may be the copy the search keeps in its output.
    resume = [sys.executable, str(REPO / "run_search.py"), "--space", str(output / "space.yaml"), *options, "--resume"]
    for option, other in (
        ("--storage", f"sqlite:///{tmp_path / 'other.db'}"),
        ("--tracking-uri", f"sqlite:///{tmp_path / 'other-runs.db'}"),
    ):
        assert main(["search", *resume[2:], option, other]) == 2
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith(f"unlearn-search: error: {option} {other}: this search"), message
    resumed = subprocess.run(resume, capture_output=True, text=True, cwd=tmp_path, timeout=1500)
    log = resumed.stdout + resumed.stderr
    (tmp_path / "resumed.log").write_text(log)
    assert resumed.returncode == 0, log[-5000:]
    # The terminal shows none of the third-party lines silenced by name (quiet.py) or switched off.
    noise = ["FutureWarning", "LOAD_GLOBAL", "PreemptionWatcher", "Setting accelerator to CPU", "built successfully"]
    noise += ["Using default tokenizer", "Reporting training result", "Failed to query Ray Train Controller"]
    assert not [line for line in log.splitlines() if any(n in line for n in noise)], log[-5000:]

    # The study: the finished trial kept and not run again, two in all, none left RUNNING (one
    # Optuna began as the driver died, before Tune saved it, is FAIL); the first is the published
    # start, with its lr in the range the lr range test fitted.
    study = optuna.load_study(study_name="tiny_gd", storage=storage)
    states = optuna.trial.TrialState
    finished = [t for t in study.trials if t.state in (states.COMPLETE, states.PRUNED)]
    assert len(finished) == 2, [(t.number, t.state) for t in study.trials]
    assert not [t for t in study.trials if t.state == states.RUNNING]
    for number, params in done_before.items():
        assert study.trials[number].state == states.COMPLETE and study.trials[number].params == params
    first_trial = min(study.trials, key=lambda t: t.number)
    fitted = json.loads((output / "lr_range.json").read_text())["fitted"]
    inside = fitted["low"] <= 5e-4 <= fitted["high"]  # else moved to the range's log-midpoint
    assert first_trial.params["lr"] == pytest.approx(5e-4 if inside else math.sqrt(fitted["low"] * fitted["high"]))
    assert first_trial.params["trainable"] == "full"
    assert all(fitted["low"] <= t.params["lr"] <= fitted["high"] for t in finished)

    rows = json.loads((output / "trials.json").read_text())
    completed_rows = [r for r in rows if r["status"] == "completed"]
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2 and completed_rows
    assert all(r["status"] in ("completed", "pruned") for r in rows)
    assert all(r["seconds"] > 5 for r in rows), rows  # the finished trial's own time, not its re-report's
    for row in completed_rows:
        assert 0.0 <= row["aggregate"] <= 1.0
        assert row["meets_constraints"] == 1.0
        assert row["forget_nll"] > 0 and row["retain_nll"] > 0  # every metric a trial reports
        # The sampler's value: the aggregate and the signal's default weight; the table's is the aggregate.
        assert row["objective"] == pytest.approx(row["aggregate"] + 0.05 * row["forget_signal"])
        assert any(
            t.values == [pytest.approx(row["objective"])] and t.user_attrs["aggregate"] == row["aggregate"]
            for t in finished
        )
        evaluation = json.loads((Path(row["trial_output"]) / "evaluation_results.json").read_text())
        assert evaluation["aggregate-score"] == pytest.approx(row["aggregate"])

    # The best trial: re-evaluated, exported as a Hugging Face checkpoint with its CSVs and JSON.
    best = output / "best"
    assert (best / "model" / "config.json").exists() and (best / "forget_0.csv").exists()
    best_results = json.loads((best / "evaluation_results.json").read_text())
    # The utility threshold is a fraction of the original model's MMLU on the same questions:
    # one per subject during the search, two in the re-evaluation (--final-mmlu-limit 2).
    from unlearn_search.evaluation.evaluate import DEFAULT_THRESHOLD_FRACTION
    from unlearn_search.evaluation.mmlu import evaluate_mmlu
    from unlearn_search.models import load_model, load_tokenizer

    @functools.cache
    def original(limit):
        model, tokenizer = load_model(tiny_target), load_tokenizer(tiny_target)
        return evaluate_mmlu(model, tokenizer, data_paths.mmlu, 5, limit, 32)["average"]

    search_threshold = json.loads((output / "search.json").read_text())["mmlu_threshold"]
    assert search_threshold == pytest.approx(DEFAULT_THRESHOLD_FRACTION * original(1))
    assert best_results["mmlu_questions"] == 2 * 57
    assert best_results["mmlu_threshold"] == pytest.approx(DEFAULT_THRESHOLD_FRACTION * original(2))
    kept = json.loads((output / "original_mmlu.json").read_text())
    # (A retrained gold standard beside the target, where one was built, is kept there too.) The
    # target's own report, where an earlier test wrote one, answers for its questions and is not copied.
    from unlearn_search.evaluation.baseline import reported_mmlu

    reported = {limit for limit in (1, 2) if reported_mmlu(tiny_target, data_paths.root, 5, limit) is not None}
    limits = sorted(e["key"]["limit"] for e in kept if not e["key"]["model"].endswith("-retrained"))
    assert limits == sorted({1, 2} - reported) and 2 not in reported
    # Re-evaluated on the split asked for (--final-split validation), where trials used train items.
    validation = set(pd.read_parquet(data_paths.benchmark / "forget_validation.parquet")["id"])
    best_ids = set(pd.read_csv(best / "forget_0.csv")["id"])
    trial_ids = set(pd.read_csv(Path(completed_rows[0]["trial_output"]) / "forget_0.csv")["id"])
    assert best_ids and best_ids <= validation and not trial_ids & validation
    # The original, scored as the best trial was (the same items, its MMLU from the cache), and
    # the report that sets them side by side.
    scored = output / "original"
    original_results = json.loads((scored / "evaluation_results.json").read_text())
    assert set(pd.read_csv(scored / "forget_0.csv")["id"]) == best_ids
    assert original_results["mmlu_scored_before"] and original_results["mmlu_average"] == pytest.approx(original(2))
    assert original_results["forget-set"]["overall-knowledge-score"] >= 0.9  # the target memorized them
    report = (output / "report.html").read_text()
    assert f"Best trial {json.loads((best / 'trial.json').read_text())['trial_id']}" in report
    assert "plots/best_per_task.png" in report and (output / "plots" / "best_per_task.png").is_file()
    assert f"report: {output / 'report.html'}" in log
    assert "best trial" in log and "aggregate" in log
    assert "meets_constraints" in (output / "summary.txt").read_text().splitlines()[0]
    assert "meets retain_utility >= 0.0: True" in log and "meets mmlu <= 1.0: True" in log

    # MLflow, read back from the server: one parent run, one nested run per trial.
    assert not (output / "mlflow.db").exists() and not (output / "optuna.db").exists()
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("unlearn-search/tiny_gd").experiment_id])
    parents = [r for r in runs if r.data.tags.get("unlearn_search.role") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and sorted(c.data.tags["trial_id"] for c in children) == sorted(
        r["trial_id"] for r in rows
    )
    parent = parents[0]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert parent.data.params["search_seed"] == "0" and "seed" not in parent.data.params  # seed: a trial setting
    assert parent.data.params["pruner"] == "asha" and float(parent.data.params["min_delta"]) == 0.02
    by_trial = {c.data.tags["trial_id"]: c for c in children}
    for row in rows:
        run = by_trial[row["trial_id"]]
        assert float(run.data.params["lr"]) == pytest.approx(row["lr"])
        assert run.data.params["method"] == "gd" and run.data.params["trainable"] == row["trainable"]
        assert run.data.tags["status"] == row["status"]
        # At least one boundary's estimate; the evaluation once (a resumed trial's too), and
        # only for a finished trial.
        assert len(client.get_metric_history(run.info.run_id, "estimate.task_aggregate")) >= 1
        history = client.get_metric_history(run.info.run_id, "task_aggregate")
        assert len(history) == (row["status"] == "completed")
        if row["status"] == "completed":
            assert run.data.metrics["aggregate"] == pytest.approx(row["aggregate"])
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"evaluation_results.json", "forget_0.csv", "retain_0.csv"} <= artifacts
    best_row = next(r for r in rows if r["trial_id"] == parent.data.tags["best_trial"])
    assert parent.data.metrics["best.aggregate"] == pytest.approx(best_row["aggregate"])
    # The re-evaluation of the best trial, with whether it meets the constraints (the CLI's lines).
    assert parent.data.metrics["best_full.aggregate"] == pytest.approx(best_results["aggregate-score"])
    assert parent.data.metrics["best_full.meets_constraints"] == 1.0
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.txt", "plots", "best", "report.html"} <= parent_artifacts
    plots = {Path(a.path).name for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"optimization_history.png", "lr_range.png", "best_per_task.png"} <= plots
    assert "lr_range.json" in parent_artifacts
    assert float(parent.data.params["lr_range.low"]) == pytest.approx(fitted["low"])
    assert float(parent.data.params["lr_range.high"]) == pytest.approx(fitted["high"])
    local = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id,
        artifact_path="best/model/config.json",
        tracking_uri=mlflow_server,
        dst_path=str(tmp_path / "dl"),
    )
    assert json.loads(Path(local).read_text())["model_type"] == "olmo"

    # Disk: each trial keeps at most resources.checkpoints_to_keep (default 1) Ray Train checkpoints.
    for row in rows:
        kept = [p for p in (output / "trials" / row["trial_id"] / "ray").glob("*/checkpoint_*") if p.is_dir()]
        assert 1 <= len(kept) <= 1, kept
    # The input model directory is never written.
    assert _tree_digest(tiny_target) == before

    # Only the best trial was exported as a model; the others keep their trained parameters.
    assert not any((output / "trials" / r["trial_id"] / "model").exists() for r in rows)
    # The best trial's export fails (its trained parameters are gone): the trials are still
    # written, the earlier export is left as it was, and the error says how to retry.
    exported = _tree_digest(best)
    (Path(best_row["trial_output"]) / "trained").rename(tmp_path / "moved-trained")
    for name in ("trials.json", "summary.txt"):
        (output / name).unlink()
    failed = subprocess.run(resume, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert failed.returncode == 2, failed.stdout[-3000:] + failed.stderr[-3000:]
    message = failed.stderr.strip().splitlines()[-1]
    assert f"exporting the best trial {best_row['trial_id']} failed" in message and "--resume retries" in message, (
        message
    )
    rewritten = json.loads((output / "trials.json").read_text())
    assert [(r["trial_id"], r["status"]) for r in rewritten] == [(r["trial_id"], r["status"]) for r in rows]
    assert best_row["trial_id"] in (output / "summary.txt").read_text()
    assert _tree_digest(best) == exported


def test_a_trial_cut_by_the_time_budget_is_stopped_not_pruned(tmp_path):
    """Tune ends a trial the pruner stops and one the time budget cuts alike. The first was judged
    (its estimate fell below ASHA's rung), the second was not: the results, MLflow and the Optuna
    study must say which, or a search cut by its budget reads as one whose pruner rejected a
    trial. Real Ray Tune with the search's own Optuna searcher (SQLite), ASHA and MLflow tracker;
    a stand-in trainable keeps the timing exact."""
    import optuna
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    from unlearn_search.search.driver import (
        TUNE_TRIAL_ATTR,
        _scheduler,
        end_orphaned_trials,
        end_stopped_trials,
        trial_rows,
    )
    from unlearn_search.search.progress import TrialLines
    from unlearn_search.search.results import OBJECTIVE, TRIAL_OUTPUT, summary_table
    from unlearn_search.search.schedulers import BUDGET_FILE, TimeBudget
    from unlearn_search.search.searcher import make_searcher
    from unlearn_search.search.space import parse_space
    from unlearn_search.tracking import MLflowTracker, default_tracking_uri
    from unlearn_search.training.cluster import init_ray

    def trial(config):
        """Stands in for ``search_trial`` (defined here: workers cannot import a test module):
        one quick estimate at half of training, then, unless it sleeps past the budget, the
        full evaluation."""
        if config["lr"] > 0.98:
            time.sleep(300)  # cut by the time budget before its first report
        tune.report({"progress": 50.0, "aggregate": config["lr"]})
        if config["lr"] > 0.92:
            time.sleep(300)  # cut by the search's time budget
        tune.report({"progress": 100.0, "aggregate": config["lr"]})  # the last boundary, as the workers report it
        tune.report({"progress": 100.0, "aggregate": config["lr"], OBJECTIVE: config["lr"], TRIAL_OUTPUT: "-"})

    # One at a time, in this order: 0.9 finishes; 0.1 falls below the rung 0.9 set and is pruned
    # at 50 %; 0.95 passes the rung and is still training when the budget runs out.
    space = parse_space(
        {
            "name": "budget",
            "settings": {"method": "gd", "schedule": "joint"},
            "params": {"lr": {"distribution": "float", "low": 0.01, "high": 1.0}},
            "starts": [{"lr": 0.9}, {"lr": 0.1}, {"lr": 0.95}],
            "search": {"pruner": "asha", "grace_period": 50, "reduction_factor": 2},
        }
    )
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = default_tracking_uri(tmp_path)
    tracker = MLflowTracker(uri, "unlearn-search/budget", tmp_path, "budget", {"space": "budget"})
    printed: list[str] = []
    lines = TrialLines(["lr"], space.objectives, budget_s=30, write=printed.append)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    init_ray(num_cpus=2)
    try:
        tuner = tune.Tuner(
            trial,
            tune_config=tune.TuneConfig(
                search_alg=make_searcher(space, optuna.storages.RDBStorage(storage), "budget", seed=0, num_samples=3),
                scheduler=_scheduler(space),
                num_samples=3,
                max_concurrent_trials=1,
            ),
            run_config=tune.RunConfig(
                name="tune",
                storage_path=str(tmp_path),
                callbacks=[tracker, lines],
                verbose=0,
                stop=TimeBudget(30, tmp_path / BUDGET_FILE),
            ),
        )
        rows = trial_rows(tuner.fit(), space)
        # A trial cut before its first report, read back from the experiment's state as --resume
        # reads it: no result carries its parameters; the configuration Tune wrote when it
        # started does.
        tune.Tuner(
            trial,
            param_space={"lr": 0.99},
            run_config=tune.RunConfig(
                name="cut", storage_path=str(tmp_path), verbose=0, stop=TimeBudget(5, tmp_path / "cut.json")
            ),
        ).fit()
        restored = trial_rows(tune.Tuner.restore(str(tmp_path / "cut"), trial).get_results(), space)
    finally:
        ray.shutdown()
    assert [(r["lr"], r["status"]) for r in restored] == [(0.99, "stopped")]
    by_lr = {row["lr"]: row for row in rows}
    assert {lr: row["status"] for lr, row in by_lr.items()} == {0.9: "completed", 0.1: "pruned", 0.95: "stopped"}
    assert by_lr[0.1]["pruned_at"] == 50.0 and "pruned_at" not in by_lr[0.95]
    table = summary_table(rows, ["lr"], None)
    assert "stopped" in table and "pruned" in table
    # The terminal: one line per trial event, the three ends told apart as the results tell them;
    # the last boundary's report is the trial's evaluation, which its end line gives.
    ends = [re.sub(r"completed in \d+ s", "completed in N s", line) for line in printed]
    assert all(re.match(r"\[ *[0-9.]+ of 0.5 min\] ", line) for line in ends), printed
    ends = [line.split("] ", 1)[1] for line in ends]
    ids = {lr: row["trial_id"] for lr, row in by_lr.items()}
    assert ends == [
        f"trial 1 ({ids[0.9]}) started: lr=0.9",
        f"trial 1 ({ids[0.9]}) at 50% of training: aggregate 0.900 (estimate)",
        f"trial 1 ({ids[0.9]}) completed in N s: aggregate 0.9000 (best so far)",
        f"trial 2 ({ids[0.1]}) started: lr=0.1",
        f"trial 2 ({ids[0.1]}) at 50% of training: aggregate 0.100 (estimate)",
        f"trial 2 ({ids[0.1]}) pruned at 50% of training",
        f"trial 3 ({ids[0.95]}) started: lr=0.95",
        f"trial 3 ({ids[0.95]}) at 50% of training: aggregate 0.950 (estimate)",
        f"trial 3 ({ids[0.95]}) stopped by the time budget or an interrupt",
    ], printed

    client = MlflowClient(tracking_uri=uri)
    runs = {
        r.data.tags.get("trial_id"): r
        for r in client.search_runs([client.get_experiment_by_name("unlearn-search/budget").experiment_id])
    }
    assert runs[by_lr[0.9]["trial_id"]].data.tags["status"] == "completed"
    assert runs[by_lr[0.1]["trial_id"]].data.tags["status"] == "pruned"
    assert runs[by_lr[0.1]["trial_id"]].info.status == "KILLED"
    # Tune never ends the cut trial: the tracker does, at the end of the experiment.
    assert runs[by_lr[0.95]["trial_id"]].data.tags["status"] == "stopped"
    assert runs[by_lr[0.95]["trial_id"]].info.status == "KILLED"

    # Each Optuna trial names its Tune trial; the searcher never hears of the cut one, so it stays
    # RUNNING until the driver ends it (Tune will not continue it, even with --resume).
    def states() -> dict:
        study = optuna.load_study(study_name="budget", storage=storage)
        return {t.user_attrs[TUNE_TRIAL_ATTR]: (t.state.name, t.value) for t in study.trials}

    assert states() == {ids[0.9]: ("COMPLETE", 0.9), ids[0.1]: ("PRUNED", None), ids[0.95]: ("RUNNING", None)}
    # The budget says it ran out (what the driver checks before ending them): an interrupt would not.
    assert json.loads((tmp_path / BUDGET_FILE).read_text()) == {"time_budget_s": 30}
    assert end_stopped_trials(storage, "budget", rows) == 1
    assert states()[ids[0.95]] == ("FAIL", None)
    assert end_stopped_trials(storage, "budget", rows) == 0

    # Trials Optuna began as the driver died, before Tune saved its state (one named, one not
    # yet): --resume ends them, and only them; a trial the experiment holds is left to Tune.
    study = optuna.load_study(study_name="budget", storage=storage)
    study.ask().set_user_attr(TUNE_TRIAL_ATTR, "never-saved")
    study.ask()
    held = study.ask()
    held.set_user_attr(TUNE_TRIAL_ATTR, ids[0.95])  # as if the cut trial were still RUNNING
    assert end_orphaned_trials(storage, "budget", tmp_path / "tune") == 2
    study = optuna.load_study(study_name="budget", storage=storage)
    assert [t.state.name for t in study.trials[-3:]] == ["FAIL", "FAIL", "RUNNING"]


@pytest.mark.slow
def test_two_searches_started_together_score_the_shared_original_once(tmp_path, tiny_target, data_paths):
    """Two searches of one model started together on one machine, each with its own Ray cluster,
    share the user cache. The original's MMLU is scored once, under a lock: one search waits and
    reads what the other wrote, and both finish (their one trial cut by a short time budget)."""
    model = tmp_path / "model"  # a checkpoint no search has scored yet (the key holds its path)
    shutil.copytree(tiny_target, model)
    (model / "target_evaluation.json").unlink(missing_ok=True)  # no report to read the figure from
    env = {**os.environ, "UNLEARN_SEARCH_CACHE": str(tmp_path / "cache")}
    runs = []
    for name in ("a", "b"):
        command = [sys.executable, str(REPO / "run_search.py"), "--space", str(SPACE), "--model", str(model)]
        command += ["--data", str(data_paths.root), "--output", str(tmp_path / name), "--num-cpus", "2"]
        # The shared entry is scored before the trials: a budget that cuts the one trial at once suffices.
        command += ["--num-samples", "1", "--time-budget", "5", "--verbose", "0"]
        command += ["--dashboard-port", str(_free_port())]
        log = open(tmp_path / f"{name}.log", "w")
        runs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=env))
    codes = [run.wait(timeout=1200) for run in runs]
    logs = [(tmp_path / f"{name}.log").read_text() for name in ("a", "b")]
    assert codes == [0, 0], [log[-3000:] for log in logs]
    waited = [log for log in logs if "waiting for another process building the original's MMLU" in log]
    assert len(waited) == 1, [log[-3000:] for log in logs]
    shared = json.loads((tmp_path / "cache" / "original_mmlu.json").read_text())
    assert [entry["key"]["limit"] for entry in shared] == [1]  # one entry, written once
    kept = [json.loads((tmp_path / name / "original_mmlu.json").read_text()) for name in ("a", "b")]
    assert kept[0] == kept[1] == shared
    for name in ("a", "b"):
        assert [row["status"] for row in json.loads((tmp_path / name / "trials.json").read_text())] == ["stopped"]
