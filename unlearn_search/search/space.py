"""Search spaces: the YAML schema, its strict validation, and the Optuna define-by-run space.

A space file names the fixed trial settings, the searched parameters with their
distributions (optionally conditional on other settings), the published configurations
evaluated first, the objective(s), the sampler and pruner, the budget and each trial's
resources. Every setting keeps the name ``unlearn-search methods`` gives it, which is also
its MLflow param name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_search.errors import UnlearnSearchError, one_of
from unlearn_search.evaluation.evaluate import EVAL_SPLITS, MIA_ATTACK_METRICS
from unlearn_search.methods.base import Knob, declared, setting
from unlearn_search.search.lr_range import RangeTest
from unlearn_search.training.config import setting_type
from unlearn_search.training.trial import Resources

# Optuna's vocabulary (FloatDistribution, IntDistribution, CategoricalDistribution), with log and step.
DISTRIBUTIONS = ("float", "int", "categorical")
RENAMED_DISTRIBUTIONS = {"uniform": "float", "loguniform": "float, log: true"}  # names Optuna deprecated
SAMPLERS = ("tpe", "nsga2", "random", "grid")
PRUNERS = ("asha", "median", "none")
# What a finished trial reports (``evaluation.evaluate.metric_values``), and every boundary estimates;
# any can be an objective.
OBJECTIVE_METRICS = (
    "aggregate",
    "task_aggregate",
    "mia_score",
    "mmlu",
    "forget_efficacy",
    "retain_utility",
    "forget_regurgitation",
    "forget_knowledge",
    "retain_regurgitation",
    "retain_knowledge",
    "mia_auc",
    *MIA_ATTACK_METRICS,
)
SIGNAL_METRICS = ("forget_signal", "forget_efficacy", "retain_utility")  # higher is better, smooth in the model
PROGRESS = "progress"  # percent of the trial's training steps done: comparable across schedules


@dataclass(frozen=True)
class Param:
    name: str
    distribution: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    def optuna_distribution(self):
        """Optuna's own distribution object for this parameter (which checks its arguments)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.distribution == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.distribution == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(self.low, self.high, log=self.log, step=self.step)

    def suggest(self, trial) -> Any:
        if self.distribution == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.distribution == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def grid(self) -> list:
        if self.distribution == "categorical":
            return list(self.choices)
        if self.distribution == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.distribution == "float" and self.step:
            # Down: a step that does not divide the range never steps past high.
            count = math.floor((self.high - self.low) / self.step + 1e-9)
            return [self.low + i * self.step for i in range(count + 1)]
        raise UnlearnSearchError(
            f"params.{self.name}: the grid sampler needs categorical, int or stepped float "
            f"parameters (got {self.distribution})"
        )

    def active(self, values: dict[str, Any]) -> bool:
        return all(values.get(key) in allowed for key, allowed in self.when.items())


@dataclass(frozen=True)
class Objective:
    """What a search optimizes. With a ``signal`` (one objective only), the sampler sees
    ``metric + signal_weight * signal`` (``-`` for mode min) so that it can climb where the metric
    is flat; the best trial is still the best by ``metric`` alone."""

    metric: str
    mode: str = "max"
    signal: str | None = None
    signal_weight: float = 0.0


@dataclass(frozen=True)
class Constraint:
    """A bound a finished trial must meet, as it must pass the MMLU threshold: ``metric >= min``
    or ``metric <= max``. On a model whose MMLU sits at chance the threshold cannot tell an erased
    model from a good one; ``retain_utility >= x`` can."""

    metric: str
    min: float | None = None
    max: float | None = None

    def violation(self, metrics: dict[str, float]) -> float:
        """How far the trial's metric lies on the wrong side: <= 0 when it meets the bound (Optuna's
        convention for a constraint). A metric the evaluation could not compute (NaN: no QA items
        in a split, say) fails it: Optuna refuses NaN."""
        value = metrics[self.metric]
        if math.isnan(value):
            return math.inf
        return self.min - value if self.min is not None else value - self.max

    def met(self, metrics: dict[str, float]) -> bool:
        return self.violation(metrics) <= 0

    def __str__(self) -> str:
        return f"{self.metric} >= {self.min}" if self.min is not None else f"{self.metric} <= {self.max}"


@dataclass(frozen=True)
class SearchSettings:
    """A space's ``search`` block."""

    sampler: str = setting(
        "tpe",
        "`nsga2` is the default with several objectives (and only for them)",
        choices=SAMPLERS,
    )
    pruner: str = setting("asha", "what ends a trial early on its estimates", choices=PRUNERS)
    grace_period: float = setting(
        25.0, "percent of a trial's training before it can be pruned", positive=True, high=100
    )
    reduction_factor: float = setting(2.0, "ASHA's reduction factor (> 1)")
    # The quick MMLU's 57 questions move the aggregate estimate by 0.006 each, and its standard
    # error is about 0.02 there: closer than that is a tie.
    min_delta: float = setting(
        0.02, "how much worse than the bar (objective units) an estimate must be for the trial to be pruned", low=0
    )
    num_samples: int = setting(8, "trials (`--num-samples`)", low=1)
    max_concurrent: int = setting(1, "trials at once (`--max-concurrent`)", low=1)
    time_budget_s: float | None = setting(
        None,
        "the search's wall-clock budget in seconds (`--time-budget`); null: none",
        positive=True,
        kind=float,
        nullable=True,
    )
    n_startup_trials: int | None = setting(
        None,
        "TPE's random trials before it models (Optuna's name); null: a third of the trials, 2 to 10 (start "
        "points count)",
        low=1,
        kind=int,
        nullable=True,
    )

    def startup_trials(self, num_samples: int) -> int:
        """TPE samples at random until this many trials have finished. Optuna's default, 10, is
        sized for cheap trials: a search of 6 to 12 costly ones would never leave random
        sampling. Default: a third of the trials, from 2 to 10 (start points count)."""
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        return min(10, max(2, num_samples // 3))


@dataclass(frozen=True)
class SearchEvaluation:
    """The full evaluation every finished trial gets (the best trial is re-evaluated on everything)."""

    split: str = setting(
        "train",
        "the items a finished trial is scored on (SemEval scored the set that was unlearned)",
        choices=EVAL_SPLITS,
    )
    max_new_tokens: int = setting(
        128, "tokens generated per item (the best trial's re-evaluation: `--final-max-new-tokens`)", low=1
    )
    batch_size: int = setting(32, "items per generation and scoring batch", low=1)
    mmlu_shots: int = setting(5, "MMLU shots", low=0)
    mmlu_limit: int | None = setting(
        4,
        "MMLU questions per subject during the search; null: all (the best trial's: `--final-mmlu-limit`)",
        low=1,
        kind=int,
        nullable=True,
    )
    mmlu_threshold: float | None = setting(
        None,
        "the utility threshold (0.371 for the SemEval 7B); null: [[THRESHOLD]] of the original model's MMLU on "
        "the same questions",
        low=0,
        kind=float,
        nullable=True,
    )


@dataclass(frozen=True)
class SearchSpace:
    name: str
    settings: dict[str, Any]
    params: tuple[Param, ...]
    starts: tuple[dict[str, Any], ...]
    objectives: tuple[Objective, ...]
    search: SearchSettings
    resources: Resources  # the trial runner's own: one name per setting
    evaluation: SearchEvaluation
    description: str = ""
    source: Path | None = None
    constraints: tuple[Constraint, ...] = ()
    lr_range_test: RangeTest | None = None  # fit params.lr to the model before the search

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def pruning_objective(self) -> Objective:
        """What the pruner compares at each boundary: the quick evaluation's estimate of the
        objective (every finished-trial metric is estimated there under its own name); with
        several objectives, the aggregate they are finally ranked on."""
        return self.objectives[0] if not self.multi_objective else Objective("aggregate", "max")

    def define_by_run(self):
        return DefineByRun(self.settings, self.params)

    def grid(self) -> dict[str, list]:
        if any(p.when for p in self.params):
            raise UnlearnSearchError("search.sampler: grid cannot search conditional parameters (remove 'when')")
        return {p.name: p.grid() for p in self.params}


class DefineByRun:
    """Optuna define-by-run space: samples active parameters and returns them with the fixed settings.

    A class rather than a closure so that Tune can pickle it into its experiment checkpoint.
    """

    def __init__(self, settings: dict[str, Any], params: tuple[Param, ...]):
        self.settings, self.params = dict(settings), params

    def __call__(self, trial) -> dict[str, Any]:
        values = dict(self.settings)
        for param in self.params:
            if param.active(values):
                values[param.name] = param.suggest(trial)
        return values


# ---------------------------------------------------------------- validation

TOP_KEYS = {
    "name",
    "description",
    "settings",
    "params",
    "starts",
    "objective",
    "objectives",
    "constraints",
    "search",
    "resources",
    "evaluation",
    "lr_range_test",
}
PARAM_KEYS = {"distribution", "low", "high", "step", "log", "choices", "when"}


def _fail(path: str, expected: str, got: Any = ...) -> UnlearnSearchError:
    suffix = "" if got is ... else f" (got {got!r})"
    return UnlearnSearchError(f"{path}: expected {expected}{suffix}")


def _mapping(value: Any, path: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, "a mapping", value)
    for key in value:
        if not isinstance(key, str):
            raise _fail(f"{path}", "string keys", key)
    return value


def _number(value: Any, path: str, integer: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise _fail(path, "an integer" if integer else "a finite number", value)
    if integer and not float(value).is_integer():
        raise _fail(path, "an integer", value)
    return value


def _dataclass_from(cls, raw: Any, path: str):
    """A dataclass from a mapping. Each value is checked against its field's declaration
    (``methods.base.setting``: type, null, choices, bounds), or, for a dataclass that checks
    itself (``RangeTest``), only against its default's type."""
    import dataclasses

    raw = _mapping(raw, path)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    knobs = declared(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise UnlearnSearchError(f"{path}.{key}: unknown key (expected {one_of(key, fields)})")
        knob = knobs.get(key) or Knob(key, fields[key].default, "")
        values[key] = _declared_value(knob, value, f"{path}.{key}")
    return cls(**values)


def _declared_value(knob: Knob, value: Any, path: str) -> Any:
    if value is None and knob.nullable:
        return None
    kind = knob.value_type
    if kind is bool:
        if not isinstance(value, bool):
            raise _fail(path, "true or false", value)
    elif kind is str:
        if not isinstance(value, str):
            raise _fail(path, "a string", value)
    elif not knob.choices or not isinstance(value, str):
        value = _number(value, path, kind is int)
        value = int(value) if kind is int else value
    expected = knob.problem(value)
    if expected:
        raise _fail(path, expected, value)
    return value


def _param(name: str, raw: Any, known: set[str]) -> Param:
    """One entry of ``params``: its distribution, its ``when`` and its range or choices."""
    path = f"params.{name}"
    raw = _mapping(raw, path)
    for key in raw:
        if key not in PARAM_KEYS:
            raise UnlearnSearchError(f"{path}.{key}: unknown key (expected {one_of(key, sorted(PARAM_KEYS))})")
    distribution = _distribution(raw.get("distribution"), path)
    when = _when(raw.get("when"), path, known)
    if distribution == "categorical":
        return Param(name, distribution, choices=_choices(raw, path), when=when)
    param = Param(name, distribution, *_numeric_range(raw, path, distribution == "int"), when=when)
    try:  # Optuna's own checks (a log range's low > 0, no step with log), under the key path
        param.optuna_distribution()
    except ValueError as error:
        raise UnlearnSearchError(f"{path}: {error}") from None
    return param


def _distribution(distribution: Any, path: str) -> str:
    if not isinstance(distribution, str):  # a list or mapping is no name (and cannot be looked up)
        raise _fail(f"{path}.distribution", f"one of {', '.join(DISTRIBUTIONS)}", distribution)
    if distribution in RENAMED_DISTRIBUTIONS:
        raise UnlearnSearchError(
            f"{path}.distribution: {distribution!r} is a name Optuna deprecated "
            f"(expected distribution: {RENAMED_DISTRIBUTIONS[distribution]})"
        )
    if distribution not in DISTRIBUTIONS:
        raise _fail(f"{path}.distribution", f"one of {', '.join(DISTRIBUTIONS)}", distribution)
    return distribution


def _when(raw: Any, path: str, known: set[str]) -> dict[str, tuple]:
    """``when``: the settings or parameters it depends on, each with the values it is sampled at."""
    when = {}
    for key, allowed in _mapping(raw, f"{path}.when").items():
        if key not in known:
            raise UnlearnSearchError(
                f"{path}.when.{key}: not a fixed setting or a searched parameter "
                f"(expected {one_of(key, sorted(known))})"
            )
        when[key] = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        if not when[key]:
            raise _fail(f"{path}.when.{key}", "a value or a non-empty list of values", allowed)
    return when


def _choices(raw: dict, path: str) -> tuple:
    extra = {"low", "high", "step", "log"} & set(raw)
    if extra:
        raise UnlearnSearchError(f"{path}.{sorted(extra)[0]}: not used by a categorical parameter (expected choices)")
    choices = raw.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _fail(f"{path}.choices", "a non-empty list", choices)
    for i, choice in enumerate(choices):
        if not (choice is None or isinstance(choice, (str, int, float, bool))):
            raise _fail(f"{path}.choices[{i}]", "a string, number, boolean or null", choice)
    if len(set(map(repr, choices))) != len(choices):
        raise _fail(f"{path}.choices", "distinct values", choices)
    return tuple(choices)


def _numeric_range(raw: dict, path: str, integer: bool) -> tuple[float | int, float | int, float | int | None, bool]:
    """``(low, high, step, log)`` of a ``float`` or ``int`` parameter."""
    if "choices" in raw:
        raise UnlearnSearchError(f"{path}.choices: only categorical parameters take choices (expected low and high)")
    for key in ("low", "high"):
        if key not in raw:
            raise UnlearnSearchError(
                f"{path}.{key}: missing (a {'int' if integer else 'float'} parameter needs low and high)"
            )
    low, high = _number(raw["low"], f"{path}.low", integer), _number(raw["high"], f"{path}.high", integer)
    if low >= high:
        raise _fail(path, "low < high", f"low={low}, high={high}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise _fail(f"{path}.log", "true or false", log)
    step = raw.get("step")
    if step is not None:
        step = _number(step, f"{path}.step", integer)
        if step <= 0 or step > high - low:
            raise _fail(f"{path}.step", f"a value in (0, {high - low}]", step)
        steps = (high - low) / step
        if not log and abs(steps - round(steps)) > 1e-9 * max(1.0, steps):  # Optuna would move high down
            raise _fail(f"{path}.step", f"a step that divides high - low = {high - low}", step)
    cast = int if integer else float
    return cast(low), cast(high), step, log


def _objectives(raw: dict) -> tuple[Objective, ...]:
    if "objective" in raw and "objectives" in raw:
        raise UnlearnSearchError("objectives: give either objective (one) or objectives (several), not both")
    items = raw.get("objectives") if "objectives" in raw else [raw.get("objective", {"metric": "aggregate"})]
    path = "objectives" if "objectives" in raw else "objective"
    if not isinstance(items, list) or not items:
        raise _fail(path, "a non-empty list of {metric, mode}", items)
    result = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if path == "objectives" else path
        if isinstance(item, str):
            item = {"metric": item}
        item = _mapping(item, where)
        keys = ("metric", "mode", "signal", "signal_weight")
        for key in item:
            if key not in keys:
                raise UnlearnSearchError(f"{where}.{key}: unknown key (expected {one_of(key, keys)})")
        metric, mode = item.get("metric"), item.get("mode", "max")
        if metric not in OBJECTIVE_METRICS:
            raise _fail(f"{where}.metric", f"one of {', '.join(OBJECTIVE_METRICS)}", metric)
        if mode not in ("max", "min"):
            raise _fail(f"{where}.mode", "max or min", mode)
        result.append(Objective(metric, mode, *_signal(item, where, single=path == "objective")))
    if len({o.metric for o in result}) != len(result):
        raise UnlearnSearchError(f"{path}: each metric at most once")
    return tuple(result)


def _signal(item: dict, where: str, single: bool) -> tuple[str | None, float]:
    """An objective's ``signal`` and ``signal_weight`` (default 0.05 with a signal)."""
    signal = item.get("signal")
    if signal is None:
        if "signal_weight" in item:
            raise UnlearnSearchError(f"{where}.signal_weight: weighs a signal (expected signal too)")
        return None, 0.0
    if not single:
        raise UnlearnSearchError(f"{where}.signal: only a single objective takes a signal")
    if signal not in SIGNAL_METRICS:
        raise _fail(f"{where}.signal", f"one of {', '.join(SIGNAL_METRICS)}", signal)
    weight = item.get("signal_weight", 0.05)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 <= weight <= 1:
        raise _fail(f"{where}.signal_weight", "a number in [0, 1]", weight)
    return signal, float(weight)


def _constraints(raw: Any) -> tuple[Constraint, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail("constraints", "a list of {metric, min} or {metric, max}", raw)
    result = []
    for i, item in enumerate(raw):
        where = f"constraints[{i}]"
        item = _mapping(item, where)
        for key in item:
            if key not in ("metric", "min", "max"):
                raise UnlearnSearchError(f"{where}.{key}: unknown key (expected metric, min or max)")
        if item.get("metric") not in OBJECTIVE_METRICS:
            raise _fail(f"{where}.metric", f"one of {', '.join(OBJECTIVE_METRICS)}", item.get("metric"))
        bounds = [key for key in ("min", "max") if key in item]
        if len(bounds) != 1:
            raise _fail(where, "exactly one of min or max", dict(item))
        value = float(_number(item[bounds[0]], f"{where}.{bounds[0]}", False))
        result.append(Constraint(item["metric"], **{bounds[0]: value}))
    if len({(c.metric, c.min is None) for c in result}) != len(result):
        raise UnlearnSearchError("constraints: each metric at most once with min and once with max")
    return tuple(result)


def _check_settings(settings: dict[str, Any], path: str) -> None:
    from unlearn_search.training.config import trial_config

    try:
        trial_config(settings)
    except UnlearnSearchError as error:
        raise UnlearnSearchError(f"{path}: {error}") from None


def parse_space(raw: Any, source: Path | None = None) -> SearchSpace:
    """Validate a parsed YAML document into a ``SearchSpace``; any problem is one clear error."""
    raw = _mapping(raw, "space")
    for key in raw:
        if key not in TOP_KEYS:
            raise UnlearnSearchError(f"{key}: unknown key (expected {one_of(key, sorted(TOP_KEYS))})")
    name, description = _name(raw, source), _description(raw)
    settings = _settings(raw)
    params = _params(raw, settings)
    by_name = {p.name: p for p in params}
    starts = _starts(raw, settings, by_name)
    objectives = _objectives(raw)
    _check_keep_best(settings, by_name, objectives)
    search = _search(raw, objectives)
    space = SearchSpace(
        name,
        settings,
        tuple(params),
        tuple(starts),
        objectives,
        search,
        _resources(raw),
        _evaluation(raw),
        description,
        source,
        _constraints(raw.get("constraints")),
        _range_test(raw.get("lr_range_test"), by_name.get("lr"), starts),
    )
    if search.sampler == "grid":
        space.grid()
    return space


def _name(raw: dict, source: Path | None) -> str:
    name = raw.get("name", source.stem if source else "search")
    if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
        raise _fail("name", "a name of letters, digits, - and _", name)
    return name


def _description(raw: dict) -> str:
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise _fail("description", "a string", description)
    return description


def _settings(raw: dict) -> dict[str, Any]:
    settings = dict(_mapping(raw.get("settings"), "settings"))
    if "method" not in settings:
        raise UnlearnSearchError("settings.method: missing (expected a loss from 'unlearn-search methods')")
    _check_settings(settings, "settings")
    return settings


def _params(raw: dict, settings: dict[str, Any]) -> list[Param]:
    """The searched parameters, in dependency order, each a setting the method and schedule know."""
    params_raw = _mapping(raw.get("params"), "params")
    if not params_raw:
        raise UnlearnSearchError("params: expected at least one searched parameter")
    known = set(settings) | set(params_raw)
    params = []
    for name, spec in params_raw.items():
        if name in settings:
            raise UnlearnSearchError(f"params.{name}: also fixed in settings (expected one or the other)")
        param = _param(name, spec, known)
        if name in param.when:
            raise UnlearnSearchError(f"params.{name}.when: a parameter cannot depend on itself")
        params.append(param)
    params = _in_dependency_order(params)
    by_name = {p.name: p for p in params}
    for param in params:
        _check_conditions(param, settings, by_name)
        _check_param_setting(param, settings)
    return params


def _check_conditions(param: Param, settings: dict[str, Any], by_name: dict[str, Param]) -> None:
    """A value a condition can never take is a typo that silently stops sampling."""
    for key, allowed in param.when.items():
        if key in settings and settings[key] not in allowed:
            raise _fail(
                f"params.{param.name}.when.{key}",
                f"values that include {key}'s fixed value {settings[key]!r} (the parameter would never be sampled)",
                list(allowed),
            )
        choices = by_name[key].choices if key in by_name else None
        wrong = [value for value in allowed if choices is not None and value not in choices]
        if wrong:
            raise _fail(
                f"params.{param.name}.when.{key}",
                f"values among {key}'s choices ({', '.join(map(str, choices))})",
                wrong[0],
            )


def _check_param_setting(param: Param, settings: dict[str, Any]) -> None:
    """The parameter is a setting the method and schedule know, checked at each value it can take
    under its own conditions (a knob of a searched schedule exists only where that schedule runs)."""
    context = {**settings, **{key: allowed[0] for key, allowed in param.when.items()}}
    for choice in param.choices or (param.low, param.high):
        _check_settings({**context, param.name: choice}, f"params.{param.name}")
    kind = setting_type(param.name, context.get("method"), context.get("schedule", "joint"))
    if param.distribution == "float" and kind is int:
        raise _fail(
            f"params.{param.name}.distribution", f"int ({param.name} is an integer setting)", param.distribution
        )


def _starts(raw: dict, settings: dict[str, Any], by_name: dict[str, Param]) -> list[dict]:
    starts = []
    starts_raw = raw.get("starts") or []
    if not isinstance(starts_raw, list):
        raise _fail("starts", "a list of parameter assignments", starts_raw)
    for i, start in enumerate(starts_raw):
        start = _mapping(start, f"starts[{i}]")
        for key, value in start.items():
            if key not in by_name:
                raise UnlearnSearchError(
                    f"starts[{i}].{key}: not a searched parameter (expected {one_of(key, by_name)})"
                )
            _check_start_value(by_name[key], value, f"starts[{i}].{key}")
        _check_settings({**settings, **start}, f"starts[{i}]")
        starts.append(dict(start))
    return starts


def _check_keep_best(settings: dict[str, Any], by_name: dict[str, Param], objectives) -> None:
    searched = by_name.get("keep_best")
    keeps_best = settings.get("keep_best") is True or (searched is not None and True in (searched.choices or ()))
    if keeps_best and [(o.metric, o.mode) for o in objectives] != [("aggregate", "max")]:
        got = ", ".join(f"{o.metric} ({o.mode})" for o in objectives)
        raise UnlearnSearchError(
            f"settings.keep_best: a trial keeps its boundary with the highest quick aggregate, "
            f"so the objective must be aggregate, max (got {got})"
        )


def _search(raw: dict, objectives) -> SearchSettings:
    search = _dataclass_from(SearchSettings, raw.get("search"), "search")
    if search.reduction_factor <= 1:  # the declaration's bounds are inclusive
        raise _fail("search.reduction_factor", "a value > 1", search.reduction_factor)
    if len(objectives) > 1 and search.sampler == "tpe" and "sampler" not in (raw.get("search") or {}):
        search = SearchSettings(**{**search.__dict__, "sampler": "nsga2"})
    if len(objectives) == 1 and search.sampler == "nsga2":
        raise UnlearnSearchError("search.sampler: nsga2 is for several objectives (expected tpe, random or grid)")
    return search


def _resources(raw: dict) -> Resources:
    return _dataclass_from(Resources, raw.get("resources"), "resources")


def _evaluation(raw: dict) -> SearchEvaluation:
    return _dataclass_from(SearchEvaluation, raw.get("evaluation"), "evaluation")


def _range_test(raw: Any, lr: Param | None, starts: list[dict]) -> RangeTest | None:
    """The ``lr_range_test`` block, ramping over ``params.lr``'s range (None: no test)."""
    if raw is None:
        return None
    for key in ("low", "high"):
        if key in _mapping(raw, "lr_range_test"):
            raise UnlearnSearchError(f"lr_range_test.{key}: the test ramps over params.lr's range (set {key} there)")
    if lr is None or lr.distribution != "float" or not lr.log:
        raise UnlearnSearchError(
            "lr_range_test: fits the searched learning rate (expected params.lr with distribution float, log true)"
        )
    if not starts:
        raise UnlearnSearchError("lr_range_test: runs the first start point (expected at least one in starts)")
    return _dataclass_from(RangeTest, {**raw, "low": lr.low, "high": lr.high}, "lr_range_test")


def _in_dependency_order(params: list[Param]) -> list[Param]:
    """Parameters ordered so that each comes after those its ``when`` refers to (YAML order otherwise)."""
    ordered, placed, pending = [], set(), list(params)
    names = {p.name for p in params}
    while pending:
        ready = [p for p in pending if all(k not in names or k in placed for k in p.when)]
        if not ready:
            raise UnlearnSearchError(
                f"params.{pending[0].name}.when: the conditions form a cycle ({', '.join(p.name for p in pending)})"
            )
        ordered.append(ready[0])
        placed.add(ready[0].name)
        pending.remove(ready[0])
    return ordered


def _check_start_value(param: Param, value: Any, path: str) -> None:
    if param.distribution == "categorical":
        if value not in param.choices:
            raise _fail(path, f"one of {list(param.choices)}", value)
        return
    number = _number(value, path, param.distribution == "int")
    if not param.low <= number <= param.high:
        raise _fail(path, f"a value in [{param.low}, {param.high}]", value)


def load_space(path: str | Path, overrides: dict[str, dict] | None = None) -> SearchSpace:
    """Read and validate a YAML search space (safe-loaded).

    ``overrides`` replace keys of top-level sections before validation, e.g. ``{"resources":
    {"workers": 8, "gpus_per_worker": 1}}`` to run a CPU-sized space on GPU nodes.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UnlearnSearchError(
            f"--space {path}: no such file (expected a YAML search space, e.g. search_spaces/sugd.yaml)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UnlearnSearchError(
            f"{path}{where}: not valid YAML ({getattr(error, 'problem', None) or error})"
        ) from None
    if overrides and isinstance(raw, dict):
        raw = {**raw, **{section: {**(raw.get(section) or {}), **values} for section, values in overrides.items()}}
    try:
        return parse_space(raw, path)
    except UnlearnSearchError as error:
        raise UnlearnSearchError(f"{path}: {error}") from None
