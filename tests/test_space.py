"""Search spaces: every shipped space validates, and every kind of bad input gets its one clear error."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.search import load_space, parse_space
from unlearn_search.search.results import (
    MEETS_CONSTRAINTS,
    PASSES,
    TRIAL_OUTPUT,
    best_trial,
    final_metrics,
    objective_value,
    pareto_front,
    summary_table,
    with_constraints,
)
from unlearn_search.search.space import Objective

REPO = Path(__file__).resolve().parents[1]
SPACES = sorted((REPO / "search_spaces").glob("*.yaml"))

BASE = {
    "name": "t",
    "settings": {"method": "gd", "schedule": "joint"},
    "params": {
        "lr": {"distribution": "float", "log": True, "low": 1e-5, "high": 1e-3},
        "epochs": {"distribution": "int", "low": 1, "high": 3},
        "trainable": {"distribution": "categorical", "choices": ["full", "lora"]},
        "lora_rank": {"distribution": "categorical", "choices": [8, 16], "when": {"trainable": "lora"}},
    },
    "starts": [{"lr": 1e-4, "epochs": 2, "trainable": "full"}],
}


def test_every_shipped_space_is_valid_and_covers_the_method_families():
    names = {p.stem for p in SPACES}
    assert {"sugd", "agad", "ga_kl", "gd", "npo", "flat", "random_label", "idk"} <= names
    for path in SPACES:
        space = load_space(path)
        assert space.starts, f"{path.name}: a published starting configuration is evaluated first"
        # Each start is a point the define-by-run space can produce.
        study = optuna.create_study()
        study.enqueue_trial(space.starts[0])
        sampled = space.define_by_run()(study.ask())
        for key, value in space.starts[0].items():
            assert sampled[key] == value


def test_conditional_parameter_is_sampled_only_when_its_condition_holds():
    space = parse_space(copy.deepcopy(BASE))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"full": 0, "lora": 0}
    for _ in range(30):
        values = space.define_by_run()(study.ask())
        seen[values["trainable"]] += 1
        assert ("lora_rank" in values) == (values["trainable"] == "lora")
        assert values["method"] == "gd" and 1e-5 <= values["lr"] <= 1e-3
    assert seen["full"] and seen["lora"]


def test_several_objectives_default_to_nsga2():
    raw = copy.deepcopy(BASE)
    raw["objectives"] = [{"metric": "forget_efficacy"}, {"metric": "retain_utility", "mode": "max"}]
    space = parse_space(raw)
    assert space.multi_objective and space.search.sampler == "nsga2"


def _broken(edit):
    raw = copy.deepcopy(BASE)
    edit(raw)
    return raw


BAD = [
    (lambda r: r.update(sampler="tpe"), "sampler: unknown key"),
    # Optuna's own checks of its distributions, under the key path.
    (lambda r: r["params"]["lr"].update(low=0), "params.lr: `low > 0` must hold for `log=True`"),
    (lambda r: r["params"]["lr"].update(step=1e-4), "params.lr: The parameter `step` is not supported when `log`"),
    (
        lambda r: r["params"].update(epochs={"distribution": "int", "low": 0, "high": 4, "log": True}),
        "params.epochs: `low >= 1` must hold for `log=True`",
    ),
    # The names Optuna deprecated: the replacement is said.
    (
        lambda r: r["params"]["lr"].update(distribution="loguniform"),
        "params.lr.distribution: 'loguniform' is a name Optuna deprecated (expected distribution: float, log: true)",
    ),
    (
        lambda r: r["params"].update(x={"distribution": "uniform", "low": 0.0, "high": 1.0}),
        "params.x.distribution: 'uniform' is a name Optuna deprecated (expected distribution: float)",
    ),
    (lambda r: r["params"]["epochs"].update(low=3, high=1), "params.epochs: expected low < high"),
    (lambda r: r["params"]["epochs"].update(low=2, high=2), "params.epochs: expected low < high"),
    (lambda r: r["params"]["epochs"].update(low="one"), "params.epochs.low: expected an integer (got 'one')"),
    (lambda r: r["params"]["epochs"].update(low=1.5), "params.epochs.low: expected an integer (got 1.5)"),
    (lambda r: r["params"]["lr"].update(distribution="normal"), "params.lr.distribution: expected one of"),
    (lambda r: r["params"]["lr"].update(scale=2), "params.lr.scale: unknown key"),
    (lambda r: r["params"]["trainable"].update(choices=[]), "params.trainable.choices: expected a non-empty list"),
    (
        lambda r: r["params"].update(colour={"distribution": "categorical", "choices": ["red"]}),
        "params.colour: setting 'colour' is not known for method gd",
    ),
    (
        lambda r: r["params"]["lora_rank"].update(when={"optimizer": "adam"}),
        "params.lora_rank.when.optimizer: not a fixed",
    ),
    (lambda r: r["params"]["trainable"].update(when={"lora_rank": 8}), "the conditions form a cycle"),
    (
        lambda r: r["settings"].update(method="unlearn_everything"),
        "settings: method 'unlearn_everything': expected one of",
    ),
    (lambda r: r["settings"].pop("method"), "settings.method: missing"),
    (lambda r: r["settings"].update(lr=1e-4), "params.lr: also fixed in settings"),
    (lambda r: r.update(starts=[{"lr": 1.0}]), "starts[0].lr: expected a value in [1e-05, 0.001]"),
    (lambda r: r.update(starts=[{"beta": 1.0}]), "starts[0].beta: not a searched parameter"),
    (lambda r: r.update(objective={"metric": "accuracy"}), "objective.metric: expected one of aggregate"),
    (lambda r: r.update(objective={"metric": "aggregate", "mode": "up"}), "objective.mode: expected max or min"),
    (lambda r: r.update(search={"sampler": "cma"}), "search.sampler: expected one of tpe"),
    (lambda r: r.update(search={"num_samples": "many"}), "search.num_samples: expected an integer"),
    (lambda r: r.update(search={"grace_period": 0}), "search.grace_period: expected a value in (0, 100] (got 0)"),
    (lambda r: r.update(search={"n_startup_trials": 0}), "search.n_startup_trials: expected an integer >= 1"),
    (lambda r: r.update(search={"sampler": "nsga2"}), "search.sampler: nsga2 is for several objectives"),
    (lambda r: r.update(search={"sampler": "grid"}), "search.sampler: grid cannot search conditional parameters"),
    (
        lambda r: (r["params"].pop("lora_rank"), r.update(search={"sampler": "grid"})),
        "params.lr: the grid sampler needs categorical",
    ),
    (lambda r: r.update(resources={"gpus": 1}), "resources.gpus: unknown key"),
    # A misspelt name: the closest right one is suggested; none when nothing is close.
    (lambda r: r.update(resources={"wokers": 2}), "resources.wokers: unknown key (expected one of workers, "),
    (lambda r: r.update(resources={"wokers": 2}), "did you mean 'workers'?)"),
    (lambda r: r.update(serach={}), "serach: unknown key (expected one of constraints, "),
    (lambda r: r.update(serach={}), "did you mean 'search'?)"),
    (lambda r: r["params"]["lr"].update(distrbution="float"), "did you mean 'distribution'?)"),
    (lambda r: r.update(resources={"offload": "yes"}), "resources.offload: expected true or false"),
    (
        lambda r: r.update(resources={"placement": "scatter"}),
        "resources.placement: expected one of pack, spread (got 'scatter')",
    ),
    (lambda r: r.update(evaluation={"split": "test"}), "evaluation.split: expected one of train"),
    # Each of these used to pass validation and fail later, inside a trial, as a traceback.
    (
        lambda r: r["params"].update(epochs={"distribution": "float", "low": 1, "high": 4}),
        "params.epochs.distribution: expected int (epochs is an integer setting) (got 'float')",
    ),
    (
        lambda r: r["params"]["lora_rank"].update(when={"trainable": "lroa"}),
        "params.lora_rank.when.trainable: expected values among trainable's choices (full, lora) (got 'lroa')",
    ),
    (lambda r: r.update(resources={"zero_stage": 1}), "resources.zero_stage: expected one of 0, 2, 3 (got 1)"),
    (lambda r: r.update(resources={"workers": 0}), "resources.workers: expected an integer >= 1 (got 0)"),
    (lambda r: r.update(resources={"eval_every": 120}), "resources.eval_every: expected a value in [0, 100] (got 120"),
    (lambda r: r.update(search={"time_budget_s": -5}), "search.time_budget_s: expected a value > 0 or null (got -5"),
    (lambda r: r.update(search={"reduction_factor": 1}), "search.reduction_factor: expected a value > 1 (got 1"),
    (
        lambda r: r.update(resources={"checkpoints_to_keep": 0}),
        "resources.checkpoints_to_keep: expected an integer >= 1",
    ),
    (lambda r: r.update(evaluation={"batch_size": 0}), "evaluation.batch_size: expected an integer >= 1 (got 0)"),
    (lambda r: r.update(evaluation={"mmlu_limit": 0}), "evaluation.mmlu_limit: expected an integer >= 1 or null"),
    (lambda r: r["settings"].update(teacher_top_k="auto"), "settings: teacher_top_k='auto': expected an integer"),
    (lambda r: r["settings"].update(forget_loss_bound=-1), "settings: forget_loss_bound=-1.0: expected a value > 0"),
    (lambda r: r["settings"].update(lora_dropout=1), "settings: lora_dropout=1.0: expected a value in [0, 1)"),
    (lambda r: r["settings"].update(schedule="sugd", chunk_size=8.5), "settings: chunk_size=8.5: expected an integer"),
    (
        lambda r: r["settings"].update(schedule="sugd", epochs_per_chunk=0),
        "settings: schedule sugd: epochs_per_chunk=0 (expected an integer >= 1)",
    ),
    (
        lambda r: r["settings"].update(schedule="agad", annealing=1.5),
        "settings: schedule agad: annealing=1.5 (expected a value in (0, 1])",
    ),
    (
        lambda r: r["settings"].update(schedule="agad", interleaving=2.0),
        "settings: schedule agad: interleaving=2.0 (expected a value in [0, 1])",
    ),
    (
        lambda r: r["settings"].update(schedule="agad", final_annealing="yes"),
        "settings: final_annealing='yes': expected true or false",
    ),
    (lambda r: r["settings"].update(method="npo", beta=0), "settings: method npo: beta=0.0 (expected a value > 0)"),
    (lambda r: r["settings"].update(max_length=None), "settings: max_length=None: expected an integer"),
    (lambda r: r["settings"].update(method=["gd"]), "settings: method=['gd']: expected a name"),
    (
        lambda r: r["settings"].update(train_split="test"),
        "settings: train_split 'test': expected one of train, validation",
    ),
    (lambda r: r["settings"].update(refusals=3), "settings: refusals=3: expected a string"),
    (lambda r: r.update(search={"n_startup_trials": 2.5}), "search.n_startup_trials: expected an integer (got 2.5)"),
    (
        lambda r: r["params"]["lora_rank"].update(when={"trainable": []}),
        "params.lora_rank.when.trainable: expected a value or a non-empty list of values (got [])",
    ),
    (
        lambda r: (r["params"].pop("trainable"), r["settings"].update(trainable="full")),
        "params.lora_rank.when.trainable: expected values that include trainable's fixed value 'full'",
    ),
    (
        lambda r: r["settings"].update(forget_weight=-1.0),
        "settings: method gd: forget_weight=-1.0 (expected a value >= 0)",
    ),
    (lambda r: r.update(constraints={"retain_utility": 0.5}), "constraints: expected a list of {metric, min} or"),
    (
        lambda r: (r["settings"].update(keep_best=True), r.update(objective={"metric": "forget_efficacy"})),
        "settings.keep_best: a trial keeps its boundary with the highest quick aggregate, so the objective must be "
        "aggregate, max (got forget_efficacy (max))",
    ),
    (
        lambda r: r.update(constraints=[{"metric": "utility", "min": 0.5}]),
        "constraints[0].metric: expected one of aggregate",
    ),
    (lambda r: r.update(constraints=[{"metric": "mmlu", "above": 0.5}]), "constraints[0].above: unknown key"),
    (
        lambda r: r.update(constraints=[{"metric": "mmlu", "min": 0.2, "max": 0.9}]),
        "constraints[0]: expected exactly one of min or max",
    ),
    (lambda r: r.update(constraints=[{"metric": "mmlu"}]), "constraints[0]: expected exactly one of min or max"),
    (
        lambda r: r.update(constraints=[{"metric": "mmlu", "min": 0.2}, {"metric": "mmlu", "min": 0.3}]),
        "constraints: each metric at most once with min and once with max",
    ),
    (
        lambda r: r.update(constraints=[{"metric": "mmlu", "min": "half"}]),
        "constraints[0].min: expected a finite number (got 'half')",
    ),
    (
        lambda r: r.update(objective={"metric": "aggregate", "signal": "forget_nll"}),
        "objective.signal: expected one of forget_signal, forget_efficacy, retain_utility (got 'forget_nll')",
    ),
    (
        lambda r: r.update(objective={"metric": "aggregate", "signal_weight": 0.1}),
        "objective.signal_weight: weighs a signal (expected signal too)",
    ),
    (
        lambda r: r.update(objective={"metric": "aggregate", "signal": "forget_signal", "signal_weight": 2}),
        "objective.signal_weight: expected a number in [0, 1] (got 2)",
    ),
    (
        lambda r: r.update(objectives=[{"metric": "aggregate", "signal": "forget_signal"}, {"metric": "mmlu"}]),
        "objectives[0].signal: only a single objective takes a signal",
    ),
    (
        lambda r: r.update(objective={"metric": "aggregate", "signl": "forget_signal"}),
        "objective.signl: unknown key (expected one of metric, mode, signal, signal_weight; did you mean 'signal'?)",
    ),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_bad_space_gets_one_clear_error_naming_the_key(edit, message):
    with pytest.raises(UnlearnSearchError) as caught:
        parse_space(_broken(edit))
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_load_space_reports_the_file_and_yaml_line(tmp_path):
    with pytest.raises(UnlearnSearchError, match="no such file"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nparams: {lr: [\n")
    with pytest.raises(UnlearnSearchError, match=r"bad.yaml line \d+: not valid YAML"):
        load_space(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UnlearnSearchError, match="not valid YAML"):  # safe-loaded: tags are refused
        load_space(unsafe)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_space(good).name == "t"


# ---------------------------------------------------------------- results (pure)

EVALUATION = {
    "forget-set": {"overall-regurgitation-score": 0.2, "overall-knowledge-score": 0.4},
    "retain-set": {"overall-regurgitation-score": 0.9, "overall-knowledge-score": 0.7},
    "harmonic-mean-task-aggregate": 0.6,
    "mia_loss_acc": 0.7,
    "mia_final_score": 0.6,
    "mmlu_average": 0.3,
    "aggregate-score": 0.5,
    "mmlu_threshold": 0.25,
    "passes_utility_threshold": True,
}


def test_final_metrics_and_the_mmlu_constraint():
    metrics = final_metrics(EVALUATION)
    assert metrics["aggregate"] == 0.5 and metrics["mmlu"] == 0.3 and metrics["mia_score"] == 0.6
    assert metrics["forget_efficacy"] == pytest.approx(1 - (0.2 + 0.4) / 2)
    assert metrics["retain_utility"] == pytest.approx((0.9 + 0.7) / 2)
    assert metrics[PASSES] == 1.0
    assert objective_value(metrics, Objective("aggregate")) == 0.5
    failing = final_metrics({**EVALUATION, "passes_utility_threshold": False})
    assert failing[PASSES] == 0.0
    assert objective_value(failing, Objective("aggregate")) == 0.0


def test_the_sampler_sees_the_weighted_signal_and_the_best_trial_is_still_the_best_metric():
    from unlearn_search.evaluation.evaluate import forget_signal

    # The forget answers' probability fell to 0.2, the retain's stayed at 0.9: (1 - 0.2) * 0.9.
    assert forget_signal(0.2, 0.9) == pytest.approx(0.72)
    assert forget_signal(1.0, 1.0) == 0.0 and forget_signal(0.0, 0.0) == 0.0
    probabilities = {
        "forget-set": {**EVALUATION["forget-set"], "mean-answer-probability": 0.2},
        "retain-set": {**EVALUATION["retain-set"], "mean-answer-probability": 0.9},
    }
    metrics = final_metrics({**EVALUATION, **probabilities})
    assert metrics["forget_signal"] == pytest.approx(0.72)
    objective = parse_space(
        {**copy.deepcopy(BASE), "objective": {"metric": "aggregate", "signal": "forget_signal"}}
    ).objectives[0]
    assert (objective.signal, objective.signal_weight) == ("forget_signal", 0.05)  # the default weight
    assert objective_value(metrics, objective) == pytest.approx(0.5 + 0.05 * metrics["forget_signal"])
    assert objective_value(metrics, Objective("aggregate", "min", "forget_signal", 0.1)) == pytest.approx(
        0.5 - 0.1 * metrics["forget_signal"]
    )
    assert objective_value(final_metrics(EVALUATION), objective) == 0.5  # no NLL, no signal: the metric
    failing = {**metrics, PASSES: 0.0}
    assert objective_value(failing, objective) == 0.0  # under the threshold: the penalty, no signal
    # A plateau trial with more signal is ranked higher by the sampler, never picked over a better aggregate.
    rows = [
        {"trial_id": "flat", "status": "completed", "aggregate": 0.10, "forget_signal": 0.9, PASSES: 1.0},
        {"trial_id": "good", "status": "completed", "aggregate": 0.12, "forget_signal": 0.1, PASSES: 1.0},
    ]
    assert objective_value(rows[0], objective) > objective_value(rows[1], objective)
    assert best_trial(rows, [objective])["trial_id"] == "good"


def test_every_attacks_auc_and_score_is_an_objective_or_a_constraint():
    raw = copy.deepcopy(BASE)
    raw["objective"] = {"metric": "mia_minkpp_score"}
    raw["constraints"] = [{"metric": "mia_reference_auc", "max": 0.6}, {"metric": "mia_zlib_score", "min": 0.2}]
    space = parse_space(raw)
    attacks = {
        "min_k": {"auc": 0.9, "score": 0.2},
        "min_k_plus_plus": {"auc": 0.3, "score": 0.6},
        "zlib": {"auc": 0.95, "score": 0.1},
        "reference": {"auc": 0.55, "score": 0.9},
    }
    metrics = final_metrics({**EVALUATION, "mia_attacks": attacks})
    assert objective_value(metrics, space.objectives[0]) == 0.6
    assert [c.met(metrics) for c in space.constraints] == [True, False]
    assert metrics["mia_mink_auc"] == 0.9 and metrics["mia_reference_score"] == 0.9
    # A reference metric among the constraints: the original's NLLs are scored before the first
    # trial, for the boundaries' estimates; a space that names none leaves it to the full evaluations.
    from unlearn_search.search.driver import uses_reference_attack

    assert uses_reference_attack(space) and not uses_reference_attack(parse_space(copy.deepcopy(BASE)))


def test_the_spaces_constraints_exclude_a_trial_like_the_mmlu_threshold():
    """An erased model (retain scores 0) can top the aggregate on a target whose MMLU is at
    chance; a constraint on retain_utility keeps it from being the best trial."""
    raw = copy.deepcopy(BASE)
    raw["constraints"] = [{"metric": "retain_utility", "min": 0.5}, {"metric": "forget_knowledge", "max": 0.3}]
    constraints = parse_space(raw).constraints
    assert [str(c) for c in constraints] == ["retain_utility >= 0.5", "forget_knowledge <= 0.3"]
    metrics = final_metrics(EVALUATION)  # retain_utility 0.8, forget_knowledge 0.4
    assert [c.violation(metrics) for c in constraints] == [pytest.approx(-0.3), pytest.approx(0.1)]
    assert with_constraints(metrics, []) == metrics and MEETS_CONSTRAINTS not in with_constraints(metrics, [])
    assert with_constraints(metrics, constraints[:1])[MEETS_CONSTRAINTS] == 1.0
    failing = with_constraints(metrics, constraints)
    assert failing[MEETS_CONSTRAINTS] == 0.0 and failing[PASSES] == 1.0
    assert objective_value(failing, Objective("aggregate")) == 0.0
    assert objective_value(failing, Objective("aggregate", "min")) == 1.0
    # A metric the evaluation could not compute (NaN) fails its constraint; Optuna refuses NaN.
    assert constraints[0].violation({**metrics, "retain_utility": math.nan}) == math.inf
    assert with_constraints({**metrics, "retain_utility": math.nan}, constraints[:1])[MEETS_CONSTRAINTS] == 0.0
    rows = [
        {"trial_id": "erased", "status": "completed", "aggregate": 0.37, PASSES: 1.0, MEETS_CONSTRAINTS: 0.0},
        {"trial_id": "kept", "status": "completed", "aggregate": 0.30, PASSES: 1.0, MEETS_CONSTRAINTS: 1.0},
    ]
    assert best_trial(rows, [Objective("aggregate")])["trial_id"] == "kept"
    assert best_trial(rows[:1], [Objective("aggregate")]) is None
    assert MEETS_CONSTRAINTS in summary_table(rows, ["lr"], "kept").splitlines()[0]
    assert MEETS_CONSTRAINTS not in summary_table(
        [{k: v for k, v in r.items() if k != MEETS_CONSTRAINTS} for r in rows], ["lr"], None
    )


def test_best_trial_never_picks_a_trial_under_the_threshold():
    rows = [
        {"trial_id": "a", "status": "completed", "aggregate": 0.9, PASSES: 0.0},
        {"trial_id": "b", "status": "completed", "aggregate": 0.6, PASSES: 1.0},
        {"trial_id": "c", "status": "completed", "aggregate": 0.5, PASSES: 1.0},
        {"trial_id": "d", "status": "pruned", "aggregate": None},
        {"trial_id": "e", "status": "failed"},
        {"trial_id": "f", "status": "pruned", "aggregate": 0.95, PASSES: 1.0},  # its last quick estimate
    ]
    assert best_trial(rows, [Objective("aggregate")])["trial_id"] == "b"
    assert best_trial(rows, [Objective("aggregate", "min")])["trial_id"] == "c"
    assert best_trial(rows[:1], [Objective("aggregate")]) is None
    table = summary_table(rows, ["lr"], "b")
    assert "b *" in table and len(table.splitlines()) == 2 + len(rows)
    assert "~0.95" in table.splitlines()[-1] and "~" not in table.splitlines()[3]  # marked as an estimate


def test_pareto_front_by_hand():
    rows = [
        {"id": 1, "f": 0.9, "r": 0.1},
        {"id": 2, "f": 0.5, "r": 0.5},
        {"id": 3, "f": 0.4, "r": 0.4},
        {"id": 4, "f": 0.1, "r": 0.9},
        {"id": 5, "f": 0.5, "r": 0.5},
    ]
    front = pareto_front(rows, [Objective("f"), Objective("r")])
    assert sorted(r["id"] for r in front) == [1, 2, 4, 5]  # 3 is dominated by 2; equal points both stay
    front = pareto_front(rows, [Objective("f", "min"), Objective("r")])
    assert [r["id"] for r in front] == [4]  # lowest f and highest r: dominates every other point


def test_multi_objective_search_uses_nsga2_stores_both_values_and_draws_the_pareto_front(tmp_path):
    """Ray's OptunaSearch driven through its Searcher API (no trials run): two objectives."""
    from unlearn_search.search.searcher import make_searcher
    from unlearn_search.tracking import study_plots

    raw = copy.deepcopy(BASE)
    raw["objectives"] = [{"metric": "forget_efficacy"}, {"metric": "retain_utility"}]
    raw["constraints"] = [{"metric": "retain_utility", "min": 0.5}]
    raw.pop("starts")
    space = parse_space(raw)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(space, optuna.storages.RDBStorage(storage), "mo", seed=0)
    assert isinstance(searcher._sampler, optuna.samplers.NSGAIISampler)
    quick = {"forget_efficacy": 0.9, "retain_utility": 0.9, "training_iteration": 1}  # estimates, same names
    for i in range(5):
        config = searcher.suggest(f"t{i}")
        assert config["method"] == "gd" and ("lora_rank" in config) == (config["trainable"] == "lora")
        searcher.on_trial_result(f"t{i}", quick)
        passes = i != 4  # the last one collapsed: MMLU below the threshold
        searcher.on_trial_complete(
            f"t{i}",
            {
                "forget_efficacy": 0.2 * i,
                "retain_utility": 1 - 0.15 * i,
                "mmlu": 0.4 if passes else 0.1,
                "mmlu_threshold": 0.3,
                PASSES: float(passes),
                TRIAL_OUTPUT: f"trials/t{i}",
            },
        )
    searcher.suggest("pruned")
    searcher.on_trial_result("pruned", quick)
    searcher.on_trial_complete("pruned", quick)  # stopped by the pruner: its last result is an estimate
    study = optuna.load_study(study_name="mo", storage=storage)
    assert len(study.directions) == 2
    assert [t.values for t in study.trials[:5]] == [[0.2 * i, 1 - 0.15 * i] for i in range(5)]
    assert study.trials[5].state == optuna.trial.TrialState.PRUNED and study.trials[5].values is None
    # Several objectives cannot carry the MMLU threshold and the space's constraints in their
    # values: NSGA-II gets them as constraints (feasible at <= 0).
    constraints = [t.constraints for t in study.trials]
    retain = [-0.5, -0.35, -0.2, -0.05, 0.1]  # 0.5 - retain_utility
    assert constraints[:4] == [
        {"mmlu": pytest.approx(-0.1), "retain_utility >= 0.5": pytest.approx(retain[i])} for i in range(4)
    ]  # MMLU 0.1 above the threshold
    assert constraints[4] == {"mmlu": pytest.approx(0.2), "retain_utility >= 0.5": pytest.approx(0.1)}
    assert constraints[5] == {}  # pruned: none
    ask = optuna.create_study().ask()  # a metric the evaluation could not compute: violation inf, which Optuna takes
    ask.set_constraint("retain_utility >= 0.5", space.constraints[0].violation({"retain_utility": math.nan}))
    plots = {p.name for p in study_plots(storage, "mo", tmp_path / "plots", ["forget_efficacy", "retain_utility"])}
    assert {"pareto_front.png", "optimization_history_forget_efficacy.png"} <= plots


# ---------------------------------------------------------------- fuzzing the loader

from hypothesis import HealthCheck, given, settings  # noqa: E402 - the fuzzing section's own
from hypothesis import strategies as st  # noqa: E402

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(
        [
            "gd",
            "sugd",
            "lora",
            "float",
            "loguniform",
            "int",
            "categorical",
            "tpe",
            "asha",
            "aggregate",
            "max",
            "lr",
            "epochs",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=8) | SCALARS.filter(lambda v: v is not None), inner, max_size=3),
    ),
    max_leaves=8,
)
PATHS = st.lists(
    st.sampled_from(
        [
            "name",
            "settings",
            "params",
            "starts",
            "objective",
            "objectives",
            "constraints",
            "search",
            "resources",
            "evaluation",
            "lr",
            "epochs",
            "trainable",
            "lora_rank",
            "low",
            "high",
            "choices",
            "when",
            "distribution",
            "method",
            "sampler",
            "metric",
            "min",
            0,
        ]
    ),
    min_size=1,
    max_size=4,
)


def _mutate(document, path, value):
    node = document
    for key in path[:-1]:
        if isinstance(node, dict) and key in node and isinstance(node[key], (dict, list)):
            node = node[key]
        elif (
            isinstance(node, list) and isinstance(key, int) and key < len(node) and isinstance(node[key], (dict, list))
        ):
            node = node[key]
        else:
            break
    last = path[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = value
    return document


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(PATHS, VALUES), min_size=1, max_size=3))
def test_loader_returns_a_space_or_one_clear_error_never_a_traceback(edits):
    document = copy.deepcopy(BASE)
    for path, value in edits:
        document = _mutate(document, path, value)
    try:
        space = parse_space(document)
    except UnlearnSearchError as error:
        text = str(error)
        assert text and "\n" not in text and ":" in text
        return
    assert space.params and space.objectives


@settings(max_examples=100, deadline=None)
@given(VALUES)
def test_loader_on_arbitrary_documents(document):
    try:
        parse_space(document)
    except UnlearnSearchError as error:
        assert "\n" not in str(error)


def test_resources_override_is_validated_like_the_file():
    """`run_search.py --resources workers=8 --resources gpus_per_worker=1`: the CPU-sized space on GPU nodes."""
    space = load_space(REPO / "search_spaces" / "sugd.yaml", {"resources": {"workers": 8, "gpus_per_worker": 1}})
    assert space.resources.workers == 8 and space.resources.gpus_per_worker == 1
    assert space.resources.zero_stage == 3  # the rest of the file's resources stay
    with pytest.raises(UnlearnSearchError, match=r"sugd.yaml: resources.gpus: unknown key"):
        load_space(REPO / "search_spaces" / "sugd.yaml", {"resources": {"gpus": 1}})


def test_tpe_models_after_a_third_of_a_small_budget(tmp_path):
    """Optuna's default (10 random trials first) would make a 6-trial search pure random search."""
    from unlearn_search.search.searcher import make_searcher

    space = parse_space(copy.deepcopy(BASE))
    assert [space.search.startup_trials(n) for n in (3, 6, 12, 30, 100)] == [2, 2, 4, 10, 10]
    raw = copy.deepcopy(BASE)
    raw["search"] = {"n_startup_trials": 5}
    assert parse_space(raw).search.startup_trials(6) == 5
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    searcher = make_searcher(space, storage, "s", seed=0, num_samples=12)
    assert isinstance(searcher._sampler, optuna.samplers.TPESampler) and searcher._sampler._n_startup_trials == 4


def test_pruners_act_during_training_and_never_on_a_trained_trial():
    """ASHA (grace 50, factor 2: rungs at 50 and 100) prunes a lagging trial mid-training, but a
    report at progress 100 ends training and the full evaluation must follow: Ray's ASHA would
    stop a trial there (rung 100, or a lower rung a one-epoch trial first reaches at 100)."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from unlearn_search.search.driver import _scheduler
    from unlearn_search.search.schedulers import TrainingMedianStopping

    raw = copy.deepcopy(BASE)
    raw["search"] = {"pruner": "asha", "grace_period": 50, "reduction_factor": 2}
    scheduler = _scheduler(parse_space(raw))
    trials = {name: Trial("trial", stub=True) for name in ("good", "lagging", "trained_low", "one_epoch")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name: str, progress: float, value: float) -> str:
        return scheduler.on_trial_result(None, trials[name], {"progress": progress, "aggregate": value})

    assert report("good", 50, 0.9) == TrialScheduler.CONTINUE
    assert report("lagging", 50, 0.1) == TrialScheduler.STOP  # below the rung's cutoff: pruned
    assert report("trained_low", 50, 0.9) == TrialScheduler.CONTINUE
    assert report("good", 100, 0.9) == TrialScheduler.CONTINUE
    # A trained trial scoring below the others is still evaluated.
    assert report("trained_low", 100, 0.0) == TrialScheduler.CONTINUE
    assert report("one_epoch", 100, 0.0) == TrialScheduler.CONTINUE

    raw["search"] = {"pruner": "median", "grace_period": 25}
    assert isinstance(_scheduler(parse_space(raw)), TrainingMedianStopping)


def test_the_pruner_compares_the_estimate_of_the_objective():
    """Boundary reports estimate every final metric under its own name: the pruner judges a trial
    on the search's objective and its direction, not on a fixed metric."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from unlearn_search.search.driver import _scheduler

    raw = copy.deepcopy(BASE)
    raw["search"] = {"pruner": "asha", "grace_period": 50, "reduction_factor": 2}
    raw["objective"] = {"metric": "forget_regurgitation", "mode": "min"}
    space = parse_space(raw)
    assert space.pruning_objective == Objective("forget_regurgitation", "min")
    scheduler = _scheduler(space)
    trials = {name: Trial("trial", stub=True) for name in ("forgets", "remembers")}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    # A high task aggregate does not save a trial that still regurgitates the forget set.
    first = {"progress": 50, "forget_regurgitation": 0.1, "task_aggregate": 0.2}
    assert scheduler.on_trial_result(None, trials["forgets"], first) == TrialScheduler.CONTINUE
    second = {"progress": 50, "forget_regurgitation": 0.9, "task_aggregate": 0.8}
    assert scheduler.on_trial_result(None, trials["remembers"], second) == TrialScheduler.STOP

    raw["objectives"] = [{"metric": "task_aggregate"}, {"metric": "mmlu"}]
    del raw["objective"]
    assert parse_space(raw).pruning_objective == Objective("aggregate", "max")


@pytest.mark.parametrize("pruner", ["asha", "median"])
def test_the_pruner_takes_an_estimate_within_min_delta_of_the_bar_as_a_tie(pruner):
    """The main job's estimates at its first rung (2026-11-27): the untouched start point 0.117,
    a trial halfway to forgetting 0.111, one MMLU question of the quick subset apart (task
    aggregate and MIA still 0 in both). Ray's rules prune the second; within min_delta (default
    0.02) it goes on, and a trial clearly below still stops. The same both ways for a minimized metric."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from unlearn_search.search.driver import _scheduler

    def decisions(
        min_delta: float | None, metric: str = "aggregate", mode: str = "max", sign: float = 1.0
    ) -> list[str]:
        raw = copy.deepcopy(BASE)
        raw["search"] = {"pruner": pruner, "grace_period": 50, "reduction_factor": 2}
        if min_delta is not None:
            raw["search"]["min_delta"] = min_delta
        raw["objective"] = {"metric": metric, "mode": mode}
        scheduler = _scheduler(parse_space(raw))
        trials = [Trial("trial", stub=True) for _ in range(4)]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        # The median rule needs two earlier trials past the grace period: both report the bar.
        values = [0.117, 0.117, 0.111, 0.08] if pruner == "median" else [0.117, 0.111, 0.08]
        controller = SimpleNamespace(get_live_trials=lambda: [])  # the median rule asks it while samples are few
        return [
            scheduler.on_trial_result(controller, trial, {"progress": 60, metric: sign * value})
            for trial, value in zip(trials, values)
        ]

    tie, below = (2, 3) if pruner == "median" else (1, 2)
    default = decisions(None)
    assert (default[tie], default[below]) == (TrialScheduler.CONTINUE, TrialScheduler.STOP)
    raw_rule = decisions(0.0)
    assert (raw_rule[tie], raw_rule[below]) == (TrialScheduler.STOP, TrialScheduler.STOP)
    # Minimized: the same gaps on a metric where lower is better.
    minimized = decisions(0.02, "forget_regurgitation", "min", sign=-1.0)
    assert (minimized[tie], minimized[below]) == (TrialScheduler.CONTINUE, TrialScheduler.STOP)
    with pytest.raises(UnlearnSearchError, match=r"search.min_delta"):
        parse_space({**copy.deepcopy(BASE), "search": {"min_delta": -0.1}})


def test_a_scheduler_pickled_before_the_margin_resumes_without_one():
    """--resume unpickles Tune's scheduler without calling __init__: one saved before min_delta
    existed must still judge (with Ray's rule, the one it started with)."""
    from ray import cloudpickle  # what Tune saves its scheduler with
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from unlearn_search.search.schedulers import TrainingMedianStopping

    scheduler = TrainingMedianStopping("progress", "aggregate", "max", grace_period=50)
    del scheduler.__dict__["min_delta"]  # as an older pickle has it
    scheduler = cloudpickle.loads(cloudpickle.dumps(scheduler))
    trials = [Trial("trial", stub=True) for _ in range(3)]
    controller = SimpleNamespace(get_live_trials=lambda: [])
    decisions = [
        scheduler.on_trial_result(controller, trial, {"progress": 60, "aggregate": value})
        for trial, value in zip(trials, (0.117, 0.117, 0.111))
    ]
    assert decisions == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE, TrialScheduler.STOP]


def test_the_pruner_judges_an_estimate_that_misses_a_constraint_as_the_worst(tmp_path):
    """An erased model estimates a high aggregate with retain at 0. Judged on the raw estimate it
    would set the bar and prune the trial that could be the best; judged as it will be scored, it
    is the one pruned, and its record keeps the estimate it reported."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from unlearn_search.search.driver import _scheduler
    from unlearn_search.search.schedulers import pruned_record

    class TrialWithDirectory:  # what the record needs of Tune's trial: an id, storage and a path
        trial_id, storage, path = "erased_again", "local", str(tmp_path / "erased_again")

    raw = copy.deepcopy(BASE)
    raw["search"] = {"pruner": "asha", "grace_period": 50, "reduction_factor": 2}
    raw["constraints"] = [{"metric": "retain_utility", "min": 0.5}]
    scheduler = _scheduler(parse_space(raw))
    trials = {name: Trial("trial", stub=True) for name in ("erased", "kept")}
    trials["erased_again"] = TrialWithDirectory()
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)

    def report(name: str, aggregate: float, retain: float) -> str:
        return scheduler.on_trial_result(
            None, trials[name], {"progress": 50, "aggregate": aggregate, "retain_utility": retain}
        )

    # The rung at 50 judges each report against those recorded before it.
    assert report("erased", 0.37, 0.0) == TrialScheduler.CONTINUE  # the first: recorded as 0
    assert report("kept", 0.10, 0.9) == TrialScheduler.CONTINUE  # 0.10 > 0 (on the raw 0.37: pruned)
    assert report("erased_again", 0.40, 0.0) == TrialScheduler.STOP
    assert pruned_record(trials["erased_again"].path) == {
        "at": 50,
        "metric": "aggregate",
        "value": 0.40,
        "judged": 0.0,
        "by": "TrainingASHA",
        "missed": ["retain_utility >= 0.5"],
    }
    raw["search"] = {"pruner": "median", "grace_period": 50}
    assert _scheduler(parse_space(raw)).constraints == parse_space(raw).constraints  # the same rule


def test_a_knob_of_a_searched_schedule_is_valid_under_its_condition():
    raw = copy.deepcopy(BASE)
    raw["settings"].pop("schedule")
    raw["params"]["schedule"] = {"distribution": "categorical", "choices": ["joint", "sugd"]}
    raw["params"]["positive_ratio"] = {"distribution": "int", "low": 1, "high": 7, "when": {"schedule": "sugd"}}
    space = parse_space(raw)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        values = space.define_by_run()(study.ask())
        assert ("positive_ratio" in values) == (values["schedule"] == "sugd")
    raw["params"]["positive_ratio"].pop("when")  # without it, joint trials would get an unknown knob
    with pytest.raises(
        UnlearnSearchError,
        match="params.positive_ratio: setting 'positive_ratio' is not known for method gd with schedule joint",
    ):
        parse_space(raw)


def test_a_grid_steps_over_the_whole_range_and_a_step_must_divide_it():
    raw = copy.deepcopy(BASE)
    raw["settings"]["schedule"] = "agad"
    raw["params"] = {"interleaving": {"distribution": "float", "low": 0.0, "high": 1.0, "step": 0.25}}
    raw["starts"] = []
    raw["search"] = {"sampler": "grid"}
    (param,) = parse_space(raw).params
    assert param.grid() == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Optuna would sample [0.0, 0.7] and warn at every trial: the space says so up front instead.
    raw["params"]["interleaving"]["step"] = 0.35
    with pytest.raises(UnlearnSearchError, match=r"^params.interleaving.step: expected a step that divides high - low"):
        parse_space(raw)


def test_a_resumed_search_finds_its_relative_storage_from_another_directory(tmp_path, monkeypatch):
    import json

    from unlearn_search.search.driver import STATE_FILE, TUNE_DIR, SearchOptions, prepare_output, study_storage

    space = parse_space(copy.deepcopy(BASE))
    output, elsewhere = tmp_path / "search", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    first = SearchOptions(output=output, storage="sqlite:///studies.db")
    prepare_output(space, first)
    storage = study_storage(output, first)
    assert storage == f"sqlite:///{tmp_path / 'studies.db'}"
    # What the first run leaves: its state (with the storage as the driver saves it) and Tune's directory.
    (output / STATE_FILE).write_text(json.dumps({"space": space.name, "storage": storage}))
    (output / TUNE_DIR).mkdir()

    monkeypatch.chdir(elsewhere)
    assert study_storage(output, SearchOptions(output=output, resume=True)) == storage
    same = SearchOptions(output=output, resume=True, storage="sqlite:///../studies.db")
    assert prepare_output(space, same) == output and study_storage(output, same) == storage
    with pytest.raises(UnlearnSearchError, match=r"^--storage sqlite:///studies.db: this search's study is in "):
        prepare_output(space, SearchOptions(output=output, resume=True, storage="sqlite:///studies.db"))
