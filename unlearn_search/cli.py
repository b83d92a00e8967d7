"""The ``unlearn-search`` command line: one subcommand per stage of the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.quiet import silence_known_warnings


def _add_data(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        help="data root (semeval25/, mmlu/, refusals/) or a benchmark folder; "
        "default: $UNLEARN_SEARCH_DATA, ../shared/data, then the user cache",
    )


def _add_model(parser: argparse.ArgumentParser, **kwargs) -> None:
    parser.add_argument("--model", help="a local Hugging Face directory, or tiny / small", **kwargs)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="join a Ray cluster (auto or ray://host:port); default: start a local one")


def _add_num_cpus(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance (default: all)")


# The EvalConfig fields `evaluate` and `trial` take as options, from their declarations.
EVAL_OPTIONS = ("split", "max_new_tokens", "batch_size", "mmlu_shots", "mmlu_limit", "mmlu_threshold", "original_mmlu")
EVAL_OPTIONS += ("dtype",)


def _add_eval(parser: argparse.ArgumentParser) -> None:
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.methods.base import declared

    _add_declared(parser, declared(EvalConfig), EVAL_OPTIONS)


def _eval_config(args, **overrides):
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.methods.base import declared

    values = _declared_values(args, declared(EvalConfig), EVAL_OPTIONS)
    return EvalConfig(**{**values, "progress": True, **overrides})


def _headline(results: dict) -> str:
    keys = ["harmonic-mean-task-aggregate", "mia_loss_acc", "mia_final_score", "mmlu_average", "aggregate-score"]
    forget, retain = results["forget-set"], results["retain-set"]
    lines = [
        f"  {name}: regurgitation {scores['overall-regurgitation-score']:.3f}  "
        f"knowledge {scores['overall-knowledge-score']:.3f}"
        for name, scores in (("forget", forget), ("retain", retain))
    ]
    lines += [f"  {k}: {results[k]:.4f}" for k in keys]
    attacks = results.get("mia_attacks", {})
    if attacks:
        aucs = {"loss": results["mia_loss_acc"], **{name: a["auc"] for name, a in attacks.items()}}
        lines.append("  MIA AUC by attack: " + "  ".join(f"{name} {auc:.4f}" for name, auc in aucs.items()))
    if results.get("passes_utility_threshold") is not None:
        lines.append(f"  passes MMLU threshold {results['mmlu_threshold']:.3f}: {results['passes_utility_threshold']}")
    return "\n".join(lines)


def cmd_target_build(args) -> None:
    from unlearn_search.data import resolve_data
    from unlearn_search.data.locate import cache_lock
    from unlearn_search.evaluation import EvalConfig, evaluate
    from unlearn_search.models import (
        TARGET_EVALUATION,
        build_target,
        get_preset,
        load_model,
        load_tokenizer,
        read_target_manifest,
    )

    paths = resolve_data(args.data)
    preset = get_preset(args.preset)
    started = time.time()
    directory = build_target(paths, preset, Path(args.output) if args.output else None, force=args.force)
    report = directory / TARGET_EVALUATION
    with cache_lock(report, f"the {preset.name} target's report"):
        if not report.exists():
            model, tokenizer = load_model(directory), load_tokenizer(directory)
            config = EvalConfig(split="all", mmlu_limit=args.mmlu_limit, progress=True)
            results = evaluate(model, tokenizer, paths, config, read_target_manifest(directory))
            partial = report.with_suffix(".partial")
            partial.write_text(json.dumps(results, indent=2))
            partial.replace(report)  # whole or not at all: a search reads it for the original's MMLU
    results = json.loads(report.read_text())
    manifest = read_target_manifest(directory)
    print(f"target ({preset.name}): {directory}")
    print(
        f"  parameters: {manifest['parameters']:,}  build time: {manifest['build_seconds']:.0f} s "
        f"(this call {time.time() - started:.0f} s)"
    )
    print("memorization on the items it was trained on:")
    print(_headline(results))


def scored_items(data, config, from_manifest: bool, all_items: bool) -> str:
    """What an evaluation scores, said before it starts: a memorized target's own items, or all."""
    from unlearn_search.models.loading import TARGET_MANIFEST

    counts = (
        f"{len(data.benchmark.forget)} forget and {len(data.benchmark.retain)} retain items "
        f"(split {config.split}), {len(data.members)} MIA members and {len(data.nonmembers)} non-members"
    )
    if from_manifest:
        return f"scoring {counts}: those the target memorized ({TARGET_MANIFEST} beside the model)"
    why = "--all-items" if all_items else f"no {TARGET_MANIFEST} beside the model"
    return f"scoring {counts}: every item and document ({why})"


def cmd_evaluate(args) -> None:
    import dataclasses

    from unlearn_search.data import resolve_data
    from unlearn_search.evaluation import evaluate, load_eval_data
    from unlearn_search.evaluation.baseline import reported_mmlu
    from unlearn_search.models import load_model, load_tokenizer, read_target_manifest, resolve_model

    config = _eval_config(args)  # bad options fail before anything loads
    paths = resolve_data(args.data)
    directory = resolve_model(args.model, paths)
    manifest = None if args.all_items else read_target_manifest(directory)
    if config.original_mmlu is None:  # a target scored against its own report, when that scored the same questions
        reported = reported_mmlu(directory, paths.root, config.mmlu_shots, config.mmlu_limit)
        config = dataclasses.replace(config, original_mmlu=reported)
    from unlearn_search.models.loading import default_device

    model = load_model(directory, config.dtype, trust_remote_code=args.trust_remote_code, device=default_device())
    tokenizer = load_tokenizer(directory, trust_remote_code=args.trust_remote_code)
    started = time.time()
    print(scored_items(load_eval_data(paths, config, manifest), config, manifest is not None, args.all_items))
    reference = None
    if args.reference is not None:
        from unlearn_search.evaluation.reference import original_nll

        reference = original_nll(resolve_model(args.reference, paths), paths, config)
    results = evaluate(model, tokenizer, paths, config, manifest, args.output, reference_nll=reference)
    print(f"evaluated {directory} in {time.time() - started:.1f} s -> {Path(args.output) / 'evaluation_results.json'}")
    print(_headline(results))


def cmd_data_fetch(args) -> None:
    from unlearn_search.data import fetch

    destination = fetch(args.url, Path(args.output) if args.output else None, args.validation_fraction, args.seed)
    print(f"unlearning data written to {destination}")


def methods_markdown() -> str:
    """The methods table of docs/methods.md, generated from the registries so it cannot go stale."""
    from unlearn_search.methods import METHODS, SCHEDULES
    from unlearn_search.training.config import FIELD_HELP, TRIAL_FIELDS, setting_values

    def knobs(cls) -> str:
        return (
            "<br>".join(
                f"`{k.name}={k.default!r}`"
                + (f" ({' / '.join(map(str, k.choices))})" if k.choices else "")
                + (f" ({k.valid_range()})" if k.valid_range() else "")
                + (f": {k.help}" if getattr(k, "help", "") else "")
                for k in cls.knobs
            )
            or "-"
        )

    lines = [
        "# Methods",
        "",
        "Generated by `unlearn-search methods --markdown` from the registries in",
        "`unlearn_search/methods` (a test keeps this file equal to that output).",
        "",
        "## Losses (`method`)",
        "",
        "| method | what it optimizes | knobs (defaults) | uses | source |",
        "|---|---|---|---|---|",
    ]
    for name, cls in METHODS.items():
        needs = [
            n
            for n, flag in (
                ("retain", cls.needs_retain),
                ("teacher", cls.needs_reference),
                (f"{cls.alternative} answers", cls.alternative),
            )
            if flag
        ]
        lines.append(
            f"| `{name}` | {cls.summary.replace('|', chr(92) + '|')} | {knobs(cls)} | "
            f"{', '.join(needs) or 'forget only'} | {cls.reference_paper} |"
        )
    lines += [
        "",
        "## Schedules (`schedule`)",
        "",
        "| schedule | what it does | knobs (defaults) | source |",
        "|---|---|---|---|",
    ]
    for name, cls in SCHEDULES.items():
        lines.append(f"| `{name}` | {cls.summary} | {knobs(cls)} | {getattr(cls, 'reference_paper', '') or '-'} |")
    lines += [
        "",
        "## Trial settings",
        "",
        "Shared by every method; the same names in `--set`, search spaces and MLflow params.",
        "",
        "| setting | default | valid values | what it sets |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{n}` | `{f.default!r}` | {setting_values(n) or '-'} | {FIELD_HELP[n]} |" for n, f in TRIAL_FIELDS.items()
    ]
    return "\n".join(lines) + "\n"


def cmd_methods(args) -> None:
    from unlearn_search.methods import METHODS, SCHEDULES
    from unlearn_search.training.config import TRIAL_FIELDS

    if args.markdown:
        print(methods_markdown(), end="")
        return

    def knobs(cls) -> str:
        return (
            ", ".join(
                f"{k.name}={k.default!r}" + (f" ({'|'.join(map(str, k.choices))})" if k.choices else "")
                for k in cls.knobs
            )
            or "-"
        )

    print("losses (method):")
    for name, cls in METHODS.items():
        needs = [
            n
            for n, flag in (
                ("retain", cls.needs_retain),
                ("teacher", cls.needs_reference),
                (f"{cls.alternative} answers", cls.alternative),
            )
            if flag
        ]
        print(f"  {name:13s} {cls.summary}")
        print(f"  {'':13s} knobs: {knobs(cls)}; uses: {', '.join(needs) or 'forget only'}")
        print(f"  {'':13s} from: {cls.reference_paper}")
    print("schedules (schedule):")
    for name, cls in SCHEDULES.items():
        print(f"  {name:13s} {cls.summary}")
        print(f"  {'':13s} knobs: {knobs(cls)}")
    print("trial settings:")
    print("  " + ", ".join(f"{n}={f.default!r}" for n, f in TRIAL_FIELDS.items()))


def cmd_docs(args) -> None:
    from unlearn_search import docs

    directory = Path(args.dir) if args.dir else docs.docs_dir()
    if args.write:
        written = docs.write_pages(directory)
        print("\n".join(f"wrote {path}" for path in written) or f"{directory}: every generated page is up to date")
        return
    stale = docs.stale_pages(directory)
    if stale:
        raise UnlearnSearchError(
            f"{directory}: {', '.join(stale)} differ from the code (expected them equal: run {docs.REGENERATE})"
        )
    print(f"{directory}: every generated page is up to date ({', '.join(docs.pages())})")


def cmd_trial(args) -> None:
    from unlearn_search.data import resolve_data
    from unlearn_search.models import resolve_model
    from unlearn_search.training.cluster import init_ray
    from unlearn_search.training.config import parse_assignments, trial_config
    from unlearn_search.training.trial import run_trial

    resources = _resources_from(args, TRIAL_RESOURCES)  # bad options fail before anything starts
    evaluation = _eval_config(args)
    paths = resolve_data(args.data)
    settings = {"method": args.method, **parse_assignments(args.set or [])}
    config = trial_config(settings)
    directory = resolve_model(args.model, paths)
    init_ray(args.address)
    result = run_trial(directory, paths.root, settings, args.output, resources, evaluation, resume=args.resume)
    print(
        f"trial {config.method}/{config.schedule} on {directory}: {result.seconds:.0f} s, "
        f"{len(result.metrics_history)} reports -> {result.model}"
    )
    if result.kept_step is not None:
        print(f"keep_best: the model holds the weights after step {result.kept_step}, its best boundary")
    print(_headline(result.evaluation))


def _search_settings(space, options, args) -> dict:
    """The search's MLflow params: the space's settings and how it is searched."""
    settings = {
        **space.settings,
        "space": space.name,
        "sampler": space.search.sampler,
        "pruner": space.search.pruner,
        "num_samples": options.num_samples or space.search.num_samples,
        "model": args.model,
        "search_seed": args.seed,  # "seed" is a trial setting
        "objectives": ",".join(
            f"{o.metric}:{o.mode}" + (f"+{o.signal_weight}*{o.signal}" if o.signal else "") for o in space.objectives
        ),
    }
    if space.search.pruner != "none":  # what decided which trials were pruned, under the space's key names
        settings.update({key: getattr(space.search, key) for key in ("grace_period", "reduction_factor", "min_delta")})
    return settings


def _print_outcome(outcome, space, report: Path) -> None:
    """The end of a search: the trials table, where everything is, and the best trial's scores."""
    print(outcome.table)
    print(f"search {space.name}: {len(outcome.rows)} trials in {outcome.seconds:.0f} s -> {outcome.output}")
    print(f"report: {report}")
    if outcome.best is None:
        bounds = " and ".join(["the MMLU threshold", *map(str, space.constraints)])
        print(f"no finished trial met {bounds}: no best trial")
        return
    print(
        f"best trial {outcome.best['trial_id']}: aggregate {outcome.best['aggregate']:.4f} (search evaluation); "
        f"exported to {outcome.best_dir}"
    )
    print("full evaluation of the best trial:")
    print(_headline(outcome.best_evaluation))
    final = outcome.best_final
    for constraint in space.constraints:
        print(f"  meets {constraint}: {constraint.met(final)}")


def _search_options(args):
    from unlearn_search.methods.base import declared
    from unlearn_search.search import SearchOptions
    from unlearn_search.search.space import SearchSettings

    return SearchOptions(
        model=args.model,
        data=args.data,
        output=Path(args.output) if args.output else None,
        address=args.address,
        **_declared_values(args, declared(SearchSettings), SEARCH_OVERRIDES, SEARCH_OPTIONS, from_space=True),
        seed=args.seed,
        storage=args.storage,
        resume=args.resume,
        dashboard_host=args.dashboard_host,
        dashboard_port=args.dashboard_port,
        num_cpus=args.num_cpus,
        final_mmlu_limit=args.final_mmlu_limit,
        final_split=args.final_split,
        final_max_new_tokens=args.final_max_new_tokens,
        verbose=args.verbose,
    )


def cmd_search(args) -> None:
    import dataclasses

    from unlearn_search.search import load_space, run_search
    from unlearn_search.search.driver import prepare_output
    from unlearn_search.tracking import (
        MLflowTracker,
        check_reachable,
        default_tracking_uri,
        resumed_tracking,
        study_plots,
    )
    from unlearn_search.tracking.report import PER_TASK_PLOT, write_report
    from unlearn_search.training.config import parse_assignments

    overrides = {"resources": parse_assignments(args.resources, "--resources")} if args.resources else None
    space = load_space(args.space, overrides)
    options = _search_options(args)
    output = prepare_output(space, options)  # refuses to overwrite an earlier search before anything starts
    tracking_uri, experiment = args.tracking_uri, args.experiment
    if options.resume:
        tracking_uri, experiment = resumed_tracking(output, tracking_uri, experiment)
    tracking_uri = tracking_uri or default_tracking_uri(output)
    check_reachable(tracking_uri)
    settings = _search_settings(space, options, args)
    tracker = MLflowTracker(
        tracking_uri, experiment or f"unlearn-search/{space.name}", output, f"search-{space.name}", settings
    )

    def on_start(url):
        print(f"Ray dashboard: {url}" if url else "Ray dashboard: not available", flush=True)
        print(f"MLflow tracking: {tracking_uri}", flush=True)

    outcome = run_search(space, dataclasses.replace(options, output=output), [tracker], on_start)
    names = [o.metric for o in space.objectives] if space.multi_objective else [space.objectives[0].metric]
    plots = study_plots(outcome.storage, outcome.study_name, output / "plots", names)
    report = write_report(
        output,
        title=f"Search {space.name} on {Path(args.model).name}",
        rows=outcome.rows,
        params=[p.name for p in space.params],
        best=outcome.best,
        best_evaluation=outcome.best_evaluation,
        references=outcome.references,
        plots=plots,
    )
    chart = output / "plots" / f"{PER_TASK_PLOT}.png"  # written with the report when there is a best trial
    tracker.log_outcome(outcome, plots + [chart] * chart.exists(), report)
    _print_outcome(outcome, space, report)


def cmd_lr_range(args) -> None:
    import json

    from unlearn_search.data import resolve_data
    from unlearn_search.models import resolve_model
    from unlearn_search.search import load_space
    from unlearn_search.search.driver import fitted_space
    from unlearn_search.search.lr_range import RANGE_FILE
    from unlearn_search.training.cluster import init_ray

    space = load_space(args.space)
    if space.lr_range_test is None:
        raise UnlearnSearchError(f"--space {args.space}: has no lr_range_test block (expected one to run)")
    paths = resolve_data(args.data)
    model_dir = resolve_model(args.model, paths)
    output = Path(args.output or Path("outputs") / f"{space.name}-lr-range").resolve()
    output.mkdir(parents=True, exist_ok=True)
    init_ray(args.address, num_cpus=args.num_cpus)
    fitted_space(space, model_dir, paths.root, output)
    record = json.loads((output / RANGE_FILE).read_text())
    print(f"{'step':>5}  {'lr':>9}  {'forget NLL':>10}  {'retain NLL':>10}")
    for probe in record["probes"]:
        print(f"{probe['step']:5d}  {probe['lr']:9.3g}  {probe['forget_nll']:10.4f}  {probe['retain_nll']:10.4f}")
    print(f"-> {output / RANGE_FILE}, {output / 'plots' / 'lr_range.png'} ({record['seconds']:.0f} s)")


def cmd_plan(args) -> None:
    from unlearn_search.training.plan import (
        count_parameters,
        memory_plan_page,
        model_config,
        plan_trial,
        report,
        smallest_fit,
    )

    if args.docs:
        print(memory_plan_page(), end="")
        return
    trainable = args.trainable or ("lora" if args.lora_rank else "full")
    config = model_config(None if args.model else args.model_size, args.model)
    name = f"OLMo {args.model_size}" if not args.model else Path(args.model).name
    counts = count_parameters(config, name, trainable, lora_rank=args.lora_rank or 16, last_k=args.last_k)
    plan = plan_trial(
        counts,
        args.gpus_per_trial,
        args.gpu_mem,
        trainable,
        args.teacher,
        args.micro_batch,
        args.seq_len,
        args.gpus_per_node,
        args.cluster_gpus,
        args.device,
        eval_gather=args.eval_gather,
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    smallest = smallest_fit(
        counts,
        args.gpu_mem,
        trainable,
        args.teacher,
        args.micro_batch,
        args.seq_len,
        args.gpus_per_node,
        limit=max(64, args.gpus_per_trial),
        eval_gather=args.eval_gather,
    )
    print(report(plan, smallest))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


# The Resources fields `unlearn-search trial` takes as options (`--zero-stage` for zero_stage), each
# with its declaration's default, type, choices and help; a space's `resources` block takes them all.
TRIAL_RESOURCES = ("workers", "cpus_per_worker", "gpus_per_worker", "zero_stage", "offload", "placement")
TRIAL_RESOURCES += ("eval_every", "eval_items", "eval_documents", "eval_mmlu_limit", "eval_max_new_tokens")


def _option(name: str, options: dict[str, str] | None = None) -> str:
    return (options or {}).get(name) or "--" + name.replace("_", "-")


def _add_declared(
    parser: argparse.ArgumentParser,
    knobs: dict,
    names: tuple[str, ...],
    options: dict[str, str] | None = None,
    from_space: bool = False,
) -> None:
    """Each of ``names`` as an option (``--zero-stage`` for zero_stage, unless ``options`` names
    it) with its declaration's (a ``Knob``'s) type, choices, default and help. ``from_space``:
    the default is the space's value (None here)."""
    import dataclasses

    for name in names:
        knob, option = knobs[name], _option(name, options)
        words = dataclasses.replace(knob, nullable=False).valid_range()  # no null on a command line
        help_text = knob.help.replace(f" (`{option}`)", "") + (f"; {words}" if words else "")
        help_text += "; default: the space's" if from_space else ""
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        default = None if from_space else knob.default
        if knob.value_type is bool:
            parser.add_argument(option, dest=name, action="store_true", default=default, help=help_text)
        else:
            parser.add_argument(
                option,
                dest=name,
                type=knob.value_type,
                default=default,
                choices=list(knob.choices) if knob.choices else None,
                help=help_text,
            )


def _declared_values(
    args, knobs: dict, names: tuple[str, ...], options: dict[str, str] | None = None, from_space: bool = False
) -> dict:
    """The options ``_add_declared`` added, each checked against its declaration (``from_space``:
    one not given is None, the space's value)."""
    values = {name: getattr(args, name) for name in names}
    for name, value in values.items():
        expected = None if value is None and from_space else knobs[name].problem(value)
        if expected:
            raise UnlearnSearchError(f"{_option(name, options)} {value!r}: expected {expected}")
    return values


def _resources_from(args, names: tuple[str, ...]):
    """``Resources`` from the options ``_add_declared`` added, each checked against its declaration."""
    from unlearn_search.methods.base import declared
    from unlearn_search.training.trial import Resources

    return Resources(**_declared_values(args, declared(Resources), names))


# The SearchSettings a search command overrides, from their declarations (`--time-budget` for
# time_budget_s: seconds, as the option has always read).
SEARCH_OVERRIDES = ("num_samples", "max_concurrent", "time_budget_s")
SEARCH_OPTIONS = {"time_budget_s": "--time-budget"}


def build_parser() -> argparse.ArgumentParser:
    from unlearn_search.data.locate import LUME_URL
    from unlearn_search.evaluation.evaluate import EVAL_SPLITS
    from unlearn_search.methods.base import declared
    from unlearn_search.models.trainable import TRAINABLE
    from unlearn_search.search.space import SearchSettings
    from unlearn_search.training.trial import Resources

    parser = argparse.ArgumentParser(prog="unlearn-search", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    target = commands.add_parser("target", help="the reference target model").add_subparsers(
        dest="action", required=True
    )
    build = target.add_parser("build", help="build (or reuse) the memorized reference target")
    build.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small"],
        help="the reference target: `tiny` (the tests') or `small` (the default job's)",
    )
    build.add_argument("--output", help="checkpoint directory (default: the user cache, keyed by data and settings)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--mmlu-limit", type=int, default=None, help="MMLU questions per subject in the report")
    _add_data(build)
    build.set_defaults(func=cmd_target_build)

    evaluate = commands.add_parser("evaluate", help="score a model exactly as SemEval-2025 Task 4 does")
    _add_model(evaluate, required=True)
    evaluate.add_argument("--output", required=True, help="where evaluation_results.json and the CSVs go")
    evaluate.add_argument(
        "--all-items", action="store_true", help="for a reference target, score every item, not only those it memorized"
    )
    evaluate.add_argument(
        "--trust-remote-code", action="store_true", help="let transformers run the checkpoint's own modeling code"
    )
    evaluate.add_argument(
        "--reference",
        default=None,
        help="the model before unlearning (path or preset), for the reference MIA attack (without it: NaN)",
    )
    _add_eval(evaluate)
    _add_data(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)

    trial = commands.add_parser("trial", help="one unlearning trial on Ray Train + DeepSpeed, then the full evaluation")
    _add_model(trial, default="small")
    trial.add_argument("--method", required=True, help="a loss from 'unlearn-search methods'")
    trial.add_argument("--set", action="append", metavar="KEY=VALUE", help="a trial setting (repeatable)")
    _add_declared(trial, declared(Resources), TRIAL_RESOURCES)
    _add_address(trial)
    trial.add_argument("--resume", action="store_true", help="continue the run found in OUTPUT")
    trial.add_argument(
        "--output",
        required=True,
        help="the trial's folder: its model, metrics log and evaluation files ([outputs.md](outputs.md))",
    )
    _add_eval(trial)
    trial.set_defaults(split="train")
    _add_data(trial)
    trial.set_defaults(func=cmd_trial)

    search = commands.add_parser("search", help="search a YAML space with Ray Tune + Optuna; MLflow tracking")
    search.add_argument("--space", required=True, help="a YAML search space, e.g. search_spaces/sugd.yaml")
    _add_model(search, default="small")
    search.add_argument("--output", help="search directory (default: outputs/<space name>)")
    _add_address(search)
    _add_declared(search, declared(SearchSettings), SEARCH_OVERRIDES, SEARCH_OPTIONS, from_space=True)
    search.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: SQLite under the output; with --resume, the first run's)"
    )
    search.add_argument(
        "--experiment", help="MLflow experiment (default: unlearn-search/<space name>; with --resume, the first run's)"
    )
    search.add_argument(
        "--storage", help="Optuna storage URL (default: SQLite under the output; with --resume, the first run's)"
    )
    search.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    search.add_argument("--resume", action="store_true", help="continue the interrupted search in OUTPUT")
    search.add_argument(
        "--resources",
        action="append",
        metavar="KEY=VALUE",
        help="override the space's resources (repeatable), e.g. workers=8 gpus_per_worker=1",
    )
    _add_num_cpus(search)
    search.add_argument("--dashboard-host", default="127.0.0.1", help="where the Ray dashboard listens")
    search.add_argument("--dashboard-port", type=int, help="its port (default: Ray's)")
    search.add_argument(
        "--final-mmlu-limit",
        type=_positive_int,
        default=None,
        help="MMLU questions per subject in the best trial's re-evaluation (default: all)",
    )
    search.add_argument(
        "--final-split",
        choices=EVAL_SPLITS,
        default="all",
        help="items of the best trial's re-evaluation (default: all)",
    )
    search.add_argument(
        "--final-max-new-tokens",
        type=_positive_int,
        default=256,
        help="tokens generated per item in the best trial's re-evaluation (default: 256, the official)",
    )
    search.add_argument(
        "--verbose",
        type=int,
        default=1,
        choices=[0, 1, 2],
        help="the search's output: 0 silent (also hides the best trial's re-evaluation progress), 1 one line "
        "per trial start, estimate and end, 2 also Ray Tune's status tables and each result",
    )
    _add_data(search)
    search.set_defaults(func=cmd_search)

    lr_range = commands.add_parser(
        "lr-range", help="run a space's lr range test alone: the curve and the lr range a search would sample"
    )
    lr_range.add_argument("--space", required=True, help="a YAML search space with an lr_range_test block")
    _add_model(lr_range, default="small")
    lr_range.add_argument("--output", help="where lr_range.json and its plot go (default: outputs/<space>-lr-range)")
    _add_address(lr_range)
    _add_num_cpus(lr_range)
    _add_data(lr_range)
    lr_range.set_defaults(func=cmd_lr_range)

    plan = commands.add_parser(
        "plan", help="GPU memory of one trial per ZeRO stage (DeepSpeed's estimators); does it fit"
    )
    plan.add_argument("--model-size", default="7B", help="an OLMo preset: 1B or 7B (default 7B)")
    plan.add_argument("--model", help="a local Hugging Face directory instead (only its config.json is read)")
    plan.add_argument("--gpus-per-trial", type=int, default=8, help="GPUs (ZeRO ranks) of one trial")
    plan.add_argument("--gpus-per-node", type=int, help="default: min(8, gpus per trial)")
    plan.add_argument("--gpu-mem", type=float, default=80, help="GiB per GPU (default 80)")
    plan.add_argument(
        "--trainable",
        choices=[t for t in TRAINABLE if t != "method"],
        help="default: full, or lora with --lora-rank (a method's own modules, RMU's: at most last_k's)",
    )
    plan.add_argument(
        "--lora-rank", type=int, help="LoRA rank; given, the default `--trainable` is lora (rank 16 when not given)"
    )
    plan.add_argument("--last-k", type=int, default=8, help="decoder layers trained with `--trainable last_k`")
    plan.add_argument(
        "--teacher",
        default="live",
        choices=["live", "cached", "none"],
        help="the frozen teacher: `live` (a ZeRO-3 copy on the GPUs), `cached` (its outputs, read from "
        "the cache) or `none`",
    )
    plan.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    plan.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    plan.add_argument("--cluster-gpus", type=int, help="GPUs in the cluster: how many trials run at once")
    plan.add_argument(
        "--device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="cpu: plan CPU workers (--gpus-per-trial workers, --gpu-mem GiB of host memory each, fp32)",
    )
    plan.add_argument(
        "--no-eval-gather",
        dest="eval_gather",
        action="store_false",
        help="plan a trial with `resources.eval_gather: false`: under ZeRO-3 evaluation runs on the "
        "engine's shards and nothing is gathered (slower generation, no whole copy per GPU)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--docs", action="store_true", help="print docs/memory_plan.md (the 7B figures)")
    plan.set_defaults(func=cmd_plan)

    methods = commands.add_parser("methods", help="list every loss and schedule with its knobs and defaults")
    methods.add_argument("--markdown", action="store_true", help="print the docs/methods.md table")
    methods.set_defaults(func=cmd_methods)

    docs = commands.add_parser(
        "docs", help="check or regenerate the reference pages in docs/ that are generated from the code"
    )
    docs.add_argument("--write", action="store_true", help="write the pages that differ from the code")
    docs.add_argument("--dir", help="the docs folder (default: the checkout's docs/)")
    docs.set_defaults(func=cmd_docs)

    data = commands.add_parser("data", help="the unlearning data").add_subparsers(dest="action", required=True)
    fetch = data.add_parser("fetch", help="download the public LUME release into the user cache")
    fetch.add_argument("--url", default=LUME_URL, help="folder URL holding forget.jsonl and retain.jsonl")
    fetch.add_argument("--output", help="data root to write (default: the user cache)")
    fetch.add_argument(
        "--validation-fraction", type=float, default=0.2, help="share of the items held out as the validation split"
    )
    fetch.add_argument("--seed", type=int, default=0, help="the seed of that split")
    fetch.set_defaults(func=cmd_data_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    silence_known_warnings()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UnlearnSearchError as error:
        print(f"unlearn-search: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
