"""A search's progress on the terminal: one line per trial start, estimate and end, in place of
Ray Tune's tables (a status table every half minute and a 30-line table per trial start and end)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from ray.tune import Callback

from unlearn_search.search.results import evaluated, feasible, trial_status
from unlearn_search.search.schedulers import TRAINED, pruned_record
from unlearn_search.search.space import PROGRESS, Objective

# A finished trial's line names these besides its objectives: the SemEval aggregate's three parts.
PARTS = {"task_aggregate": "task", "mia_score": "MIA score", "mmlu": "MMLU"}


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


class TrialLines(Callback):
    """Prints, as a search runs, each trial's start (its sampled values), each estimate at a
    boundary, and its end (how it ended, its metrics and time), with the best trial so far."""

    def __init__(
        self,
        params: Sequence[str],
        objectives: Sequence[Objective],
        *,
        budget_s: float | None = None,
        write: Callable[[str], None] = print,
    ):
        self.params = tuple(params)
        self.objectives = tuple(objectives)
        self.budget_s = budget_s
        self.write = write
        self.started = time.monotonic()
        self.numbers: dict[str, int] = {}
        self.ended: set[str] = set()
        self.best: tuple[float, float, str] | None = None  # one objective's: (as maximized, value, trial)

    def __setstate__(self, state: dict) -> None:
        # Tune pickles its callbacks with the experiment: a resumed search's clock starts again.
        self.__dict__.update(state, started=time.monotonic())

    def _name(self, trial) -> str:
        number = self.numbers.setdefault(trial.trial_id, len(self.numbers) + 1)
        return f"trial {number} ({trial.trial_id})"

    def _clock(self) -> str:
        minutes = (time.monotonic() - self.started) / 60
        budget = f" of {self.budget_s / 60:.3g}" if self.budget_s else ""
        return f"[{minutes:5.1f}{budget} min]"

    def _line(self, text: str) -> None:
        self.write(f"{self._clock()} {text}")

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        values = ", ".join(f"{p}={_value(trial.config.get(p))}" for p in self.params if p in trial.config)
        self._line(f"{self._name(trial)} started: {values}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        # The end of training is the trial's evaluation (in its workers), which its end line gives.
        if evaluated(result) or result.get(PROGRESS, 0.0) >= TRAINED:
            return
        estimates = ", ".join(
            f"{o.metric} {result[o.metric]:.3f}" for o in self.objectives if isinstance(result.get(o.metric), float)
        )
        if estimates:
            self._line(f"{self._name(trial)} at {result.get(PROGRESS, 0):.0f}% of training: {estimates} (estimate)")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        result = trial.last_result or {}
        status = trial_status(result, False, pruned_record(getattr(trial, "path", None)) is not None)
        if status != "completed":
            at = f" at {result[PROGRESS]:.0f}% of training" if PROGRESS in result else ""
            self._line(f"{self._name(trial)} {status}{at}")
            return
        metrics = [f"{o.metric} {result[o.metric]:.4f}" for o in self.objectives if o.metric in result]
        metrics += [
            f"{label} {result[key]:.3f}"
            for key, label in PARTS.items()
            if key in result and key not in {o.metric for o in self.objectives}
        ]
        verdict = "" if feasible(result) else "; misses the MMLU threshold or a constraint"
        seconds = result.get("seconds", result.get("time_total_s", 0.0))
        best = self._best(trial, result)
        self._line(f"{self._name(trial)} completed in {seconds:.0f} s: {', '.join(metrics)}{verdict}{best}")

    def _best(self, trial, result: dict) -> str:
        if len(self.objectives) != 1 or not feasible(result) or self.objectives[0].metric not in result:
            return ""
        objective = self.objectives[0]
        value = result[objective.metric]
        maximized = value if objective.mode == "max" else -value
        if self.best is None or maximized > self.best[0]:
            self.best = (maximized, value, self._name(trial))
            return " (best so far)"
        return f" (best so far: {self.best[2]}, {self.best[1]:.4f})"

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.ended.add(trial.trial_id)
        where = getattr(trial, "error_file", None) or getattr(trial, "path", None)
        self._line(f"{self._name(trial)} failed" + (f"; its error is in {where}" if where else ""))

    def on_experiment_end(self, trials, **info) -> None:
        # Tune reports no end for a trial that the time budget or an interrupt cuts short.
        for trial in trials:
            if trial.trial_id in self.numbers and trial.trial_id not in self.ended:
                self.ended.add(trial.trial_id)
                self._line(f"{self._name(trial)} stopped by the time budget or an interrupt")
