"""The default job over several sampler seeds: what each search found, and whether by its own sampling.

    python run_search.py --space search_spaces/sugd.yaml --seed S --output outputs/sugd_seedS   # S = 0, 1, 2
    python bench/default_job_seeds.py outputs/sugd_seed0 outputs/sugd_seed1 outputs/sugd_seed2 \
        --plot docs/img/default_job_seeds.png

Reads each search's output (its Optuna study, ``trials.json`` and the best trial's full
re-evaluation in ``best/``) and prints one row per search: trials finished and cut, the best
trial and whether the space's start point or the sampler proposed it, its aggregate in the
search's evaluation and in the full re-evaluation, and how many sampled trials reached 0.30 in
the search's evaluation. The plot draws each search's best aggregate so far against its trials,
in the order they started.

Target (issue 24): in at least 2 of 3 seeds, a configuration the sampler proposed re-evaluates
at 0.30 or more.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TARGET = 0.30  # the full re-evaluation's aggregate a search must reach by its own sampling


def study_of(output: Path):
    """The Optuna study of the search in ``output``: the one it kept there, wherever it was moved."""
    import optuna

    state = json.loads((output / "search.json").read_text())
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    local = output / "optuna.db"
    storage = f"sqlite:///{local.resolve()}" if local.is_file() else state["storage"]
    return optuna.load_study(study_name=state["study"], storage=storage)


def search_trials(output: Path) -> list[dict]:
    """The search's finished trials in the order they started: Tune id, aggregate, whether it was a start."""
    import optuna

    study = study_of(output)
    return [
        {
            "trial_id": t.user_attrs.get("tune_trial_id"),
            "aggregate": t.user_attrs["aggregate"],
            "start": "fixed_params" in t.system_attrs,  # enqueued from the space's starts
        }
        for t in sorted(study.trials, key=lambda t: t.number)
        if t.state == optuna.trial.TrialState.COMPLETE and "aggregate" in t.user_attrs
    ]


def summary(output: Path) -> dict:
    rows = json.loads((output / "trials.json").read_text())
    trials = search_trials(output)
    best_id = json.loads((output / "best" / "trial.json").read_text())["trial_id"]
    final = json.loads((output / "best" / "evaluation_results.json").read_text())
    best = next(t for t in trials if t["trial_id"] == best_id)
    return {
        "search": output.name,
        "finished": sum(r["status"] == "completed" for r in rows),
        "cut": sum(r["status"] == "stopped" for r in rows),
        "best": best_id,
        "found by": "start point" if best["start"] else "sampler",
        "search aggregate": best["aggregate"],
        "full re-evaluation": final["aggregate-score"],
        "sampled >= 0.30": sum(not t["start"] and t["aggregate"] >= TARGET for t in trials),
        "sampled": sum(not t["start"] for t in trials),
        "trials": trials,
    }


def plot(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for s in summaries:
        values = [t["aggregate"] for t in s["trials"]]
        best = [max(values[: i + 1]) for i in range(len(values))]
        line = ax.step(range(1, len(best) + 1), best, where="post", label=f"{s['search']}: best so far")[0]
        ax.scatter(range(1, len(values) + 1), values, s=14, color=line.get_color(), alpha=0.6)
    ax.axhline(TARGET, color="grey", linestyle=":", linewidth=1, label=f"{TARGET:.2f}")
    ax.set_xlabel("trial, in the order started (1: the space's start point)")
    ax.set_ylabel("aggregate (the search's evaluation)")
    ax.set_title("The default job, one search per sampler seed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", type=Path, help="the searches' output folders")
    parser.add_argument("--plot", type=Path, default=None, help="where to write the plot (PNG)")
    args = parser.parse_args()
    for output in args.outputs:
        if not (output / "best" / "evaluation_results.json").is_file():
            raise SystemExit(f"{output}: expected a finished search's output (best/evaluation_results.json)")
    summaries = [summary(output) for output in args.outputs]
    columns = ["search", "finished", "cut", "best", "found by", "search aggregate", "full re-evaluation"]
    print("| " + " | ".join([*columns, "sampled trials >= 0.30"]) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for s in summaries:
        cells = [f"{s[c]:.3f}" if isinstance(s[c], float) else str(s[c]) for c in columns]
        print("| " + " | ".join([*cells, f"{s['sampled >= 0.30']} of {s['sampled']}"]) + " |")
    met = sum(s["found by"] == "sampler" and s["full re-evaluation"] >= TARGET for s in summaries)
    print(f"\nsearches whose sampled best re-evaluates at >= {TARGET:.2f}: {met} of {len(summaries)}")
    if args.plot:
        plot(summaries, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
