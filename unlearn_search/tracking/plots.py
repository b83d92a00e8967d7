"""Plots of a search from its Optuna study (Optuna's own visualization, rendered with matplotlib)."""

from __future__ import annotations

import warnings
from pathlib import Path


def study_plots(storage: str, study_name: str, directory: Path, objective_names: list[str]) -> list[Path]:
    """Optimization history, parameter importances, parallel coordinates and, with several
    objectives, the Pareto front, as PNG files; a plot the study cannot support yet (too few
    finished trials) is skipped with a note rather than failing the search."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not finished:
        return []
    multi = len(study.directions) > 1
    plots = {}
    if multi:
        plots["pareto_front"] = lambda: ovm.plot_pareto_front(study, target_names=objective_names)
        for i, name in enumerate(objective_names):
            plots[f"optimization_history_{name}"] = lambda i=i, name=name: ovm.plot_optimization_history(
                study, target=lambda t: t.values[i], target_name=name
            )
            plots[f"param_importances_{name}"] = lambda i=i, name=name: ovm.plot_param_importances(
                study, target=lambda t: t.values[i], target_name=name
            )
            plots[f"parallel_coordinate_{name}"] = lambda i=i, name=name: ovm.plot_parallel_coordinate(
                study, target=lambda t: t.values[i], target_name=name
            )
    else:
        objective = objective_names[0]
        plots["optimization_history"] = lambda: ovm.plot_optimization_history(study, target_name=objective)
        plots["param_importances"] = lambda: ovm.plot_param_importances(study, target_name=objective)
        plots["parallel_coordinate"] = lambda: ovm.plot_parallel_coordinate(study, target_name=objective)
    written = []
    for name, make in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            (directory / f"{name}.skipped.txt").write_text(f"{name}: not drawn ({error})\n")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(9, 5.5)
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def save_figure(fig, path: Path) -> Path:
    """A figure as a PNG, its memory released (plots are drawn headless: the Agg backend)."""
    import matplotlib.pyplot as plt

    if fig.axes and fig.axes[0].get_legend_handles_labels()[0]:
        fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def range_plot(record: dict, path: Path) -> Path:
    """The lr range test's curve: forget and retain NLL of the probe items against the lr, with
    the onset and the range the search samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes, fitted = record["probes"][1:], record["fitted"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot([p["lr"] for p in probes], [p["forget_nll"] for p in probes], marker="o", label="forget NLL (probe)")
    ax.plot([p["lr"] for p in probes], [p["retain_nll"] for p in probes], marker="s", label="retain NLL (probe)")
    ax.axvspan(fitted["low"], fitted["high"], alpha=0.15, color="green", label="searched lr range")
    if fitted["onset"] is not None:
        ax.axvline(fitted["onset"], color="black", linestyle="--", label="onset")
    ax.set_xscale("log")
    ax.set_yscale("log")  # the onset is a ratio to the start
    ax.set_xlabel("learning rate of the step before the probe")
    ax.set_ylabel("token-mean NLL of the probe items")
    ax.set_title("lr range test")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
