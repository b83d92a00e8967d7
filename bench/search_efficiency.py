"""TPE with ASHA, TPE without pruning, and random search at equal trial budgets, over seeds.

    python bench/search_efficiency.py --space search_spaces/sugd.yaml --model small --trials 8 --seeds 0,1,2

Each (strategy, seed) is a real search (`run_search`, the same code as `run_search.py`) with the
space's sampler and pruner replaced, no time budget, and a cheap export of its best trial. From
each search's Optuna storage: the best objective so far against the compute spent (the sum of
trial durations, in trial-seconds, in order of completion). Prints and writes to the output
`results.json`, `results.md` (per strategy: final best aggregate, compute, and the compute needed
to reach 95 % of the best aggregate any run found) and `efficiency.png`. Finished searches are
kept and reused (delete a folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

STRATEGIES = {
    "tpe+asha": {"sampler": "tpe", "pruner": "asha"},
    "tpe": {"sampler": "tpe", "pruner": "none"},
    "random": {"sampler": "random", "pruner": "none"},
}
TARGET_FRACTION = 0.95


def curve(storage: str, study_name: str) -> list[tuple[float, float]]:
    """(cumulative trial-seconds, best aggregate so far) after each finished trial (the study's
    value, where a search recorded no aggregate: it may carry the objective's signal)."""
    import optuna

    from unlearn_search.search.driver import AGGREGATE_ATTR

    study = optuna.load_study(study_name=study_name, storage=storage)
    done = sorted((t for t in study.trials if t.datetime_complete), key=lambda t: t.datetime_complete)
    points, spent, best = [], 0.0, float("-inf")
    for trial in done:
        spent += (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.state == optuna.trial.TrialState.COMPLETE and trial.value is not None:
            best = max(best, trial.user_attrs.get(AGGREGATE_ATTR, trial.value))
        points.append((spent, best))
    return points


def compute_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    return next((spent for spent, best in points if best >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="search_spaces/sugd.yaml")
    parser.add_argument("--model", default="small")
    parser.add_argument("--data")
    parser.add_argument("--trials", type=int, default=8, help="trials per search (the equal budget)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--output", default="outputs/search_efficiency")
    args = parser.parse_args()

    from unlearn_search.search import SearchOptions, load_space, run_search
    from unlearn_search.search.driver import STATE_FILE

    output = Path(args.output).resolve()
    runs: dict[str, list[list[tuple[float, float]]]] = {}
    strategies = args.strategies.split(",")
    for strategy in strategies:
        if strategy not in STRATEGIES:
            raise SystemExit(f"--strategies {strategy}: unknown (expected some of {', '.join(STRATEGIES)})")
    # Seed-major, so that an interrupted run leaves whole seeds (rerun with fewer --seeds to report them).
    for seed in (int(s) for s in args.seeds.split(",")):
        for strategy in strategies:
            space = load_space(args.space, {"search": {**STRATEGIES[strategy], "time_budget_s": None}})
            directory = output / strategy / f"seed{seed}"
            if not (directory / "trials.json").exists():
                options = SearchOptions(
                    model=args.model,
                    data=args.data,
                    output=directory,
                    num_samples=args.trials,
                    max_concurrent=1,
                    seed=seed,
                    verbose=0,
                    final_split="train",
                    final_max_new_tokens=32,
                    final_mmlu_limit=1,
                )
                run_search(space, options)
            state = json.loads((directory / STATE_FILE).read_text())
            runs.setdefault(strategy, []).append(curve(state["storage"], state["study"]))

    best_known = max(best for points in runs.values() for run in points for _, best in run)
    target = TARGET_FRACTION * best_known
    rows = []
    for strategy, points in runs.items():
        finals = [run[-1][1] for run in points if run]
        spent = [run[-1][0] for run in points if run]
        reach = [compute_to_reach(run, target) for run in points]
        reached = [r for r in reach if r is not None]
        rows.append(
            {
                "strategy": strategy,
                "searches": len(points),
                "best_aggregate_mean": statistics.mean(finals),
                "best_aggregate_min": min(finals),
                "best_aggregate_max": max(finals),
                "trial_seconds_mean": statistics.mean(spent),
                "reached_95pct": f"{len(reached)}/{len(reach)}",
                "seconds_to_95pct_mean": statistics.mean(reached) if reached else None,
            }
        )
    (output / "results.json").write_text(
        json.dumps({"best_known": best_known, "target": target, "rows": rows, "curves": runs}, indent=2)
    )
    lines = [
        f"Best aggregate found by any search: {best_known:.4f}; 95 % of it: {target:.4f}.",
        "",
        "| strategy | searches | best aggregate (mean, min-max) | trial-seconds | reached 95 % "
        "| trial-seconds to 95 % (mean) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        to_target = "-" if r["seconds_to_95pct_mean"] is None else f"{r['seconds_to_95pct_mean']:.0f}"
        lines.append(
            f"| {r['strategy']} | {r['searches']} | {r['best_aggregate_mean']:.4f} "
            f"({r['best_aggregate_min']:.4f}-{r['best_aggregate_max']:.4f}) | {r['trial_seconds_mean']:.0f} | "
            f"{r['reached_95pct']} | {to_target} |"
        )
    (output / "results.md").write_text("\n".join(lines) + "\n")
    plot(runs, target, output / "efficiency.png")
    print("\n".join(lines))


def plot(runs: dict, target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unlearn_search.tracking.plots import save_figure

    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (strategy, points) in zip(("C0", "C1", "C2", "C3"), runs.items()):
        for i, run in enumerate(points):
            xs, ys = [0.0] + [p[0] for p in run], [None] + [p[1] if p[1] > float("-inf") else None for p in run]
            ax.step(xs, ys, where="post", color=color, alpha=0.8, label=strategy if i == 0 else None)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label="95 % of best known")
    ax.set_xlabel("compute (trial-seconds)")
    ax.set_ylabel("best aggregate so far")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
