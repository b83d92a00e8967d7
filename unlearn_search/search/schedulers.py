"""Tune schedulers that prune on training progress and never once training is done.

Workers report quick metrics at every schedule boundary with ``progress`` in percent of the
trial's steps; the last boundary is at 100, and the trial's full evaluation follows it. A
scheduler acting on a report at 100 would only save that evaluation, after all the training
was paid for, and would lose the trial's objective (the sampler learns nothing from it and it
can never be the best). Ray's ASHA does act there: a rung can sit at exactly 100 (grace 50 or
25 with reduction factor 2), and a trial with few boundaries reaches a lower rung it has not
been recorded in only with its final report (one epoch: its only report is at 100).
"""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

TRAINED = 100.0  # progress, in percent, of a report after the last training step


class _UntilTrained:
    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0.0) >= TRAINED:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


class TrainingASHA(_UntilTrained, ASHAScheduler):
    """ASHA over training progress; a trial that finished training always gets evaluated."""

    def __init__(self, time_attr: str, metric: str, mode: str, grace_period: float, reduction_factor: float):
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, max_t=TRAINED,
                         grace_period=grace_period, reduction_factor=reduction_factor)


class TrainingMedianStopping(_UntilTrained, MedianStoppingRule):
    """The median stopping rule over training progress; never after training is done."""

    def __init__(self, time_attr: str, metric: str, mode: str, grace_period: float):
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, grace_period=grace_period,
                         min_samples_required=2)
