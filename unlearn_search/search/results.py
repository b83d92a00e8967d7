"""What a finished trial reports, which trial is best, and the summary table (pure functions)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from unlearn_search.search.space import Objective

OBJECTIVE = "objective"  # what a single-objective search maximizes or minimizes
PASSES = "passes_utility_threshold"
CONSTRAINT_PENALTY = 0.0  # the single objective of a trial under the MMLU threshold (aggregates lie in [0, 1])


def final_metrics(results: dict) -> dict[str, float]:
    """The flat metrics of a full evaluation (``evaluation_results.json``) under the platform's names."""
    forget, retain = results["forget-set"], results["retain-set"]
    values = {
        "aggregate": results["aggregate-score"],
        "task_aggregate": results["harmonic-mean-task-aggregate"],
        "mia_auc": results["mia_loss_acc"],
        "mia_score": results["mia_final_score"],
        "mmlu": results["mmlu_average"],
        "forget_regurgitation": forget["overall-regurgitation-score"],
        "forget_knowledge": forget["overall-knowledge-score"],
        "retain_regurgitation": retain["overall-regurgitation-score"],
        "retain_knowledge": retain["overall-knowledge-score"],
    }
    values["forget_efficacy"] = 1 - _mean(values["forget_regurgitation"], values["forget_knowledge"])
    values["retain_utility"] = _mean(values["retain_regurgitation"], values["retain_knowledge"])
    passes = results.get(PASSES)
    values[PASSES] = 1.0 if passes in (None, True) else 0.0
    if results.get("mmlu_threshold") is not None:
        values["mmlu_threshold"] = results["mmlu_threshold"]
    return values


def _mean(*values: float) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def objective_value(metrics: dict[str, float], objective: Objective) -> float:
    """The single objective: the metric, or the worst value when the MMLU constraint fails.

    A failing trial still teaches the sampler (it sees a bad value, not a gap) and can never be
    the best trial.
    """
    if metrics.get(PASSES, 1.0) >= 1.0:
        return metrics[objective.metric]
    return CONSTRAINT_PENALTY if objective.mode == "max" else 1.0 - CONSTRAINT_PENALTY


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
    """The best finished trial that passes the MMLU constraint.

    One objective: its best value. Several: on the Pareto front, the trial with the highest
    SemEval aggregate (the figure every trial is finally compared on).
    """
    passing = [r for r in rows if r.get("status") == "completed" and r.get(PASSES, 0.0) >= 1.0]
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
    """A plain-text table of every trial: status, searched parameters and headline metrics."""
    metrics = ["aggregate", "task_aggregate", "mia_score", "mmlu", PASSES, "seconds"]
    header = ["trial", "status"] + list(params) + metrics
    lines = [header]
    for row in rows:
        cells = [row["trial_id"] + (" *" if row["trial_id"] == best_id else ""), row.get("status", "?")]
        for name in list(params) + metrics:
            cells.append(_cell(row.get(name)))
        lines.append(cells)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)
