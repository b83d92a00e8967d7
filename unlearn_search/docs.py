"""The reference pages in ``docs/`` that are generated from the code, so that they cannot go stale.

``unlearn-search docs --write`` writes them all; ``unlearn-search docs`` says which differ from the
code, and ``tests/test_docs.py`` fails on any that does:

- ``docs/space.md``: the search-space YAML schema, from the dataclasses and key sets of
  ``search/space.py``, ``training/trial.py`` (``Resources``) and ``search/lr_range.py``
  (``RangeTest``), with the defaults read from ``dataclasses.fields``;
- ``docs/cli.md``: every subcommand and option, from ``cli.build_parser()``;
- ``docs/outputs.md``: what a search writes, from the file-name constants of the modules that write it;
- ``docs/methods.md`` and ``docs/memory_plan.md``: generated where they always were (``cli.methods_markdown``,
  ``training.plan.memory_plan_page``).

The ``search``, ``resources`` and ``evaluation`` keys' help is their dataclass fields' own
(``methods.base.setting``); the other space keys' lives here, keyed by name (``TOP_HELP``, ...);
a command-line option's is its ``help=`` in ``cli.py``, which ``--help`` prints too.
``help_gaps()`` lists any key or option without help and any help here that names no key, so
that neither can go stale.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

REGENERATE = "unlearn-search docs --write"

# ---------------------------------------------------------------- docs/space.md: help text by key

# Top-level keys of a space file: (type, default, meaning). ``objective``'s default is read from the parser.
TOP_HELP: dict[str, tuple[str, str, str]] = {
    "name": (
        "string",
        "the file's name without `.yaml`",
        (
            "letters, digits, `-` and `_`; names the output folder (`outputs/<name>`), the Optuna study and the "
            "MLflow experiment (`unlearn-search/<name>`)"
        ),
    ),
    "description": ("string", '`""`', "free text"),
    "settings": (
        "mapping",
        "required (with `method`)",
        "fixed trial settings: any name `unlearn-search methods` lists (below)",
    ),
    "params": (
        "mapping",
        "required (at least one)",
        (
            "the searched parameters, each a name and its distribution ([params](#params)); none may also be "
            "fixed in `settings`"
        ),
    ),
    "starts": (
        "list",
        "`[]`",
        (
            "parameter assignments evaluated first, in order (published values); each value within its "
            "parameter's range or choices"
        ),
    ),
    "objective": ("mapping or a metric name", None, "what a search optimizes ([objective](#objective-objectives))"),
    "objectives": (
        "list",
        "none",
        "several objectives instead (NSGA-II by default); give `objective` or `objectives`, not both",
    ),
    "constraints": ("list", "`[]`", "bounds a finished trial must meet ([constraints](#constraints))"),
    "search": ("mapping", "the defaults below", "sampler, pruner and budget ([search](#search))"),
    "resources": (
        "mapping",
        "the defaults below",
        (
            "each trial's workers and its quick evaluation ([resources](#resources)); `--resources KEY=VALUE` "
            "overrides a key"
        ),
    ),
    "evaluation": (
        "mapping",
        "the defaults below",
        "the full evaluation each finished trial gets ([evaluation](#evaluation))",
    ),
    "lr_range_test": (
        "mapping",
        "none (no test)",
        "fit `params.lr` to the model before the search ([lr_range_test](#lr_range_test))",
    ),
}

# Keys of one ``params`` entry (``space.PARAM_KEYS``, the fields of ``space.Param`` but its name).
PARAM_HELP = {
    "distribution": "one of [[DISTRIBUTIONS]]",
    "low": "the range's lower end (float, int: required; > 0 for a log range)",
    "high": "its upper end (> low)",
    "step": "a grid step (float, int; at most high - low; not with a log range)",
    "log": "float, int: sample on a log scale (Optuna's `log=True`)",
    "choices": "categorical only (required there): a non-empty list of distinct strings, numbers, booleans or null",
    "when": "`{setting: value or [values]}`: sampled only where each named setting or parameter takes one of "
    "those values (a fixed setting's value must be among them)",
}

OBJECTIVE_HELP = {  # ``space.Objective``
    "metric": "one of [[OBJECTIVE_METRICS]]",
    "mode": "`max` or `min`",
    "signal": "one objective only: one of [[SIGNAL_METRICS]], added to what the sampler sees",
    "signal_weight": "the signal's weight, in [0, 1]",
}

CONSTRAINT_HELP = {  # ``space.Constraint``
    "metric": "one of [[OBJECTIVE_METRICS]]; each metric at most once with `min` and once with `max`",
    "min": "the metric must be >= min",
    "max": "the metric must be <= max (exactly one of `min` and `max` per entry)",
}

RANGE_FROM_LR = ("low", "high")  # fields of RangeTest that params.lr sets; not keys of the block


def _declared_help(cls, left_out: tuple[str, ...] = ()) -> dict[str, str]:
    """A block's help where its dataclass declares it (``methods.base.setting``), with its valid
    values; ``left_out``: fields that are not keys of the block."""
    from unlearn_search.methods.base import declared

    def valid(knob) -> str:
        if knob.choices:
            return "one of " + ", ".join(f"`{c}`" for c in knob.choices)
        return knob.valid_range()

    return {
        name: knob.help + (f"; {valid(knob)}" if valid(knob) else "")
        for name, knob in declared(cls).items()
        if name not in left_out
    }


def _blocks() -> list[tuple[str, type, dict[str, str], tuple[str, ...]]]:
    """Each documented block: its key, the dataclass behind it, its help, the fields it leaves out."""
    from unlearn_search.search.lr_range import RangeTest
    from unlearn_search.search.space import (
        Constraint,
        Objective,
        Param,
        SearchEvaluation,
        SearchSettings,
    )
    from unlearn_search.training.trial import Resources

    return [
        ("params", Param, PARAM_HELP, ("name",)),
        ("objective", Objective, OBJECTIVE_HELP, ()),
        ("constraints", Constraint, CONSTRAINT_HELP, ()),
        ("search", SearchSettings, _declared_help(SearchSettings), ()),
        ("resources", Resources, _declared_help(Resources), ()),
        ("evaluation", SearchEvaluation, _declared_help(SearchEvaluation), ()),
        ("lr_range_test", RangeTest, _declared_help(RangeTest, RANGE_FROM_LR), RANGE_FROM_LR),
    ]


def help_gaps() -> list[str]:
    """Every key without help and every help entry that names no key (empty: the help is whole)."""
    from unlearn_search.search.space import PARAM_KEYS, TOP_KEYS

    gaps = []

    def compare(where: str, keys, helped) -> None:
        gaps.extend(f"{where}.{k}: no help in unlearn_search/docs.py" for k in sorted(set(keys) - set(helped)))
        gaps.extend(f"{where}.{k}: help for a key the code does not have" for k in sorted(set(helped) - set(keys)))

    gaps.extend(_cli_gaps())
    compare("space", TOP_KEYS, TOP_HELP)
    compare("params", PARAM_KEYS, PARAM_HELP)
    for key, cls, helped, left_out in _blocks():
        compare(key, [f.name for f in dataclasses.fields(cls) if f.name not in left_out], helped)
    return gaps


def _values() -> dict[str, str]:
    from unlearn_search.evaluation.evaluate import DEFAULT_THRESHOLD_FRACTION
    from unlearn_search.search import space
    from unlearn_search.training.trial import PLACEMENTS

    names = {
        "DISTRIBUTIONS": space.DISTRIBUTIONS,
        "SAMPLERS": space.SAMPLERS,
        "PRUNERS": space.PRUNERS,
        "EVAL_SPLITS": space.EVAL_SPLITS,
        "OBJECTIVE_METRICS": space.OBJECTIVE_METRICS,
        "SIGNAL_METRICS": space.SIGNAL_METRICS,
        "PLACEMENTS": tuple(PLACEMENTS),
    }
    values = {name: ", ".join(f"`{v}`" for v in items) for name, items in names.items()}
    values["THRESHOLD"] = f"{DEFAULT_THRESHOLD_FRACTION:.0%}".replace("%", " %")
    return values


def _fill(text: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        text = text.replace(f"[[{name}]]", value)
    if "[[" in text:
        raise KeyError(f"unknown placeholder in {text!r}")
    return text


def _yaml(value: Any) -> str:
    """A default as it would be written in a space file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


_TYPE_WORDS = {
    "str": "string",
    "float": "number",
    "int": "integer",
    "bool": "true/false",
    "tuple": "list",
    "dict[str, tuple]": "mapping",
}


def _type_words(annotation: Any) -> str:
    parts = [p.strip() for p in str(annotation).split("|")]
    words = " or ".join(_TYPE_WORDS.get(p, p) for p in parts if p != "None")
    return words + (" or null" if "None" in parts else "")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _minimal_space(**extra):
    """The smallest valid space, with ``extra`` top-level keys: defaults as the parser fills them in."""
    from unlearn_search.search.space import parse_space

    return parse_space(
        {
            "settings": {"method": "ga"},
            "params": {"lr": {"distribution": "float", "log": True, "low": 1e-5, "high": 1e-3}},
            **extra,
        }
    )


def _field_table(
    cls,
    helped: dict[str, str],
    left_out: tuple[str, ...],
    values: dict[str, str],
    defaults: dict[str, str] | None = None,
) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in left_out:
            continue
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f"`{_yaml(f.default)}`"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"`{_yaml(f.default_factory())}`"
        else:
            default = "required"
        lines.append(f"| `{f.name}` | {_type_words(f.type)} | {default} | {_cell(_fill(helped[f.name], values))} |")
    return lines


EXAMPLE = """\
```yaml
name: sugd
settings: {method: gd, schedule: sugd, batch_size: 8}          # fixed trial settings
params:                                                        # searched, in order
  lr: {distribution: float, log: true, low: 1.0e-6, high: 1.0e-1}   # narrowed by lr_range_test
  positive_ratio: {distribution: int, low: 1, high: 7}
  trainable: {distribution: categorical, choices: [last_k, lora]}
  lora_rank: {distribution: categorical, choices: [8, 16, 32], when: {trainable: lora}}
starts: [{lr: 1.0e-5, positive_ratio: 7, trainable: last_k}]   # evaluated first (published values)
lr_range_test: {steps: 48}                                     # optional: fit lr to the model first
objective: {metric: aggregate, mode: max, signal: forget_signal}  # or objectives: [...] for NSGA-II
constraints: [{metric: retain_utility, min: 0.5}]              # optional: bounds a finished trial must meet
search: {sampler: tpe, pruner: asha, grace_period: 50, num_samples: 8, max_concurrent: 1,
         time_budget_s: 1500}
resources: {workers: 2, cpus_per_worker: 1, zero_stage: 3}
evaluation: {split: train, max_new_tokens: 128, mmlu_limit: 4}
```

(An abridged `search_spaces/sugd.yaml`, plus a `constraints` line.)"""


def space_markdown() -> str:
    """docs/space.md: every key of a search-space file with its type, default and meaning."""
    from unlearn_search.search.space import SearchSettings
    from unlearn_search.training.config import TRIAL_FIELDS

    values = _values()
    default = _minimal_space()
    objective = default.objectives[0]
    weight = _minimal_space(objective={"metric": "aggregate", "signal": "forget_signal"}).objectives[0].signal_weight
    search = SearchSettings()
    threshold = values["THRESHOLD"]
    blocks = {key: (cls, helped, left_out) for key, cls, helped, left_out in _blocks()}

    def table(key: str, defaults: dict[str, str] | None = None) -> list[str]:
        cls, helped, left_out = blocks[key]
        return _field_table(cls, helped, left_out, values, defaults)

    lines = [
        "# Search spaces",
        "",
        f"Generated by `{REGENERATE}` from `unlearn_search/search/space.py`, `training/trial.py`",
        "(`Resources`) and `search/lr_range.py` (`RangeTest`); a test keeps this file equal to that",
        "output and the help text in `unlearn_search/docs.py` equal to the keys. A space file",
        "(`search_spaces/*.yaml`, one per method family) is read by `python run_search.py --space FILE`",
        "(the same as `unlearn-search search`, [cli.md](cli.md)). Any mistake in it is one error naming",
        "the key, before anything starts.",
        "",
        EXAMPLE,
        "",
        "## Top-level keys",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, (kind, default_text, meaning) in TOP_HELP.items():
        if key == "objective":
            default_text = f"`{{metric: {objective.metric}, mode: {objective.mode}}}`"
        lines.append(f"| `{key}` | {kind} | {default_text} | {_cell(meaning)} |")
    settings = (
        "Fixed trial settings, the same names as `--set`, the `params` and the MLflow params: the trial "
        "settings (" + ", ".join(f"`{n}`" for n in TRIAL_FIELDS) + ") and the knobs of the chosen "
        "`method` and `schedule`; [methods.md](methods.md) lists every one with its default and valid "
        "values. `method` is required."
    )
    lines += [
        "",
        "## settings",
        "",
        *textwrap.wrap(settings, 100, break_on_hyphens=False),
        "",
        "## params",
        "",
        "Each searched parameter: `name: {distribution: ..., ...}`. The sampler draws them in",
        "the file's order, each after any it names in `when`.",
        "",
    ]
    lines += _field_table(blocks["params"][0], PARAM_HELP, ("name",), values)
    lines += [
        "",
        "## objective, objectives",
        "",
        "`objective: {metric, mode, signal, signal_weight}` (or just a metric name), or `objectives:` a list",
        "of `{metric, mode}`, each metric at most once.",
        "",
    ]
    lines += table("objective", {"signal_weight": f"`{weight}` with a signal"})
    lines += ["", "## constraints", "", "A list of `{metric, min}` or `{metric, max}`.", ""]
    lines += table("constraints")
    lines += ["", "## search", ""] + table("search")
    lines += ["", "## resources", "", "How each trial runs (the trial runner's own settings, one name each).", ""]
    lines += table("resources")
    lines += [
        "",
        "## evaluation",
        "",
        "The full evaluation every finished trial gets; the best trial is re-evaluated",
        "on the items of `--final-split` (default all) and all of MMLU unless `--final-mmlu-limit`.",
        "",
    ]
    lines += table("evaluation")
    lines += [
        "",
        "## lr_range_test",
        "",
        "Needs `params.lr` with distribution `float` and `log: true`, and at least one start. `low` and `high` are",
        "not keys here: the test ramps over `params.lr`'s range.",
        "",
    ]
    lines += table("lr_range_test")
    lines += [
        "",
        "## How the keys act together",
        "",
        *f"""\
**Boundaries and the quick estimate.** Each trial is a Ray Train run whose workers host DeepSpeed
ZeRO-3 shards of the student (and of the frozen teacher when the method needs one). At schedule
boundaries at least `resources.eval_every` percent of training apart (the last boundary always)
the workers report losses and a quick evaluation: the full evaluation's formula on a fixed subset
spread over the final evaluation's split (`resources.eval_items` forget + retain items,
`eval_documents` MIA documents, `eval_mmlu_limit` MMLU questions per subject, the same shots),
which estimates every metric under its final name. After training, the trial's full evaluation
runs as a Ray task holding the trial's CPUs and, on GPU clusters, one GPU.

**Pruning.** The pruner judges that estimate of the objective (of the aggregate with several
objectives) during training; a trial that finished training is never pruned: it gets the full
SemEval evaluation (`evaluation:`) and its aggregate is the objective. `pruner: asha` is ASHA with
`reduction_factor` (default {search.reduction_factor:g}); `median` judges a trial's best estimate so far against the
median of the other trials' running means; `none` never prunes; `grace_period` is a percent of a
trial's training. `min_delta` (default {search.min_delta:g}, in the objective's units) is how much worse than
a rung's bar (ASHA), or than that median, an estimate must be for the trial to be pruned: the
estimates come from a small fixed subset, where one MMLU question moves the aggregate by 0.006,
so a closer gap is a tie. Ray's rules alone prune on any gap: with 0, the main job pruned a trial
that was unlearning because an untouched one scored one quick MMLU question higher
([results.md](results.md), "Pruning on ties"). A pruned trial's Tune directory holds `pruned.json`
([outputs.md](outputs.md)).

**Samplers.** `tpe` (the default) samples at random until `n_startup_trials` trials have finished,
by default a third of the trials, 2 to 10, where Optuna's own default of 10 would leave a 6-trial
search random; `nsga2` is the default with several objectives; `random`; `grid` (categorical, int
or stepped float parameters, no `when`). `time_budget_s` (or `--time-budget`) is the search's
wall-clock budget: once spent, no trial starts and the running ones are cut (`stopped`).

**Signal.** An objective's `signal` (weight `signal_weight`, default {weight:g} with a signal) is added to
what the sampler sees (`metric + signal_weight * signal`, `-` for mode `min`), so that it can climb
where the aggregate is flat; the best trial is still the best by `metric` alone.

**The utility threshold and constraints.** A trial under the MMLU threshold
(`evaluation.mmlu_threshold`, else {threshold} of the original model's MMLU on the same questions)
fails the constraint: its objective is reported as 0 (1 for an objective minimized) and it is
never the best trial; with several objectives the sampler gets it as an Optuna constraint
instead (NSGA-II and TPE prefer trials that pass it, and failing ones by how little they miss).
`constraints` act the same way, also on the estimates the pruner judges, and
`meets_constraints` in the results says whether a trial met them all; a metric the evaluation
could not compute (NaN) misses its constraint. On the default target, whose MMLU is at chance,
the threshold cannot tell a model that forgot everything, the retain set included, from a good
one; `{{metric: retain_utility, min: ...}}` can ([results.md](results.md), AGAD). The best trial's
re-evaluation is held against the original's MMLU on its own questions (`original_mmlu.json`
keeps one figure per set of questions).

**keep_best.** With the setting `keep_best: true` a trial ends with the weights of its boundary
whose quick aggregate was highest (ties: the later), as transformers' `load_best_model_at_end`
does, instead of its last step's; `kept_step` in its results says which (rank 0 holds a copy of
the trained parameters, a small part of the model with LoRA or last_k, and writes it into each
checkpoint, so a resumed worker keeps it). It needs the objective `aggregate`, `max`. A trial whose
loss diverges still ends as failed, with no model, whatever it had kept.

**lr_range_test.** The test runs the first start once with the lr rising geometrically over
`params.lr`, scoring fixed forget and retain items every `probe_every` steps; the search then
samples `lr` log-uniformly from `below` decades under to `above` decades over the lr where the
forget NLL grew `e**rise`-fold, capped where
the retain NLL grew as much or the run diverged; a start outside the fitted range moves to its
log-midpoint. It writes `lr_range.json` and `plots/lr_range.png` in the output and `lr_range.*`
params in MLflow; `unlearn-search lr-range --space ...` runs it alone. Why below the onset: the
module docstring of `unlearn_search/search/lr_range.py`.""".splitlines(),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- docs/cli.md

# Facts about a command that its options' help does not say, keyed by the command's words.
CLI_NOTES: dict[str, list[str]] = {
    "target build": [
        (
            "No model hub is reachable here, so the default target is built the way the task organizers built "
            "theirs: a small OLMo (`OlmoForCausalLM`) with its own byte-level BPE tokenizer, trained from scratch "
            "until it has memorized the forget and retain items and the MIA member documents (never the "
            "non-members). It is cached under `~/.cache/unlearn-search/targets`, keyed by data and settings."
        ),
    ],
    "evaluate": [
        "Scores as the organizers do and writes the files their scorer reads ([evaluation.md](evaluation.md)).",
        (
            "`trust_remote_code` stays off unless `--trust-remote-code` is given; trials and searches never turn "
            "it on (OLMo, like every architecture transformers ships, needs none)."
        ),
    ],
    "search": [
        (
            "`python run_search.py --space FILE [options]` is the same command. What it writes: "
            "[outputs.md](outputs.md); the space file: [space.md](space.md)."
        ),
        (
            "`--output` is never overwritten: a second search there is refused unless `--resume` continues it, "
            "with its first run's `--storage`, `--tracking-uri` and `--experiment` (naming others is an error; a "
            "relative SQLite or MLflow file-store path is saved absolute, so it resumes from any directory)."
        ),
        (
            "`--address` takes `auto`, `host:port` or `ray://host:port` to join a cluster; without it a local Ray "
            "starts with `--num-cpus` CPUs (default all)."
        ),
        (
            "`--tracking-uri` takes any MLflow URI (default `sqlite:///<output>/mlflow.db`); an `http://` server "
            "is checked before Ray starts. `--storage` takes any RDB URL (default `sqlite:///<output>/optuna.db`)."
        ),
        (
            "`--num-samples`, `--max-concurrent` and `--time-budget` override the space's `search:`; "
            "`--resources KEY=VALUE` its `resources:`."
        ),
        (
            "The Ray dashboard listens on `--dashboard-host` (127.0.0.1; its URL is printed); Ray's token "
            "authentication is on, so API calls need the token Ray stores in `~/.ray/auth_token`."
        ),
    ],
    "plan": ["The 7B figures and how they were checked on a GPU: [memory_plan.md](memory_plan.md)."],
    "methods": ["`--markdown` prints [methods.md](methods.md)."],
    "data fetch": ["The public LUME release, split into train and validation at `--validation-fraction`."],
    "docs": ["Without `--write`, says which pages differ from the code (an error if any does)."],
}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """A parser's options, ``--help`` left out."""
    return [a for a in parser._actions if not (a.default is argparse.SUPPRESS and a.dest == "help")]


def _option_name(action: argparse.Action) -> str:
    return max(action.option_strings, key=len) if action.option_strings else action.dest


def _cli_gaps() -> list[str]:
    return [
        f"unlearn-search {' '.join(words)} {_option_name(action)}: no help in cli.py"
        for words, _, parser in commands()
        for action in _options(parser)
        if not action.help
    ]


def _subcommands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(words, help, parser) of every leaf subcommand, in the order they were added.

    argparse has no public way to list a parser's subcommands or options: this reads
    ``parser._actions``, ``argparse._SubParsersAction`` and its ``_choices_actions``, which
    ``tests/test_docs.py`` checks so that a change in argparse fails loudly."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found = list(_subcommands(sub, (*words, name)))
                yield from found or [((*words, name), helps.get(name) or "", sub)]


def _option_help(action: argparse.Action, prog: str) -> str:
    """An option's help with argparse's ``%(...)s`` specifiers filled in, as ``--help`` prints it."""
    if not action.help:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["prog"] = prog
    for key, value in list(params.items()):
        if hasattr(value, "__name__"):
            params[key] = value.__name__
    if params.get("choices") is not None:
        params["choices"] = ", ".join(map(str, params["choices"]))
    return action.help % params


def _option_value(action: argparse.Action) -> str:
    from unlearn_search.cli import _positive_int

    if action.nargs == 0:
        return "flag"
    if action.choices is not None:
        return " / ".join(f"`{c}`" for c in action.choices)
    if action.metavar:
        return f"`{action.metavar}`"
    return {None: "text", int: "integer", float: "number", _positive_int: "integer >= 1"}.get(
        action.type, getattr(action.type, "__name__", str(action.type))
    )


def _option_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.nargs == 0:
        return "on" if action.default else "off"
    if action.default is None:
        return "-"
    return f"`{action.default}`"


def commands() -> list[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    from unlearn_search.cli import build_parser

    return list(_subcommands(build_parser()))


def cli_markdown() -> str:
    """docs/cli.md: every ``unlearn-search`` subcommand with its options (name, value, default, help)."""
    found = commands()
    unknown = sorted(set(CLI_NOTES) - {" ".join(words) for words, _, _ in found})
    if unknown:
        raise KeyError(f"CLI_NOTES names no command: {', '.join(unknown)}")
    lines = [
        "# Command line",
        "",
        f"Generated by `{REGENERATE}` from `unlearn_search.cli.build_parser()` (a test keeps this",
        "file equal to that output); `unlearn-search COMMAND --help` prints the same. Every command that",
        "reads data takes `--data`, found in this order: `--data DIR`, `$UNLEARN_SEARCH_DATA`,",
        "`../shared/data`, the user cache filled by `unlearn-search data fetch` (the public LUME release).",
        "A model is `tiny`, `small` (the reference targets, built once and cached) or any local Hugging",
        "Face causal-LM directory. A mistake in the input is one error line (`unlearn-search: error: ...`)",
        "and exit status 2.",
        "",
        "| command | what it does |",
        "|---|---|",
    ]
    for words, help_text, _ in found:
        anchor = "unlearn-search-" + "-".join(words)
        lines.append(f"| [`unlearn-search {' '.join(words)}`](#{anchor}) | {_cell(help_text)} |")
    for words, help_text, parser in found:
        lines += [
            "",
            f"## unlearn-search {' '.join(words)}",
            "",
            help_text[:1].upper() + help_text[1:] + ".",
            "",
            "| option | value | default | what it does |",
            "|---|---|---|---|",
        ]
        for action in _options(parser):
            name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
            lines.append(
                f"| {name} | {_cell(_option_value(action))} | {_cell(_option_default(action))} | "
                f"{_cell(_option_help(action, parser.prog))} |"
            )
        notes = CLI_NOTES.get(" ".join(words), [])
        if notes:
            lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- docs/outputs.md

EVALUATION_DOC = "[evaluation.md](evaluation.md#what-is-written)"


def evaluation_files() -> list[tuple[str, str]]:
    """An evaluation folder's files (``evaluation.evaluate.write_results``): path, meaning."""
    from unlearn_search.evaluation.evaluate import (
        MIA_DIR,
        MMLU_METRICS_FILE,
        OFFICIAL_RESULTS_FILE,
        RESULTS_FILE,
    )

    return [
        (RESULTS_FILE, f"all scores ({EVALUATION_DOC})"),
        (OFFICIAL_RESULTS_FILE, "the same, one line, under the official file name"),
        ("forget_0.csv", "one row per forget item: input, expected and model output, NLL"),
        ("retain_0.csv", "the same for the retain items"),
        (f"{MIA_DIR}/", "the MIA documents' NLLs"),
        (f"{MIA_DIR}/member_0.csv", "one row per member document"),
        (f"{MIA_DIR}/nonmember_0.csv", "one row per non-member document"),
        (MMLU_METRICS_FILE, "MMLU average and per subject (the official scorer's input)"),
    ]


def output_entries() -> list[tuple[str, str, tuple[str, str] | None]]:
    """What a search writes under ``--output``: (path, meaning, where its name is written).

    A path built from the writers' own constants carries None; a name the code writes as a
    literal carries (module, the literal), which ``tests/test_docs.py`` finds in that module."""
    from unlearn_search.evaluation.baseline import ORIGINAL_MMLU_FILE
    from unlearn_search.models.loading import TARGET_MANIFEST
    from unlearn_search.search.driver import (
        BEST_DIR,
        ORIGINAL_DIR,
        ORIGINAL_KEY_FILE,
        RESULT_FILE,
        RETRAINED_DIR,
        STATE_FILE,
        TRIALS_DIR,
        TUNE_DIR,
    )
    from unlearn_search.search.lr_range import RANGE_FILE
    from unlearn_search.search.schedulers import BUDGET_FILE, PRUNED_FILE
    from unlearn_search.tracking.mlflow_tracking import PARENT_FILE, PENDING_FILE
    from unlearn_search.tracking.report import PER_TASK_PLOT, REPORT_FILE
    from unlearn_search.training.trial import MODEL_DIR, TRAINED_DIR

    driver, tracking, trial, plots, cli = (
        "unlearn_search.search.driver",
        "unlearn_search.tracking.mlflow_tracking",
        "unlearn_search.training.trial",
        "unlearn_search.tracking.plots",
        "unlearn_search.cli",
    )
    trial_dir, best = f"{TRIALS_DIR}/<trial id>/", f"{BEST_DIR}/"
    entries = [
        ("space.yaml", "the space as given", (driver, "space.yaml")),
        (STATE_FILE, "the model, the study's storage, the MMLU threshold", None),
        ("optuna.db", "the Optuna study (default `--storage`)", (driver, "optuna.db")),
        ("mlflow.db", "MLflow's runs (default `--tracking-uri`)", (tracking, "mlflow.db")),
        ("mlartifacts/", "MLflow's artifacts (with the default tracking)", (tracking, "mlartifacts")),
        (PARENT_FILE, "ties the search and its trials to their MLflow runs", None),
        (PENDING_FILE, "any MLflow call the server did not take", None),
        (ORIGINAL_MMLU_FILE, "the original model's MMLU, one figure per set of questions", None),
        (RANGE_FILE, "with `lr_range_test`: the curve, the onset and the fitted lr range", None),
        (BUDGET_FILE, "written when the time budget ran out", None),
        (
            "teacher_cache/",
            ("with `teacher: cached`: the original's outputs, built once per search (126 MB on `small`)"),
            (driver, "teacher_cache"),
        ),
        (f"{TUNE_DIR}/", "Tune's experiment, which `--resume` continues", None),
        (f"{TUNE_DIR}/<trial>/", "Tune's folder of one trial", None),
        (
            f"{TUNE_DIR}/<trial>/{PRUNED_FILE}",
            (
                "a pruned trial's: where, the estimate it reported, the value the "
                "pruner judged, any constraint it missed"
            ),
            None,
        ),
        (f"{TRIALS_DIR}/", "one folder per trial", None),
        (trial_dir, "a trial's own files", None),
        (
            f"{trial_dir}{TRAINED_DIR}/",
            "its trained parameters (LoRA adapters, the last k layers or every weight), as the last checkpoint "
            "held them: with the original, its model (the best trial's is exported to "
            f"`{BEST_DIR}/{MODEL_DIR}/`)",
            None,
        ),
        (
            f"{trial_dir}ray/",
            "the trial's Ray Train run: the boundary checkpoints a restarted worker resumes from",
            (trial, "ray"),
        ),
        (f"{trial_dir}metrics.jsonl", "every report: losses, quick estimates, timings", (trial, "metrics.jsonl")),
        (f"{trial_dir}{RESULT_FILE}", "its final metrics (a resumed search reports them again)", None),
        *[(trial_dir + path, meaning, None) for path, meaning in evaluation_files()],
        (best, "the best trial, re-evaluated on the train and validation items and all of MMLU", None),
        (f"{best}{MODEL_DIR}/", f"its model, a Hugging Face checkpoint (with `{TARGET_MANIFEST}`)", None),
        (f"{best}trial.json", "its row of trials.json", (driver, "trial.json")),
        (f"{best}...", "the evaluation files, as in a trial's folder", None),
        (f"{ORIGINAL_DIR}/", "the original model scored as the best trial was (its MMLU from the cache)", None),
        (f"{ORIGINAL_DIR}/{ORIGINAL_KEY_FILE}", "the settings it was scored on", None),
        (f"{RETRAINED_DIR}/", "the retrained gold standard scored the same way, where one was built", None),
        (f"{ORIGINAL_DIR}/...", "the evaluation files, as in a trial's folder", None),
        ("trials.json", "every trial's row: status, parameters, scores", (driver, "trials.json")),
        ("summary.txt", "the table the search prints", (driver, "summary.txt")),
        ("plots/", "Optuna's plots of the study, as PNG", (cli, "plots")),
        ("plots/optimization_history.png", "the objective by trial", (plots, "optimization_history")),
        ("plots/param_importances.png", "which parameters mattered", (plots, "param_importances")),
        (
            "plots/parallel_coordinate.png",
            "each trial's parameters against its objective",
            (plots, "parallel_coordinate"),
        ),
        (
            "plots/pareto_front.png",
            "with several objectives (then one of each plot above per objective)",
            (plots, "pareto_front"),
        ),
        ("plots/lr_range.png", "with `lr_range_test`: its curve", (driver, "lr_range.png")),
        (f"plots/{PER_TASK_PLOT}.png", "the best trial's per-task forget and retain scores against the original", None),
        (REPORT_FILE, "the page to open: trials table, these plots, the best trial against the original", None),
    ]
    return entries


def _tree(entries: list[tuple[str, str]]) -> list[str]:
    """Paths (folders end in ``/``) drawn as a tree under the search's output, each with its meaning."""
    children: dict[str, list[str]] = {"": []}
    meaning = {}
    for path, text in entries:
        parent = path.rstrip("/").rpartition("/")[0]
        parent = parent + "/" if parent else ""
        if parent not in children:
            raise ValueError(f"{path}: its folder {parent} is not listed before it")
        children[parent].append(path)
        children.setdefault(path, [])
        meaning[path] = text
    rows = []

    def walk(folder: str, prefix: str) -> None:
        items = children[folder]
        for i, path in enumerate(items):
            last = i == len(items) - 1
            name = path[len(folder) :]
            rows.append((f"{prefix}{'└── ' if last else '├── '}{name}", meaning[path]))
            if path.endswith("/"):
                walk(path, prefix + ("    " if last else "│   "))

    walk("", "")
    width = max(len(row) for row, _ in rows) + 2
    return ["outputs/<space name>/"] + [f"{row.ljust(width)}# {text}" for row, text in rows]


def outputs_markdown() -> str:
    """docs/outputs.md: what a search writes, drawn from the file names the code declares."""
    entries = [(path, text) for path, text, _ in output_entries()]
    lines = [
        "# What a search writes",
        "",
        f"Generated by `{REGENERATE}` from the file names the code declares (a test keeps this",
        "file equal to that output, so a renamed file breaks it). Everything lands under `--output`",
        "(default `outputs/<space name>`), which is never overwritten: a second search there is",
        "refused unless `--resume` continues it.",
        "",
        "```",
        *_tree(entries),
        "```",
        "",
        *"""\
A trial's folder and `best/` hold the same evaluation files as `unlearn-search evaluate --output`:
their columns and keys, and how to rerun the organizers' scorer on them, are in
[evaluation.md](evaluation.md).

`trials.json` and `summary.txt` list each trial as `completed`, `pruned` by the pruner, `stopped`
(when the time budget ran out, for good: a FAIL in the Optuna study; or the search was
interrupted, which `--resume` continues) or `failed`; one that did not finish shows its last
quick estimates, marked `~`. Both are written before the best trial's re-evaluation, and if that
fails, `--resume` retries it and keeps any earlier `best/` (it is built in `best.partial/` and
moved in at the end). A plot the study cannot support yet (too few finished trials) is skipped,
with a `<plot>.skipped.txt` saying why.

## In MLflow

One parent run per search (params: the space's settings, sampler, pruner with its
`grace_period`, `reduction_factor` and `min_delta`, seed, objectives), and one nested run per
trial with every setting as a param, metrics by step, and the evaluation JSON and CSVs. The
parent holds the best trial's metrics (`best.*` from the search, `best_full.*` from its
re-evaluation, with `best_full.meets_constraints` when the space has constraints), its model and
the plots, and the lr range test's `lr_range.*` params. A run's scores (`aggregate`, `mmlu`, ...)
are its full evaluation only; the quick estimates at each boundary are `estimate.aggregate` and
so on, so a pruned or stopped trial has estimates and no scores, and never sorts among finished
ones.""".splitlines(),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- all pages


def pages() -> dict[str, Callable[[], str]]:
    """Every generated page under docs/, by file name, with its generator."""
    from unlearn_search.cli import methods_markdown
    from unlearn_search.training.plan import memory_plan_page

    return {
        "space.md": space_markdown,
        "cli.md": cli_markdown,
        "outputs.md": outputs_markdown,
        "methods.md": methods_markdown,
        "memory_plan.md": memory_plan_page,
    }


def docs_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "docs"


def stale_pages(directory: Path | None = None) -> list[str]:
    """The generated pages in ``directory`` (default the checkout's docs/) that differ from the code."""
    directory = Path(directory or docs_dir())
    return [
        name
        for name, make in pages().items()
        if not (directory / name).is_file() or (directory / name).read_text() != make()
    ]


def write_pages(directory: Path | None = None) -> list[Path]:
    """Write every generated page into ``directory`` (default the checkout's docs/)."""
    directory = Path(directory or docs_dir())
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in pages().items():
        path = directory / name
        text = make()
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written
