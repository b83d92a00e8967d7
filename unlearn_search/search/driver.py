"""The search driver: a Ray Tune ``Tuner`` over the trial runner, Optuna sampling, ASHA pruning.

Each Tune trial is a thin driver that launches one Ray Train run (``training.trial.run_trial``):
its workers report quick metrics at every schedule boundary (forwarded to Tune, where the
pruner compares them), then the trial's full evaluation is reported once as its result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.evaluation.evaluate import METRIC_NAMES, MIA_ATTACKS
from unlearn_search.search.results import (
    MEETS_CONSTRAINTS,
    OBJECTIVE,
    PASSES,
    TRIAL_OUTPUT,
    TUNE_TRIAL_ATTR,
    best_trial,
    final_metrics,
    objective_value,
    summary_table,
    trial_status,
    with_constraints,
)
from unlearn_search.search.space import PROGRESS, Constraint, SearchSpace

logger = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
BEST_DIR = "best"
STATE_FILE = "search.json"
ORIGINAL_DIR = "original"  # the original model's evaluation, the best trial's reference
RETRAINED_DIR = "retrained"  # the retrained gold standard's, where one was built
ORIGINAL_KEY_FILE = "settings.json"  # what the original's evaluation in ORIGINAL_DIR was scored on
RESULT_FILE = "result.json"  # a finished trial's final metrics, in its own directory
TRIAL_DRIVER_MEMORY = 512 * 2**20
# Ray Tune's verbosity at each of the search's: 1 shows our one line per trial event
# (``progress.TrialLines``) without Tune's tables; 2 adds Tune's status tables and each result.
TUNE_VERBOSITY = {0: 0, 1: 0, 2: 2}


@dataclass
class SearchOptions:
    """Where and how a search runs; the space file says what is searched."""

    model: str = "small"
    data: str | None = None
    output: Path | None = None  # default outputs/<space name>
    address: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    time_budget_s: float | None = None
    seed: int = 0
    storage: str | None = None  # Optuna storage URL; default SQLite under the output
    resume: bool = False
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int | None = None
    num_cpus: int | None = None
    final_mmlu_limit: int | None = None  # the best trial's re-evaluation: all of MMLU by default
    final_split: str = "all"
    final_max_new_tokens: int = 256  # the official setting
    verbose: int = 1


@dataclass
class SearchOutcome:
    output: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_dir: Path | None
    best_evaluation: dict | None
    seconds: float
    dashboard_url: str | None
    study_name: str
    storage: str
    table: str = ""
    constraints: tuple[Constraint, ...] = ()
    # The reference models scored as the best trial was: "original", and "retrained" (the gold
    # standard) where one was built for a reference target.
    references: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def best_final(self) -> dict[str, float] | None:
        """The best trial's full re-evaluation as metrics, with whether it meets the constraints."""
        if self.best_evaluation is None:
            return None
        return with_constraints(final_metrics(self.best_evaluation), self.constraints)


def _trial_evaluation(space: SearchSpace, threshold: float | None):
    from unlearn_search.evaluation import EvalConfig

    ev = space.evaluation
    return EvalConfig(
        split=ev.split,
        max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size,
        mmlu_shots=ev.mmlu_shots,
        mmlu_limit=ev.mmlu_limit,
        mmlu_threshold=threshold,
    )


def search_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run of the sampled settings, then its full evaluation."""
    import ray.tune

    from unlearn_search.training.trial import Resources, run_trial

    trial_id = ray.tune.get_context().get_trial_id()
    output = Path(context["output"]) / TRIALS_DIR / trial_id
    saved = output / RESULT_FILE
    if saved.exists():
        # Finished before the driver died, but Tune's experiment checkpoint had not caught up:
        # report the same result again instead of training the trial a second time.
        ray.tune.report(json.loads(saved.read_text()))
        return
    # resume=True: a trial Tune restarts (a restored search) continues its own Ray Train run.
    result = run_trial(
        context["model_dir"],
        context["data_root"],
        config,
        output,
        Resources(**context["resources"]),
        context["evaluation"],
        name="train",
        storage=output / "ray",
        resume=True,
        teacher_cache_dir=Path(context["output"]) / "teacher_cache",
        export=False,  # the best trial alone is exported, after the search (export_best)
    )
    metrics = with_constraints(final_metrics(result.evaluation), context["constraints"])
    objectives = context["objectives"]
    if len(objectives) == 1:
        metrics[OBJECTIVE] = objective_value(metrics, objectives[0])
    nodes = sorted({n for record in result.metrics_history for n in record.get("worker_nodes", [])})
    metrics.update(
        {PROGRESS: 100.0, "seconds": result.seconds, TRIAL_OUTPUT: str(output), "worker_nodes": ",".join(nodes)}
    )
    if result.kept_step is not None:
        metrics["kept_step"] = result.kept_step
    partial = saved.with_suffix(".tmp")
    partial.write_text(json.dumps(metrics, indent=2))
    partial.replace(saved)
    ray.tune.report(metrics)


def end_stopped_trials(storage, study_name: str, rows: list[dict[str, Any]]) -> int:
    """Mark FAIL the study's trials that the time budget cut: Tune ends them for good without
    telling the searcher, so they would stay RUNNING in the study forever. Returns how many.

    Only after a search that ran out of time: an interrupted search's stopped trials continue
    with ``--resume`` and must stay RUNNING.
    """
    stopped = {row["trial_id"] for row in rows if row["status"] == "stopped"}
    return _fail_running(storage, study_name, lambda tune_trial: tune_trial in stopped) if stopped else 0


def _fail_running(storage, study_name: str, ends) -> int:
    """Mark FAIL the study's RUNNING trials whose Tune trial id (None if never named) ``ends``
    says; returns how many."""
    import optuna

    study = optuna.load_study(study_name=study_name, storage=storage)
    ended = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if ends(trial.user_attrs.get(TUNE_TRIAL_ATTR)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            ended += 1
    return ended


def end_orphaned_trials(storage, study_name: str, experiment: Path) -> int:
    """Mark FAIL the study's RUNNING trials that the restored Tune experiment does not hold: the
    driver died after Optuna began them and before Tune saved its state, so no resumed trial will
    ever end them (Tune asks the searcher for their places again). Returns how many."""
    from ray.tune import ExperimentAnalysis

    restored = {trial.trial_id for trial in ExperimentAnalysis(str(experiment)).trials}
    return _fail_running(storage, study_name, lambda tune_trial: tune_trial not in restored)


def _scheduler(space: SearchSpace):
    from ray.tune.schedulers import FIFOScheduler

    from unlearn_search.search.schedulers import TrainingASHA, TrainingMedianStopping

    s, target = space.search, space.pruning_objective
    # Progress is a percent of training, so rungs compare trials at the same fraction of their
    # schedule whatever their chunk counts; nothing is pruned once training is done (schedulers.py).
    if s.pruner == "asha":
        return TrainingASHA(
            PROGRESS, target.metric, target.mode, s.grace_period, s.reduction_factor, space.constraints, s.min_delta
        )
    if s.pruner == "median":
        return TrainingMedianStopping(
            PROGRESS, target.metric, target.mode, s.grace_period, space.constraints, s.min_delta
        )
    return FIFOScheduler()


def _state(output: Path) -> dict:
    path = output / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def absolute_uri(uri: str) -> str:
    """A store's URI as it names the same store from any working directory: a relative SQLite
    (Optuna, MLflow) or file-store path (MLflow) made absolute, and an HTTP server's without a
    trailing slash. What ``--resume`` saves and compares, so that it resumes from another
    directory into the same store. Anything else (``databricks``, ``postgresql://``, SQLite's
    ``file:`` URI filenames) is left as given."""
    sqlite = re.fullmatch(r"(sqlite(?:\+\w+)?:///)(.*)", uri, re.DOTALL)
    if sqlite:
        prefix, path = sqlite.groups()
        # Absolute already (a fourth slash), in memory, or an SQLite URI filename: as given.
        if not path or path.startswith(("/", ":memory:", "file:")):
            return uri
        return prefix + os.path.abspath(path)
    if uri.startswith("file:") and not uri.startswith("file://"):
        return Path(os.path.abspath(uri[len("file:") :])).as_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    if ":" not in uri and uri not in ("databricks", "databricks-uc", "uc"):  # MLflow's plain path of a file store
        return os.path.abspath(uri)
    return uri


def prepare_output(space: SearchSpace, options: SearchOptions) -> Path:
    """The search's output directory; a finished or interrupted search there is never overwritten."""
    output = Path(options.output or Path("outputs") / space.name).resolve()
    state = _state(output)
    if options.resume:
        if not (output / TUNE_DIR).exists():
            raise UnlearnSearchError(f"--resume: no search to resume in {output} (expected {output / TUNE_DIR})")
        if state.get("space") != space.name:
            raise UnlearnSearchError(f"--resume: {output} holds search {state.get('space')!r}, not {space.name!r}")
        if options.storage and state.get("storage") and absolute_uri(options.storage) != absolute_uri(state["storage"]):
            # The restored searcher keeps writing to the first one: two stores would each hold half.
            raise UnlearnSearchError(
                f"--storage {options.storage}: this search's study is in {state['storage']} "
                f"({STATE_FILE}); omit --storage to resume it there"
            )
    elif (output / TUNE_DIR).exists():
        raise UnlearnSearchError(
            f"--output {output}: already holds a search (use --resume to continue it, or another --output)"
        )
    output.mkdir(parents=True, exist_ok=True)
    return output


def study_storage(output: Path, options: SearchOptions) -> str:
    """The Optuna study's storage: ``--storage``, else on ``--resume`` the first run's, else a
    SQLite file in the output."""
    saved = _state(output).get("storage") if options.resume else None
    return absolute_uri(options.storage) if options.storage else saved or f"sqlite:///{output / 'optuna.db'}"


def original_mmlu(model_dir: Path, data_root: Path, space: SearchSpace, output: Path, limit: int | None) -> float:
    """The original model's MMLU on ``limit`` questions per subject (all if None), the utility
    threshold's baseline (``evaluation.baseline``): kept in the output and the user cache, and
    scored on the cluster where neither has it (minutes for all of MMLU)."""
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.evaluation.baseline import original_mmlu as baseline
    from unlearn_search.evaluation.baseline import score_mmlu
    from unlearn_search.training.trial import on_cluster

    ev = space.evaluation
    evaluation = EvalConfig(mmlu_shots=ev.mmlu_shots, mmlu_limit=limit, batch_size=ev.batch_size)

    def on_the_cluster() -> float:
        return on_cluster(
            space.resources, score_mmlu, model_dir, data_root, ev.mmlu_shots, limit, ev.batch_size, "auto", True
        )

    return baseline(model_dir, data_root, evaluation, kept=output, score=on_the_cluster)


def mmlu_threshold(model_dir: Path, data_root: Path, space: SearchSpace, output: Path, limit: int | None) -> float:
    """The space's utility threshold, else the usual fraction of the original model's MMLU on the
    same questions: the search's subset for trials, the final questions for the best trial."""
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.evaluation.evaluate import utility_threshold

    threshold = space.evaluation.mmlu_threshold
    if threshold is not None:
        return threshold
    return utility_threshold(EvalConfig(original_mmlu=original_mmlu(model_dir, data_root, space, output, limit)))


def uses_reference_attack(space: SearchSpace) -> bool:
    """Whether the space optimizes or constrains a reference-attack metric: then its boundary
    estimates need the original's document NLLs before the first trial. (Every full evaluation
    scores the attack anyway, scoring those NLLs once if no one did.)"""
    named = [o.metric for o in space.objectives] + [c.metric for c in space.constraints]
    return any(metric.startswith(MIA_ATTACKS["reference"]) for metric in named)


def score_original_documents(model_dir: Path, paths, space: SearchSpace) -> None:
    """The original's NLL of each MIA document in the trials' dtype, scored on the cluster (once
    per checkpoint: ``evaluation.reference`` keeps it), so that the trials' quick evaluations
    score the reference attack too."""
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.evaluation.reference import original_nll
    from unlearn_search.training.trial import on_cluster

    config = EvalConfig(batch_size=space.evaluation.batch_size, dtype=space.settings.get("dtype", "auto"))
    on_cluster(space.resources, original_nll, model_dir, paths, config)


def fitted_space(space: SearchSpace, model_dir: Path, data_root: Path, output: Path) -> SearchSpace:
    """The space with ``params.lr`` fitted by the lr range test on this model (``lr_range.py``),
    its first start's settings run on the trial's resources; the curve, onset and range are kept
    in the output (``lr_range.json``, ``plots/lr_range.png``), and a kept test of the same
    settings is read back rather than run again."""
    from unlearn_search.search.lr_range import (
        RANGE_FILE,
        FittedRange,
        fitted_param,
        moved_starts,
        range_settings,
        run_range_test,
    )
    from unlearn_search.tracking.plots import range_plot

    test, path = space.lr_range_test, output / RANGE_FILE
    settings = {**space.settings, **space.starts[0]}
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("settings") == range_settings(settings, test) and saved.get("test") == dataclasses.asdict(test):
        record = saved
    else:
        print(f"lr range test: {test.steps} steps of start 1, lr {test.low:.0e} to {test.high:.0e}", flush=True)
        result = run_range_test(model_dir, data_root, settings, space.resources, test, output, output / "teacher_cache")
        record = {**result.as_dict(), "test": dataclasses.asdict(test)}
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(path)
        range_plot(record, output / "plots" / "lr_range.png")
    fitted = FittedRange(**record["fitted"])
    starts, notes = moved_starts(space.starts, fitted)
    onset = f"onset {fitted.onset:.3g}" if fitted.onset is not None else "the forget NLL never rose"
    capped = f", capped by the {fitted.capped_by} curve" if fitted.capped_by else ""
    print(f"lr range test: {onset}; lr searched in [{fitted.low:.3g}, {fitted.high:.3g}]{capped}", flush=True)
    for note in notes:
        print(f"lr range test: {note}", flush=True)
    params = tuple(fitted_param(p, fitted) if p.name == "lr" else p for p in space.params)
    return dataclasses.replace(space, params=params, starts=starts)


def run_search(
    space: SearchSpace, options: SearchOptions, callbacks: list | None = None, on_start=None
) -> SearchOutcome:
    """Run (or resume) a search; returns every trial's row, the best trial and its export.

    ``callbacks`` are Ray Tune callbacks (tracking); ``on_start(dashboard_url)`` is called once
    the Ray cluster is up.
    """
    from unlearn_search.data import resolve_data
    from unlearn_search.models import resolve_model
    from unlearn_search.search.schedulers import BUDGET_FILE

    started = time.time()
    output = prepare_output(space, options)
    paths = resolve_data(options.data)
    model_dir = resolve_model(options.model, paths)
    storage_url = study_storage(output, options)
    kept = output / "space.yaml"
    if space.source and Path(space.source).resolve() != kept.resolve():  # --resume may name the kept copy
        shutil.copyfile(space.source, kept)

    dashboard_url = _start_cluster(options)
    if on_start:
        on_start(dashboard_url)
    threshold = mmlu_threshold(model_dir, paths.root, space, output, space.evaluation.mmlu_limit)
    if uses_reference_attack(space):
        score_original_documents(model_dir, paths, space)
    if space.lr_range_test is not None and not options.resume:  # a restored searcher keeps its fitted space
        space = fitted_space(space, model_dir, paths.root, output)
    state = {"space": space.name, "source": str(space.source or ""), "model": str(model_dir)}
    state.update(storage=storage_url, study=space.name, mmlu_threshold=threshold)
    (output / STATE_FILE).write_text(json.dumps(state, indent=2))

    context = {
        "model_dir": str(model_dir),
        "data_root": str(paths.root),
        "output": str(output),
        "resources": dataclasses.asdict(space.resources),
        "evaluation": _trial_evaluation(space, threshold),
        "objectives": list(space.objectives),
        "constraints": list(space.constraints),
    }
    grid = _tuner(space, options, context, output, storage_url, callbacks).fit()

    rows = trial_rows(grid, space)
    if (output / BUDGET_FILE).exists():  # the trials it cut will never finish
        end_stopped_trials(storage_url, space.name, rows)
    best = best_trial(rows, space.objectives)
    table = summary_table(rows, [p.name for p in space.params], best["trial_id"] if best else None)
    # Written before the best trial's long re-evaluation, so a failure there loses no trial.
    (output / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
    (output / "summary.txt").write_text(table + "\n")
    best_dir, best_evaluation, references = None, None, {}
    if best is not None:
        config, best_dir, best_evaluation = _export(best, model_dir, paths.root, space, options, output)
        references = _references(config, model_dir, paths.root, space, output)
    return SearchOutcome(
        output,
        rows,
        best,
        best_dir,
        best_evaluation,
        time.time() - started,
        dashboard_url,
        space.name,
        storage_url,
        table,
        space.constraints,
        references,
    )


def _start_cluster(options: SearchOptions) -> str | None:
    """Ray, started or joined, with its dashboard; returns the dashboard's URL."""
    from unlearn_search.training.cluster import init_ray

    # Intermediate reports carry the quick metrics, the final one the full evaluation: they differ.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    context = init_ray(
        options.address,
        num_cpus=options.num_cpus,
        dashboard=True,
        dashboard_host=options.dashboard_host,
        dashboard_port=options.dashboard_port,
    )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def _tuner(space: SearchSpace, options: SearchOptions, context: dict, output: Path, storage_url: str, callbacks):
    """Tune's ``Tuner`` over the trial driver: restored from the output with ``--resume``, else new."""
    import optuna
    import ray.tune
    from ray.tune import CheckpointConfig, FailureConfig, RunConfig, TuneConfig, Tuner

    from unlearn_search.search.progress import TrialLines
    from unlearn_search.search.schedulers import BUDGET_FILE, TimeBudget
    from unlearn_search.search.searcher import make_searcher

    # The trial itself waits on its Ray Train run, whose workers hold the CPUs and GPUs, then
    # evaluates; it reserves only memory so that it never blocks its own workers' placement.
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(search_trial, context=context), {"memory": TRIAL_DRIVER_MEMORY}
    )
    if options.resume:
        orphans = end_orphaned_trials(storage_url, space.name, output / TUNE_DIR)
        if orphans:
            logger.warning(
                "%d trial(s) of the study began as the search was interrupted and were never run: FAIL", orphans
            )
        return Tuner.restore(
            str(output / TUNE_DIR),
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    storage = optuna.storages.RDBStorage(storage_url) if "://" in storage_url else storage_url
    num_samples = options.num_samples or space.search.num_samples
    tune_config = TuneConfig(
        search_alg=make_searcher(space, storage, space.name, options.seed, num_samples),
        scheduler=_scheduler(space),
        num_samples=num_samples,
        max_concurrent_trials=options.max_concurrent or space.search.max_concurrent,
    )
    budget = options.time_budget_s or space.search.time_budget_s
    if options.verbose > 0:
        callbacks = [*(callbacks or []), TrialLines([p.name for p in space.params], space.objectives, budget_s=budget)]
    run_config = RunConfig(
        name=TUNE_DIR,
        storage_path=str(output),
        callbacks=callbacks or [],
        stop=TimeBudget(budget, output / BUDGET_FILE) if budget else None,
        failure_config=FailureConfig(max_failures=0),
        checkpoint_config=CheckpointConfig(num_to_keep=1),
        verbose=TUNE_VERBOSITY[options.verbose],
    )
    return Tuner(trainable, tune_config=tune_config, run_config=run_config)


def _export(best: dict, model_dir: Path, data_root: Path, space: SearchSpace, options: SearchOptions, output: Path):
    """The final evaluation's settings and ``export_best``'s folder and scores; a failure is one
    line saying that the trials are kept and how to retry."""
    try:
        config = final_config(best, model_dir, data_root, space, options, output)
        return (config, *export_best(best, config, model_dir, data_root, space.resources, output))
    except Exception as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UnlearnSearchError(
            f"exporting the best trial {best['trial_id']} failed ({reason}); the trials are "
            f"in {output / 'trials.json'} and {output / 'summary.txt'}, and --resume "
            f"retries the export"
        ) from error


def _references(config, model_dir: Path, data_root: Path, space: SearchSpace, output: Path) -> dict[str, dict]:
    """The original and, where it was built (``bench/baselines.py`` builds it for a reference
    target), the retrained gold standard, each scored as the best trial was; one that cannot be
    scored is left out of the report, and the search loses nothing."""
    from unlearn_search.models.target import retrained_dir

    models = {ORIGINAL_DIR: model_dir}
    retrained = retrained_dir(model_dir)
    if (retrained / "config.json").is_file():
        models[RETRAINED_DIR] = retrained
    scored = {}
    for name, directory in models.items():
        try:
            scored[name] = evaluate_reference(name, directory, config, model_dir, data_root, space, output)
        except Exception as error:
            logger.warning("could not score the %s model for the report (%s)", name, error)
    return scored


def started_with(trial_path: str) -> dict[str, Any]:
    """The configuration Tune wrote when the trial started (its JSON logger's ``params.json``): a
    trial cut before its first report, read back by ``--resume``, has no result to carry it."""
    params = Path(trial_path) / "params.json"
    return json.loads(params.read_text()) if params.is_file() else {}


def trial_rows(grid, space: SearchSpace) -> list[dict[str, Any]]:
    """One flat row per trial: id, status (``results.trial_status``), parameters, final metrics."""
    from unlearn_search.search.schedulers import pruned_record

    rows = []
    searched = [p.name for p in space.params]
    for result in grid:
        metrics = dict(result.metrics or {})
        config = dict(result.config or {}) or started_with(result.path)
        trial_id = metrics.get("trial_id") or Path(result.path).name
        pruned = pruned_record(result.path)
        status = trial_status(metrics, result.error is not None, pruned is not None)
        row = {"trial_id": trial_id, "status": status, "path": result.path}
        if status == "pruned":
            row["pruned_at"] = pruned["at"]  # progress, percent of training
        row.update({name: config.get(name) for name in searched})
        row["settings"] = config
        for key in (*METRIC_NAMES, PASSES, MEETS_CONSTRAINTS, OBJECTIVE, TRIAL_OUTPUT, PROGRESS, "worker_nodes"):
            if key in metrics:
                row[key] = metrics[key]
        # A finished trial's own wall time: a resumed search re-reports it in milliseconds.
        row["seconds"] = metrics.get("seconds", metrics.get("time_total_s"))
        if result.error is not None:
            row["error"] = (
                str(result.error).strip().splitlines()[-1][:500] if str(result.error).strip() else repr(result.error)
            )
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def final_config(
    best: dict, model_dir: Path, data_root: Path, space: SearchSpace, options: SearchOptions, output: Path
):
    """The best trial's re-evaluation: the final split and MMLU questions, in the trial's dtype."""
    from unlearn_search.evaluation import EvalConfig

    ev = space.evaluation
    return EvalConfig(
        split=options.final_split,
        max_new_tokens=options.final_max_new_tokens,
        batch_size=ev.batch_size,
        mmlu_shots=ev.mmlu_shots,
        mmlu_limit=options.final_mmlu_limit,
        mmlu_threshold=mmlu_threshold(model_dir, data_root, space, output, options.final_mmlu_limit),
        progress=options.verbose > 0,
        dtype={**space.settings, **best.get("settings", {})}.get("dtype", "auto"),
    )


@contextmanager
def built_aside(directory: Path) -> Iterator[Path]:
    """A folder built in ``<directory>.partial`` and moved in whole at the end: a failure
    leaves the earlier folder in place."""
    partial = directory.with_name(f"{directory.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    yield partial
    if directory.exists():
        shutil.rmtree(directory)
    partial.rename(directory)


def export_best(best: dict, config, model_dir: Path, data_root: Path, resources, output: Path) -> tuple[Path, dict]:
    """Export the best trial as a Hugging Face checkpoint, from the original and the trial's
    trained parameters, and re-evaluate it with the full evaluation (``config``)."""
    from unlearn_search.training.trial import MODEL_DIR, TRAINED_DIR, evaluate_on_cluster, export_model, on_cluster

    trained = Path(best[TRIAL_OUTPUT]) / TRAINED_DIR
    if not trained.is_dir():
        raise UnlearnSearchError(f"{trained}: the trial's trained parameters are gone")
    with built_aside(output / BEST_DIR) as partial:
        settings = best.get("settings", {})
        on_cluster(resources, export_model, trained, model_dir, settings, partial / MODEL_DIR, None, False)
        # On the cluster, like a trial's evaluation: the head node may have no GPU (or no CPU to spare).
        evaluation = evaluate_on_cluster(partial / MODEL_DIR, model_dir, data_root, config, partial, resources)
        (partial / "trial.json").write_text(json.dumps(best, indent=2, default=str))
    return output / BEST_DIR, evaluation


def evaluate_reference(
    name: str, directory: Path, config, model_dir: Path, data_root: Path, space: SearchSpace, output: Path
) -> dict:
    """A reference model (the original, or the retrained gold standard) scored as the best trial
    was, on the original's items, its MMLU from ``original_mmlu``'s cache (scored once per model
    and set of questions). Kept in ``output/<name>/``; a resumed search reads it back when it was
    scored on the same settings."""
    from unlearn_search.evaluation.evaluate import RESULTS_FILE
    from unlearn_search.training.trial import evaluate_on_cluster

    key = {"split": config.split, "max_new_tokens": config.max_new_tokens, "dtype": config.dtype}
    key["mmlu_limit"] = config.mmlu_limit
    saved = output / name / ORIGINAL_KEY_FILE
    if saved.is_file() and json.loads(saved.read_text()) == key:
        return json.loads((saved.parent / RESULTS_FILE).read_text())
    mmlu = original_mmlu(directory, data_root, space, output, config.mmlu_limit)
    with built_aside(output / name) as partial:
        results = evaluate_on_cluster(directory, model_dir, data_root, config, partial, space.resources, mmlu)
        (partial / ORIGINAL_KEY_FILE).write_text(json.dumps(key))
    return results
