"""Tune schedulers that prune on training progress and never once training is done.

Workers report quick metrics at every schedule boundary with ``progress`` in percent of the
trial's steps; the last boundary is at 100, and the trial's full evaluation follows it. A
scheduler acting on a report at 100 would only save that evaluation, after all the training
was paid for, and would lose the trial's objective (the sampler learns nothing from it and it
can never be the best). Ray's ASHA does act there: a rung can sit at exactly 100 (grace 50 or
25 with reduction factor 2), and a trial with few boundaries reaches a lower rung it has not
been recorded in only with its final report (one epoch: its only report is at 100).

The quick estimates are taken on a small fixed subset, so two trials a question apart on it are
a tie, not a ranking: while no trial has unlearned enough to move the task aggregate off 0, an
untouched model and one halfway to forgetting differ only by an MMLU question or two, and ASHA
on the raw values pruned the second (the main job, 2026-11-27). A trial is pruned only when its
estimate is worse than the bar by more than ``min_delta`` (``search.min_delta``). That holds
for a judged value too: an estimate that misses a constraint counts as the worst value, and is
spared only while the bar itself lies within ``min_delta`` of it.

Tune ends a trial the same way whether a scheduler stopped it or the search's time budget ran
out, so each decision to prune is written down in the trial's own directory (``PRUNED_FILE``),
and the budget says when it ran out (``TimeBudget``): the results tell a judged trial from one
that was only cut short, and one cut for good from one an interrupt paused.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket
from ray.tune.stopper import TimeoutStopper

logger = logging.getLogger(__name__)

TRAINED = 100.0  # progress, in percent, of a report after the last training step
PRUNED_FILE = "pruned.json"
BUDGET_FILE = "time_budget_spent.json"


def pruned_record(trial_dir: str | Path | None) -> dict[str, Any] | None:
    """The pruner's decision on the trial in ``trial_dir`` (Tune's trial directory), if it made one."""
    path = Path(trial_dir) / PRUNED_FILE if trial_dir else None
    return json.loads(path.read_text()) if path is not None and path.exists() else None


class _UntilTrained:
    constraints: tuple = ()
    min_delta: float = 0.0  # also what a scheduler pickled before the margin existed resumes with

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0.0) >= TRAINED:
            return TrialScheduler.CONTINUE
        judged, missed = result, []
        if self.constraints and all(c.metric in result for c in self.constraints):
            # Judged as it will be scored: an estimate that misses a constraint is the worst value.
            # Else a trial that erases the model (a high aggregate, but retain at 0) sets the bar
            # and the trials that could be the best are pruned below it.
            from unlearn_search.search.results import objective_value, with_constraints
            from unlearn_search.search.space import Objective

            estimate = objective_value(with_constraints(result, self.constraints), Objective(self._metric, self._mode))
            judged = {**result, self._metric: estimate}
            missed = [str(c) for c in self.constraints if not c.met(result)]
        decision = super().on_trial_result(tune_controller, trial, judged)
        if decision == TrialScheduler.STOP:
            self._record(trial, result, judged, missed)
        return decision

    def _record(self, trial, result: dict, judged: dict, missed: list[str]) -> None:
        # A stub trial (scheduler tests) has no storage, and so no directory.
        if getattr(trial, "storage", None) is None:
            return
        # The estimate as reported, and what the pruner compared when a constraint changed it.
        record = {
            "at": result.get(self._time_attr),
            "metric": self._metric,
            "value": result.get(self._metric),
            "judged": judged.get(self._metric),
            "by": type(self).__name__,
        }
        if missed:
            record["missed"] = missed
        try:
            directory = Path(trial.path)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / PRUNED_FILE).write_text(json.dumps(record, indent=2, default=float))
        except (OSError, TypeError, ValueError) as error:  # the search goes on; the trial reads as stopped
            logger.warning("could not record pruning trial %s: %s", trial.trial_id, error)


class _BracketWithMargin(_Bracket):
    """ASHA's rung bookkeeping with its bar lowered by ``min_delta``: a trial is pruned only when
    its estimate falls further below the rung's quantile than that (rewards are sign-flipped for
    a minimized metric, so lowering the bar is a margin either way)."""

    def __init__(self, *args, min_delta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.min_delta = min_delta

    def cutoff(self, recorded):
        bar = super().cutoff(recorded)
        return None if bar is None else bar - self.min_delta


class TrainingASHA(_UntilTrained, ASHAScheduler):
    """ASHA over training progress; a trial that finished training always gets evaluated, and
    one within ``min_delta`` of a rung's bar goes on."""

    def __init__(
        self,
        time_attr: str,
        metric: str,
        mode: str,
        grace_period: float,
        reduction_factor: float,
        constraints: tuple = (),
        min_delta: float = 0.0,
    ):
        super().__init__(
            time_attr=time_attr,
            metric=metric,
            mode=mode,
            max_t=TRAINED,
            grace_period=grace_period,
            reduction_factor=reduction_factor,
        )
        self.constraints = tuple(constraints)
        # Ray's ASHA has no margin: its brackets are rebuilt with one, from the arguments it gave them.
        self._brackets = [
            _BracketWithMargin(grace_period, TRAINED, reduction_factor, s, stop_last_trials=True, min_delta=min_delta)
            for s in range(len(self._brackets))
        ]


class TrainingMedianStopping(_UntilTrained, MedianStoppingRule):
    """The median stopping rule over training progress; never after training is done, and not
    for a trial within ``min_delta`` of the median."""

    def __init__(
        self,
        time_attr: str,
        metric: str,
        mode: str,
        grace_period: float,
        constraints: tuple = (),
        min_delta: float = 0.0,
    ):
        super().__init__(
            time_attr=time_attr, metric=metric, mode=mode, grace_period=grace_period, min_samples_required=2
        )
        self.constraints = tuple(constraints)
        self.min_delta = min_delta

    def _best_result(self, trial):
        # The rule stops a trial whose best is worse than the median: shifted, it must be worse by min_delta.
        best = super()._best_result(trial)
        return best + self.min_delta if self._mode == "max" else best - self.min_delta


class TimeBudget(TimeoutStopper):
    """The search's time budget: Tune's own stopper (what ``TuneConfig.time_budget_s`` builds),
    given as ``RunConfig(stop=...)``, which also says when it ran out: in ``flag``
    (``BUDGET_FILE``). Tune ends the trials it cuts for good, and ``--resume`` (which keeps the
    remaining budget) cannot tell them from an interrupted search's without it."""

    def __init__(self, seconds: float, flag: str | Path):
        super().__init__(seconds)
        self.flag = str(flag)

    def stop_all(self) -> bool:
        spent = super().stop_all()
        if spent and not Path(self.flag).exists():
            Path(self.flag).write_text(json.dumps({"time_budget_s": self._timeout_seconds}))
        return spent
