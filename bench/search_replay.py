"""TPE against random search, replayed on a surrogate of real trials (no trial is run).

    python bench/search_replay.py outputs/sugd_seed0 outputs/sugd_seed1 outputs/sugd_seed2 \
        --trials 16 --seeds 20 --plot docs/img/search_replay.png

Live searches on this machine run 13 to 14 trials in 25 minutes, so comparing samplers at 16
trials x several seeds live takes hours. As surrogate HPO benchmarks do, this fits regressors
(scikit-learn's random forest) on the finished trials of real searches of one space on one model
(their Optuna studies: each trial's parameters, the study's value, its aggregate and its
seconds), then replays whole searches against them: the space's own sampler (TPE, as
``searcher.make_sampler`` builds it, its start point first) and random search, each for
``--trials`` trials per seed, in the lr range the real searches fitted.

Prints the surrogate's leave-one-out rank correlation with the real aggregates (how far the
replay can be trusted), then per strategy: the best aggregate after the trials, how many
searches reach 95 % of the best aggregate the surrogate knows (its maximum over 20,000 random
configurations) and how many trial-seconds (the surrogate's seconds, summed in order) each
needed to get there, and how many sampled trials reached 0.30. Every figure is the surrogate's,
not a trial's.

Target (issue 24): TPE reaches 95 % of the best known aggregate with at most half of random
search's compute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
from pathlib import Path

TARGET_FRACTION = 0.95
GOOD = 0.30


def finished_trials(output: Path) -> list[dict]:
    """A search's finished trials: parameters, the study's value, aggregate and seconds."""
    import optuna
    from default_job_seeds import study_of  # bench/, beside this script

    rows = {r["trial_id"]: r for r in json.loads((output / "trials.json").read_text())}
    found = []
    for t in study_of(output).trials:
        row = rows.get(t.user_attrs.get("tune_trial_id"))
        if t.state == optuna.trial.TrialState.COMPLETE and row and row.get("seconds"):
            found.append(
                {"params": t.params, "value": t.value, "aggregate": row["aggregate"], "seconds": row["seconds"]}
            )
    return found


def fitted_space(output: Path):
    """The space as the real searches sampled it: ``params.lr`` in the range their test fitted."""
    from unlearn_search.search.space import load_space

    space = load_space(output / "space.yaml")
    fitted = json.loads((output / "lr_range.json").read_text())["fitted"]
    params = tuple(
        dataclasses.replace(p, low=fitted["low"], high=fitted["high"]) if p.name == "lr" else p for p in space.params
    )
    middle = math.sqrt(fitted["low"] * fitted["high"])
    starts = tuple(
        {**s, "lr": middle} if not fitted["low"] <= s.get("lr", middle) <= fitted["high"] else s for s in space.starts
    )
    return dataclasses.replace(space, params=params, starts=starts)


def features(space, params: dict) -> list[float]:
    """One row per configuration: log lr, numbers as they are, each choice as 0/1, inactive as 0."""
    row = []
    for p in space.params:
        value = params.get(p.name)
        if p.distribution == "categorical" and not all(isinstance(c, (int, float)) for c in p.choices):
            row += [float(value == c) for c in p.choices]
        elif value is None:
            row.append(0.0)
        else:
            row.append(math.log10(value) if p.log else float(value))
    return row


class Surrogate:
    def __init__(self, space, trials: list[dict], seed: int = 0, targets=("value", "aggregate", "seconds")):
        from sklearn.ensemble import RandomForestRegressor

        self.space = space
        x = [features(space, t["params"]) for t in trials]
        self.models = {}
        for target in targets:
            model = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=seed)
            self.models[target] = model.fit(x, [t[target] for t in trials])

    def __call__(self, params: dict) -> dict[str, float]:
        return self.many([params])[0]

    def many(self, configurations: list[dict]) -> list[dict[str, float]]:
        x = [features(self.space, params) for params in configurations]
        predicted = {target: model.predict(x) for target, model in self.models.items()}
        return [{target: float(values[i]) for target, values in predicted.items()} for i in range(len(x))]


def leave_one_out(space, trials: list[dict]) -> float:
    """Spearman's rank correlation of the surrogate's aggregate, fitted without each trial, with its real one."""
    from scipy.stats import spearmanr

    predicted = [
        Surrogate(space, trials[:i] + trials[i + 1 :], targets=("aggregate",))(t["params"])["aggregate"]
        for i, t in enumerate(trials)
    ]
    return float(spearmanr(predicted, [t["aggregate"] for t in trials]).statistic)


def replay(space, surrogate: Surrogate, sampler_name: str, seed: int, trials: int) -> list[dict]:
    """One search of ``trials`` trials against the surrogate: per trial, its aggregate and seconds."""
    import optuna

    from unlearn_search.search.searcher import make_sampler

    search = dataclasses.replace(space.search, sampler=sampler_name)
    sampler = make_sampler(dataclasses.replace(space, search=search), seed, trials)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for start in space.starts:
        study.enqueue_trial(start)
    history = []
    for _ in range(trials):
        trial = study.ask()
        scores = surrogate(space.define_by_run()(trial))
        study.tell(trial, scores["value"])
        history.append({**scores, "start": len(history) < len(space.starts)})
    return history


def reached(history: list[dict], bar: float) -> float | None:
    """Trial-seconds spent until a trial's aggregate reaches ``bar`` (None: never)."""
    spent = 0.0
    for h in history:
        spent += h["seconds"]
        if h["aggregate"] >= bar:
            return spent
    return None


def best_known(space, surrogate: Surrogate, count: int = 20000) -> float:
    import optuna

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=12345))
    configurations = []
    for _ in range(count):
        trial = study.ask()
        configurations.append(space.define_by_run()(trial))
        study.tell(trial, 0.0)
    return max(scores["aggregate"] for scores in surrogate.many(configurations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs", nargs="+", type=Path, help="real searches of one space on one model")
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = fitted_space(args.outputs[0])
    trials = [t for output in args.outputs for t in finished_trials(output)]
    print(f"surrogate: {len(trials)} real trials from {len(args.outputs)} searches")
    print(f"leave-one-out rank correlation with the real aggregates: {leave_one_out(space, trials):.2f}")
    surrogate = Surrogate(space, trials)
    best = best_known(space, surrogate)
    bar = TARGET_FRACTION * best
    print(
        f"best aggregate the surrogate knows: {best:.3f} (real best {max(t['aggregate'] for t in trials):.3f}); "
        f"95 %: {bar:.3f}"
    )
    runs = {
        name: [replay(space, surrogate, name, seed, args.trials) for seed in range(args.seeds)]
        for name in ("tpe", "random")
    }
    print(
        f"\n| strategy | searches | best after {args.trials} (mean, min-max) | reached 95 % | "
        "trial-seconds to 95 % (median) | sampled trials >= 0.30 |"
    )
    print("|---|---:|---|---:|---:|---:|")
    medians = {}
    for name, histories in runs.items():
        finals = [max(h["aggregate"] for h in history) for history in histories]
        spent = [reached(history, bar) for history in histories]
        got = [s for s in spent if s is not None]
        medians[name] = statistics.median(got) if got else None
        good = sum(h["aggregate"] >= GOOD and not h["start"] for history in histories for h in history)
        total = sum(not h["start"] for history in histories for h in history)
        median = f"{medians[name]:.0f}" if got else "-"
        print(
            f"| {name} | {len(histories)} | {statistics.mean(finals):.3f} ({min(finals):.3f}-{max(finals):.3f}) | "
            f"{len(got)}/{len(histories)} | {median} | {good}/{total} |"
        )
    if medians["tpe"] and medians["random"]:
        print(
            f"\nTPE's median compute to 95 % over random search's: {medians['tpe'] / medians['random']:.2f}x "
            "(searches that never got there are left out of each median)"
        )
    if args.plot:
        plot(runs, args.trials, bar, args.plot)
        print(f"plot: {args.plot}")


def plot(runs: dict, trials: int, bar: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, histories in runs.items():
        curves = [[max(h["aggregate"] for h in history[: i + 1]) for i in range(trials)] for history in histories]
        means = [statistics.mean(c[i] for c in curves) for i in range(trials)]
        ax.plot(range(1, trials + 1), means, marker="o", markersize=3, label=f"{name}: mean best so far")
    ax.axhline(bar, color="grey", linestyle=":", linewidth=1, label="95 % of the best known")
    ax.set_xlabel("trial (1: the space's start point)")
    ax.set_ylabel("aggregate (surrogate)")
    ax.set_title("TPE against random search, replayed on a surrogate of real trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
