"""Where a search trial's wall time goes: training steps against everything around them.

    python bench/trial_overhead.py [--space search_spaces/sugd.yaml] [--start 1] [--model small]
        [--set key=value ...] [--resources key=value ...]

Runs one trial exactly as the search runs it (the space's settings, resources and evaluation,
one of its start points, the MMLU threshold from the original model), through Ray Train, and
prints the seconds and the share of the trial's wall time spent on: Ray Train and worker
start-up, building the models and DeepSpeed engines, the training steps, each quick evaluation,
the boundaries' checkpoints, the export of the trained parameters, Ray Train's shutdown, and the
full evaluation; then how many such trials fit in the space's time budget.

Target (issue 24): everything but the training steps at most 25 % of the wall time, and at
least 12 trials in the default job's budget. The shares depend on the start point (its number
of boundaries and steps) and the model; the seconds vary by up to 2x between 2-core machines.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="search_spaces/sugd.yaml")
    parser.add_argument("--start", type=int, default=1, help="which of the space's start points (1 = the first)")
    parser.add_argument("--model", default="small", help="a reference target preset or a checkpoint path")
    parser.add_argument("--data", default=None)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one of the trial's settings (repeatable)",
    )
    parser.add_argument(
        "--resources",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one of the space's resources, e.g. eval_gather=false (repeatable)",
    )
    args = parser.parse_args()

    import dataclasses

    from unlearn_search.data import resolve_data
    from unlearn_search.models import resolve_model
    from unlearn_search.search.driver import _trial_evaluation, mmlu_threshold
    from unlearn_search.search.space import load_space
    from unlearn_search.training.cluster import init_ray
    from unlearn_search.training.config import parse_assignments
    from unlearn_search.training.trial import run_trial, time_spent

    space = load_space(args.space, {"resources": parse_assignments(args.resources, "--resources")})
    if not 1 <= args.start <= len(space.starts):
        raise SystemExit(f"--start {args.start}: expected 1 to {len(space.starts)} (the space's start points)")
    paths = resolve_data(args.data)
    model_dir = resolve_model(args.model, paths)
    settings = {**space.settings, **space.starts[args.start - 1], **parse_assignments(args.set)}
    init_ray(num_cpus=int(space.resources.workers * space.resources.cpus_per_worker))
    with tempfile.TemporaryDirectory() as scratch:
        threshold = mmlu_threshold(model_dir, paths.root, space, Path(scratch), space.evaluation.mmlu_limit)
        started = time.time()
        result = run_trial(
            model_dir,
            paths.root,
            settings,
            Path(scratch) / "trial",
            space.resources,
            _trial_evaluation(space, threshold),
            export=False,  # as a search's trial: only the best one is exported
        )
        wall = time.time() - started
    spent = time_spent(result)
    boundaries = [r for r in result.metrics_history if "boundary" in r]
    steps = boundaries[-1]["step"] if boundaries else 0
    print(
        f"\n{space.name} start {args.start} on {args.model}: {steps} steps per worker, {len(boundaries)} boundaries, "
        f"{dataclasses.asdict(space.resources)['workers']} workers; wall {wall:.0f} s"
    )
    for name, seconds in spent.items():
        print(f"  {name:44s} {seconds:7.1f} s  {100 * seconds / result.seconds:5.1f} %")
    print("  each quick evaluation: " + ", ".join(f"{r.get('eval_seconds', 0):.1f} s" for r in boundaries))
    if steps:
        print(f"  mean step: {spent['training steps'] / steps:.2f} s")
    around = 1 - spent["training steps"] / result.seconds
    print(f"everything but the training steps: {100 * around:.1f} % of the wall time (target <= 25 %)")
    budget = space.search.time_budget_s
    if budget:
        print(
            f"trials like this one in the space's {budget / 60:.0f}-minute budget: {budget / result.seconds:.1f} "
            f"(target >= 12)"
        )
    print(
        f"aggregate of the trial: {result.evaluation.get('aggregate-score', float('nan')):.3f}"
        if result.evaluation
        else ""
    )


if __name__ == "__main__":
    main()
