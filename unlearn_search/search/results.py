"""What a finished trial reports, which trial is best, and the summary table (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from unlearn_search.evaluation.evaluate import metric_values
from unlearn_search.search.space import Constraint, Objective

OBJECTIVE = "objective"  # what a single-objective search maximizes or minimizes
PASSES = "passes_utility_threshold"
MEETS_CONSTRAINTS = "meets_constraints"  # the space's own constraints; only where it has some
# Only a finished trial's result holds it: the quick reports during training carry estimates
# of the same metrics under the same names, so a metric's presence says nothing.
TRIAL_OUTPUT = "trial_output"
CONSTRAINT_PENALTY = 0.0  # the single objective of a trial under the MMLU threshold (aggregates lie in [0, 1])


def final_metrics(results: dict) -> dict[str, float]:
    """A finished trial's metrics: the evaluation's, and whether it passes the MMLU constraint."""
    values = metric_values(results)
    passes = results.get(PASSES)
    values[PASSES] = 1.0 if passes in (None, True) else 0.0
    if results.get("mmlu_threshold") is not None:
        values["mmlu_threshold"] = results["mmlu_threshold"]
    return values


def with_constraints(metrics: dict[str, float], constraints: Sequence[Constraint]) -> dict[str, float]:
    """A finished trial's metrics with whether it meets the space's constraints (none: unchanged)."""
    if not constraints:
        return metrics
    return {**metrics, MEETS_CONSTRAINTS: float(all(c.met(metrics) for c in constraints))}


def feasible(metrics: dict[str, Any]) -> bool:
    """Whether a finished trial passes the MMLU threshold and meets the space's constraints."""
    return metrics.get(PASSES, 1.0) >= 1.0 and metrics.get(MEETS_CONSTRAINTS, 1.0) >= 1.0


MMLU_CONSTRAINT = "mmlu"  # an Optuna constraint of a finished trial: feasible at <= 0
TUNE_TRIAL_ATTR = "tune_trial_id"  # an Optuna trial's user attribute: its Tune trial (and MLflow run name)
AGGREGATE_ATTR = "aggregate"  # a finished Optuna trial's user attribute: its SemEval aggregate


def mmlu_violation(metrics: dict[str, float]) -> float:
    """How far a finished trial's MMLU falls below the threshold: <= 0 when it passes (Optuna's
    convention for a constraint), so that a sampler ranks failing trials by how badly they fail."""
    margin = metrics["mmlu_threshold"] - metrics["mmlu"] if "mmlu_threshold" in metrics else 0.0
    return min(margin, 0.0) if metrics.get(PASSES, 1.0) >= 1.0 else max(margin, 1e-9)


def evaluated(result: dict[str, Any]) -> bool:
    """Whether a trial's last result is its full evaluation (else it was pruned, stopped or failed)."""
    return TRIAL_OUTPUT in result


def trial_status(result: dict[str, Any], failed: bool, pruned: bool) -> str:
    """How a trial ended: ``completed`` (fully evaluated), ``pruned`` (the pruner stopped it),
    ``stopped`` (cut by the time budget, for good, or by an interrupted search, which ``--resume``
    continues) or ``failed``. Only a pruned trial was judged: a stopped one's estimates say
    nothing against it."""
    if failed:
        return "failed"
    if evaluated(result):
        return "completed"
    return "pruned" if pruned else "stopped"


def objective_value(metrics: dict[str, float], objective: Objective) -> float:
    """The single objective: the metric, or the worst value when the MMLU threshold or one of the
    space's constraints fails.

    A failing trial still teaches the sampler (it sees a bad value, not a gap) and can never be
    the best trial. With the objective's ``signal``, a feasible trial's value adds its weighted
    signal (a missing or NaN signal adds nothing): what the sampler sees, never what picks the best.
    """
    if not feasible(metrics):
        return CONSTRAINT_PENALTY if objective.mode == "max" else 1.0 - CONSTRAINT_PENALTY
    value = metrics[objective.metric]
    signal = metrics.get(objective.signal) if objective.signal else None
    if signal is None or not _finite(signal):
        return value
    return value + (1 if objective.mode == "max" else -1) * objective.signal_weight * signal


def _dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    better = [(x >= y) if m == "max" else (x <= y) for x, y, m in zip(a, b, modes)]
    strictly = [(x > y) if m == "max" else (x < y) for x, y, m in zip(a, b, modes)]
    return all(better) and any(strictly)


def pareto_front(rows: list[dict[str, Any]], objectives: Sequence[Objective]) -> list[dict[str, Any]]:
    """The rows no other row dominates on the objectives (rows missing one are left out)."""
    usable = [r for r in rows if all(_finite(r.get(o.metric)) for o in objectives)]
    modes = [o.mode for o in objectives]
    values = [[r[o.metric] for o in objectives] for r in usable]
    return [r for r, v in zip(usable, values) if not any(_dominates(w, v, modes) for w in values if w is not v)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def best_trial(rows: list[dict[str, Any]], objectives: Sequence[Objective]) -> dict[str, Any] | None:
    """The best finished trial that passes the MMLU threshold and meets the space's constraints.

    One objective: its best value. Several: on the Pareto front, the trial with the highest
    SemEval aggregate (the figure every trial is finally compared on).
    """
    passing = [r for r in rows if r.get("status") == "completed" and PASSES in r and feasible(r)]
    if not passing:
        return None
    if len(objectives) == 1:
        objective = objectives[0]
        candidates = [r for r in passing if _finite(r.get(objective.metric))]
        if not candidates:
            return None
        pick = max if objective.mode == "max" else min
        return pick(candidates, key=lambda r: r[objective.metric])
    front = pareto_front(passing, objectives)
    return max(front, key=lambda r: r.get("aggregate", -math.inf)) if front else None


def summary_table(rows: list[dict[str, Any]], params: Sequence[str], best_id: str | None) -> str:
    """A plain-text table of every trial: status, searched parameters and headline metrics.

    A trial that did not finish shows its last quick estimates, marked ``~``: they were taken on
    a subset and are not comparable with finished trials' figures.
    """
    metrics = ["aggregate", "task_aggregate", "mia_score", "mmlu", PASSES]
    if any(MEETS_CONSTRAINTS in row for row in rows):
        metrics.append(MEETS_CONSTRAINTS)
    header = ["trial", "status"] + list(params) + metrics + ["seconds"]
    lines = [header]
    for row in rows:
        estimate = "" if row.get("status") == "completed" else "~"
        cells = [row["trial_id"] + (" *" if row["trial_id"] == best_id else ""), row.get("status", "?")]
        cells += [cell_text(row.get(name)) for name in params]
        cells += [estimate + cell_text(row[name]) if row.get(name) is not None else "-" for name in metrics]
        cells.append(cell_text(row.get("seconds")))
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def cell_text(value: Any) -> str:
    """A table cell: 4 significant digits, ``-`` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)
