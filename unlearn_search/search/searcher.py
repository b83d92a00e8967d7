"""The Optuna searcher Ray Tune drives: the space's sampler, one objective value per trial, the
constraints, and the study attributes that tie each Optuna trial to its Tune trial."""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from unlearn_search.search.results import (
    AGGREGATE_ATTR,
    MMLU_CONSTRAINT,
    OBJECTIVE,
    TUNE_TRIAL_ATTR,
    evaluated,
    mmlu_violation,
)
from unlearn_search.search.space import SearchSpace


class StudySearch(OptunaSearch):
    """Ray's ``OptunaSearch`` over ``space``, ignoring intermediate results without the objective.

    Intermediate reports carry the quick metrics the pruner needs; the objective arrives once,
    with the full evaluation, so Optuna sees exactly one value per trial.
    """

    def __init__(self, space: SearchSpace, **kwargs):
        super().__init__(space.define_by_run(), **kwargs)
        self.space = space

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        if trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_TRIAL_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if not all(m in result for m in metrics):
            return
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # a resumed search re-reporting a trial the study already holds

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # A pruned trial's last result is a quick estimate under the objectives' own names:
        # Optuna must record it as pruned, never as a finished trial with those values.
        finished = bool(result) and evaluated(result)
        if finished and trial_id in self._ot_trials:
            self._record(self._ot_trials[trial_id], result)
        super().on_trial_complete(trial_id, result if finished else None, error)

    def _record(self, trial: optuna.Trial, result: dict) -> None:
        """A finished trial's aggregate (what trials are compared on, beside a value that may carry
        the objective's signal) and, with several objectives, its constraints."""
        if "aggregate" in result:
            try:
                trial.set_user_attr(AGGREGATE_ATTR, result["aggregate"])
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # a resumed search re-reporting a trial the study already holds
        if self.space.multi_objective and "mmlu" in result:
            # One objective carries the MMLU constraint in its value (objective_value); several
            # cannot, so the samplers (NSGA-II, TPE) get it as a constraint.
            trial.set_constraint(MMLU_CONSTRAINT, mmlu_violation(result))
            for constraint in self.space.constraints:
                trial.set_constraint(str(constraint), constraint.violation(result))


def make_sampler(space: SearchSpace, seed: int, num_samples: int | None = None) -> optuna.samplers.BaseSampler:
    """The space's ``search.sampler``; TPE models after its startup trials (``startup_trials``)."""
    name = space.search.sampler
    if name == "tpe":
        startup = space.search.startup_trials(num_samples or space.search.num_samples)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(space.grid(), seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_searcher(space: SearchSpace, storage, study_name: str, seed: int, num_samples: int | None = None):
    """A ``StudySearch`` of the space's sampler over its study in ``storage``, its starts first."""
    if space.multi_objective:
        metric, mode = [o.metric for o in space.objectives], [o.mode for o in space.objectives]
    else:
        metric, mode = OBJECTIVE, space.objectives[0].mode
    return StudySearch(
        space,
        metric=metric,
        mode=mode,
        sampler=make_sampler(space, seed, num_samples),
        study_name=study_name,
        storage=storage,
        seed=seed,
        points_to_evaluate=[dict(s) for s in space.starts] or None,
    )
