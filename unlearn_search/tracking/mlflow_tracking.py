"""MLflow tracking of a search: one parent run, one nested run per trial, plots on the parent.

Everything is logged from the search driver (a Ray Tune callback), never from workers, so
an unreachable tracking server never slows or breaks training. A call that fails is queued
and retried at the next event and at the end; what still cannot be logged is written to
``mlflow_pending.jsonl`` in the search output and reported, never dropped silently.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.evaluation.evaluate import METRIC_NAMES, MIA_DIR, MMLU_METRICS_FILE, RESULTS_FILE
from unlearn_search.search.driver import absolute_uri
from unlearn_search.search.results import TRIAL_OUTPUT, evaluated, trial_status
from unlearn_search.search.schedulers import pruned_record
from unlearn_search.training.config import trial_config

PARENT_FILE = "mlflow.json"
PENDING_FILE = "mlflow_pending.jsonl"
# A trial's evaluation as the official scorer reads it (artifact path, under the run: same layout).
TRIAL_ARTIFACTS = (
    RESULTS_FILE,
    "forget_0.csv",
    "retain_0.csv",
    f"{MIA_DIR}/member_0.csv",
    f"{MIA_DIR}/nonmember_0.csv",
    MMLU_METRICS_FILE,
    "metrics.jsonl",
)
# Bookkeeping keys Tune adds to every result; not worth a metric series each.
SKIPPED_METRICS = {
    "timestamp",
    "time_this_iter_s",
    "time_since_restore",
    "iterations_since_restore",
    "pid",
    "done",
    "trained",
    "training_iteration",
    "resumed_from",
    "steps_total",
    "step",
}
# Tune gives a boundary's quick estimates the final metrics' names (the pruner compares them with
# finished trials'); a run keeps them apart, so that its "aggregate" is only ever a full evaluation's
# and a pruned or stopped trial never ranks among finished ones on an estimate.
ESTIMATE_PREFIX = "estimate."
# A run holds this metric only once its trial's full evaluation is logged: the evaluation is never logged twice.
FINAL_METRIC = "aggregate"


# The tracker's queue is the one retry layer: its calls run in Tune's controller, where MLflow's
# own retries (with backoff, about 4 minutes per call to a dead server) would hold every trial event.
FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextlib.contextmanager
def fail_fast():
    """MLflow's documented request settings at ``FAIL_FAST`` for the calls inside, unless the user
    set them; the environment is restored after."""
    saved = {key: os.environ.get(key) for key in FAIL_FAST}
    os.environ.update({key: value for key, value in FAIL_FAST.items() if saved[key] is None})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def default_tracking_uri(output: Path) -> str:
    return f"sqlite:///{Path(output).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """One clear error, before anything starts, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise OSError(f"HTTP {response.status}")
    except (OSError, urllib.error.URLError) as error:
        reason = getattr(error, "reason", error)
        raise UnlearnSearchError(
            f"--tracking-uri {uri}: the MLflow server does not answer ({reason}); "
            f"expected a running server (mlflow server --host 127.0.0.1) or omit the "
            f"option for a local store under the output"
        ) from None


def _saved(output: Path) -> dict:
    """What the tracker wrote to ``mlflow.json`` (its store, experiment and runs); empty before."""
    path = Path(output) / PARENT_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def resumed_tracking(output: Path, tracking_uri: str | None, experiment: str | None) -> tuple[str | None, str | None]:
    """On ``--resume``, the tracking URI and experiment of the first run (``mlflow.json``), which
    hold its parent and trial runs; naming others is one clear error."""
    saved = _saved(output)
    for option, given, key in (
        ("--tracking-uri", tracking_uri, "tracking_uri"),
        ("--experiment", experiment, "experiment"),
    ):
        same = absolute_uri if key == "tracking_uri" else str
        if given and saved.get(key) and same(given) != same(saved[key]):
            raise UnlearnSearchError(
                f"{option} {given}: this search's runs are in {saved[key]} ({PARENT_FILE}); "
                f"omit {option} to resume them there"
            )
    return tracking_uri or saved.get("tracking_uri"), experiment or saved.get("experiment")


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    values = {}
    for key, value in metrics.items():
        if key in SKIPPED_METRICS or key.startswith("config/"):
            continue
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values[key.replace("/", ".")] = float(value)
    return values


def _param_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


class MLflowTracker(Callback):
    """Ray Tune callback: a nested MLflow run per trial under the search's parent run.

    It keeps only plain data (URIs, ids, paths) between events so that Tune can pickle it into
    its experiment checkpoint; a resumed search continues the same parent and trial runs.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        output: Path,
        parent_name: str,
        parent_params: dict[str, Any],
        retries: int = 3,
        retry_wait_s: float = 1.0,
    ):
        self.tracking_uri, self.experiment = absolute_uri(tracking_uri), experiment
        self.output = Path(output).resolve()
        self.parent_name, self.parent_params = parent_name, parent_params
        self.retries, self.retry_wait_s = retries, retry_wait_s
        self.pending: list[dict] = []
        self._client = None
        state = _saved(self.output)
        self.parent_id: str | None = state.get("parent_id")
        self.trial_runs: dict[str, str] = state.get("trial_runs", {})
        # Runs whose params are logged: a run created by a call that then failed gets them on the retry.
        self.params_logged: set[str] = set(state.get("params_logged", []))
        self.ended: set[str] = set(state.get("ended", []))  # trials whose end is logged (or queued)
        # Of those, the ones that ended for good (not cut short): a resumed search whose driver died
        # before Tune recorded their end re-reports them, and nothing of theirs is logged twice.
        self.finished: set[str] = set(state.get("finished", []))

    # ---------------------------------------------------------------- plumbing

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def _save(self) -> None:
        (self.output / PARENT_FILE).write_text(
            json.dumps(
                {
                    "tracking_uri": self.tracking_uri,
                    "experiment": self.experiment,
                    "parent_id": self.parent_id,
                    "trial_runs": self.trial_runs,
                    "params_logged": sorted(self.params_logged),
                    "ended": sorted(self.ended),
                    "finished": sorted(self.finished),
                },
                indent=2,
            )
        )

    def _call(self, what: str, **kwargs) -> bool:
        """Run one logging call now, or queue it; earlier queued calls go first."""
        self.pending.append({"what": what, **kwargs})
        return self.flush()

    def flush(self, final: bool = False) -> bool:
        while self.pending:
            call = self.pending[0]
            for attempt in range(self.retries if final else 1):
                try:
                    with fail_fast():
                        self._apply(call)
                    break
                except Exception as error:  # any client failure: keep the call, try again later
                    call["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
                    if final and attempt + 1 < self.retries:
                        time.sleep(self.retry_wait_s)
            else:
                if final:
                    with open(self.output / PENDING_FILE, "a") as handle:
                        for left in self.pending:
                            handle.write(json.dumps(left, default=str) + "\n")
                    count, self.pending = len(self.pending), []
                    print(
                        f"unlearn-search: MLflow at {self.tracking_uri} did not take {count} logging calls; "
                        f"they are kept in {self.output / PENDING_FILE}"
                    )
                return False
            self.pending.pop(0)
        return True

    def _apply(self, call: dict) -> None:
        what, client = call["what"], self.client
        if what == "trial_start":
            self._trial_run(call["trial_id"], call["params"])
        elif what == "metrics":
            run_id = self._trial_run(call["trial_id"], None)
            from mlflow.entities import Metric

            if call.get("evaluated") and FINAL_METRIC in client.get_run(run_id).data.metrics:
                return  # logged before the driver died; the resumed search re-reports the finished trial
            stamp = int(call["time"] * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, call["step"]) for k, v in call["values"].items()])
        elif what == "trial_end":
            run_id = self._trial_run(call["trial_id"], None)
            client.set_tag(run_id, "status", call["status"])
            if call.get("reason"):
                client.set_tag(run_id, "failure_reason", call["reason"][:5000])
            directory = Path(call["directory"]) if call.get("directory") else None
            for name in TRIAL_ARTIFACTS:
                if directory and (directory / name).exists():
                    client.log_artifact(run_id, str(directory / name), str(Path(name).parent) if "/" in name else None)
            client.set_terminated(
                run_id,
                "FAILED"
                if call["status"] == "failed"
                else "KILLED"
                if call["status"] in ("pruned", "stopped")
                else "FINISHED",
            )
        elif what == "trial_resume":
            run_id = self._trial_run(call["trial_id"], None)
            client.set_tag(run_id, "status", "running")
            client.update_run(run_id, status="RUNNING")
        elif what == "parent":
            self._parent()
        else:  # pragma: no cover
            raise ValueError(what)

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if not self.tracking_uri.startswith(("http://", "https://")):
            location = (self.output / "mlartifacts").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _parent(self) -> str:
        if self.parent_id is None:
            run = self.client.create_run(
                self._experiment_id(), run_name=self.parent_name, tags={"unlearn_search.role": "search"}
            )
            self.parent_id = run.info.run_id
            self._save()
        self._log_params(self.parent_id, self.parent_params)
        return self.parent_id

    def _trial_run(self, trial_id: str, params: dict | None) -> str:
        if trial_id not in self.trial_runs:
            parent = self._parent()
            run = self.client.create_run(
                self._experiment_id(),
                run_name=trial_id,
                tags={
                    "mlflow.parentRunId": parent,
                    "trial_id": trial_id,
                    "unlearn_search.role": "trial",
                    "status": "running",
                },
            )
            self.trial_runs[trial_id] = run.info.run_id
            self._save()
        if params is not None:
            self._log_params(self.trial_runs[trial_id], params)
        return self.trial_runs[trial_id]

    def _log_params(self, run_id: str, params: dict) -> None:
        if run_id in self.params_logged:
            return
        from mlflow.entities import Param

        if params:
            self.client.log_batch(run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])
        self.params_logged.add(run_id)
        self._save()

    # ---------------------------------------------------------------- Tune events

    def setup(self, **info) -> None:
        # A restored search unpickles this callback as it was at the last experiment checkpoint;
        # the file holds every run created since.
        state = _saved(self.output)
        self.parent_id = state.get("parent_id", self.parent_id)
        self.trial_runs.update(state.get("trial_runs", {}))
        self.params_logged.update(state.get("params_logged", []))
        self.ended.update(state.get("ended", []))
        self._save()  # the store and experiment, before any call: --resume must find them even if none got through
        self._call("parent")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if trial.trial_id in self.finished:
            return
        if trial.trial_id not in self.trial_runs:
            # Every setting, defaults included: a run is reproducible from its params alone.
            self._call("trial_start", trial_id=trial.trial_id, params=trial_config(dict(trial.config)).flat())
        elif trial.trial_id in self.ended:  # stopped by an interrupt, continued by --resume
            self.ended.discard(trial.trial_id)
            self._save()
            self._call("trial_resume", trial_id=trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if trial.trial_id in self.finished:
            return
        values, final = _numeric(result), evaluated(result)
        if not final:
            values = {ESTIMATE_PREFIX + k if k in METRIC_NAMES else k: v for k, v in values.items()}
        if values:
            self._call(
                "metrics",
                trial_id=trial.trial_id,
                values=values,
                step=int(result.get("training_iteration", 0)),
                time=time.time(),
                evaluated=final,
            )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = ""
        error_file = getattr(trial, "error_file", None)
        if error_file and Path(error_file).exists():
            lines = [line for line in Path(error_file).read_text().splitlines() if line.strip()]
            reason = lines[-1] if lines else ""
        self._end(trial, failed=True, reason=reason)

    def on_experiment_end(self, trials, **info) -> None:
        # Tune reports no end for a trial the time budget or an interrupt cuts short, though it
        # marks it TERMINATED like any other: their runs would stay RUNNING. They end here as
        # "stopped"; the tracker keeps its own list of the trials it ended.
        for trial in trials:
            if trial.trial_id in self.trial_runs and trial.trial_id not in self.ended:
                self._end(trial)
        self.flush(final=True)

    def _end(self, trial, failed: bool = False, reason: str = "") -> None:
        if trial.trial_id in self.finished:
            return
        result = trial.last_result or {}
        status = trial_status(result, failed, pruned_record(getattr(trial, "path", None)) is not None)
        self.ended.add(trial.trial_id)
        if status != "stopped":
            self.finished.add(trial.trial_id)
        self._save()
        self._call(
            "trial_end",
            trial_id=trial.trial_id,
            status=status,
            reason=reason,
            directory=None if failed else result.get(TRIAL_OUTPUT),
        )

    # ---------------------------------------------------------------- the search's own results

    def log_outcome(self, outcome, plots: list[Path], report: Path | None = None) -> None:
        """Best trial (params, metrics, model, evaluation), summary table, plots and the report
        (at the artifacts' root, beside ``plots/``, whose images it shows) on the parent.

        A failure here is reported, not raised: everything logged is also in the search's output.
        """
        try:
            with fail_fast():  # a dead server: one refused call, not MLflow's minutes of retries per call
                self._log_outcome(outcome, plots, report)
        except Exception as error:  # any client failure: the results on disk stand
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            print(
                f"unlearn-search: MLflow at {self.tracking_uri} did not take the search's outcome ({reason}); "
                f"it is in {outcome.output}"
            )

    def _log_outcome(self, outcome, plots: list[Path], report: Path | None) -> None:
        self.flush(final=True)
        parent, client = self._parent(), self.client
        for row in outcome.rows:
            run_id = self.trial_runs.get(row["trial_id"])
            if run_id:
                client.set_tag(run_id, "status", row["status"])
        client.log_text(parent, outcome.table + "\n", "summary.txt")
        client.log_artifact(parent, str(outcome.output / "trials.json"))
        for plot in plots:
            client.log_artifact(parent, str(plot), "plots")
        if report is not None:
            client.log_artifact(parent, str(report))
        self._log_range(parent, outcome.output)
        client.log_metric(parent, "trials_completed", sum(r["status"] == "completed" for r in outcome.rows))
        client.log_metric(parent, "search_seconds", outcome.seconds)
        if outcome.best is not None:
            client.set_tag(parent, "best_trial", outcome.best["trial_id"])
            for key, value in _numeric({k: v for k, v in outcome.best.items() if k != "seconds"}).items():
                client.log_metric(parent, f"best.{key}", value)
            if outcome.best_final is not None:
                for key, value in _numeric(outcome.best_final).items():
                    client.log_metric(parent, f"best_full.{key}", value)
            client.log_artifacts(parent, str(outcome.best_dir), "best")
        client.set_terminated(parent, "FINISHED")

    def _log_range(self, parent: str, output: Path) -> None:
        """The lr range test's reading as params (``lr_range.onset``, ``.low``, ``.high``), its
        record and its plot, when the search ran one."""
        from mlflow.entities import Param

        from unlearn_search.search.lr_range import RANGE_FILE

        path = output / RANGE_FILE
        if not path.exists():
            return
        fitted = json.loads(path.read_text())["fitted"]
        self.client.log_batch(
            parent, params=[Param(f"lr_range.{key}", _param_value(value)) for key, value in sorted(fitted.items())]
        )
        self.client.log_artifact(parent, str(path))
        plot = output / "plots" / "lr_range.png"
        if plot.exists():
            self.client.log_artifact(parent, str(plot), "plots")
