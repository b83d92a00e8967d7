"""The search's report: one HTML page a person opens to see what the search found.

It holds the trials table, the study's plots (``plots.study_plots``) and a chart of the best
trial's per-task forget and retain scores against the reference models', scored the same way:
the original, and the retrained gold standard where one was built for a reference target.
Images are files beside it (``plots/``), referenced by relative paths, so the folder can be
copied or served as a whole.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unlearn_search.evaluation import metrics
from unlearn_search.evaluation.evaluate import MIA_ATTACKS
from unlearn_search.search.results import cell_text

REPORT_FILE = "report.html"
PER_TASK_PLOT = "best_per_task"  # plots/<name>.png
# One column per term the harmonic mean is built from: (set, score, label).
TERMS = (
    ("forget", metrics.REGURGITATION, "forget regurgitation"),
    ("forget", metrics.KNOWLEDGE, "forget knowledge"),
    ("retain", metrics.REGURGITATION, "retain regurgitation"),
    ("retain", metrics.KNOWLEDGE, "retain knowledge"),
)
TABLE_METRICS = ("aggregate", "task_aggregate", "mia_score", "mmlu", "seconds")
TEXT = ' class="text"'  # a left-aligned cell
REFERENCE_COLOURS = {"original": "#bbbbbb", "retrained": "#6aa84f"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 75em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.text { text-align: left; } tr.best { background: #e8f4e8; font-weight: 600; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
"""


def per_task_scores(evaluation: dict) -> dict[str, dict[str, float]]:
    """``{task: {term label: value}}`` from an ``evaluation_results.json``; NaN where a set has
    no item of that kind for the task."""
    tasks = sorted({t for s in ("forget", "retain") for t in evaluation[f"{s}-set"] if t.startswith("Task")})
    scores: dict[str, dict[str, float]] = {}
    for task in tasks:
        scores[task] = {}
        for set_name, score, label in TERMS:
            value = evaluation[f"{set_name}-set"].get(task, {}).get(score)
            scores[task][label] = math.nan if value is None else float(value)
    return scores


def per_task_plot(best: dict, references: dict[str, dict], path: Path) -> Path:
    """Grouped bars, one panel per task: the best trial's four terms beside each reference's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unlearn_search.tracking.plots import save_figure

    models = [("best trial", per_task_scores(best), "#2a7ab0")]
    models += [(name, per_task_scores(e), REFERENCE_COLOURS.get(name, "#999999")) for name, e in references.items()]
    tasks = list(models[0][1])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), sharey=True, squeeze=False)
    width = 0.8 / len(models)
    labels = [label for _, _, label in TERMS]
    for ax, task in zip(axes[0], tasks):
        for m, (name, scores, colour) in enumerate(models):
            values = [scores.get(task, {}).get(label, math.nan) for label in labels]
            ax.bar([i + m * width for i in range(len(labels))], values, width, label=name, color=colour)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(labels))])
        ax.set_xticklabels([label.replace(" ", "\n") for label in labels], fontsize=7)
        ax.set_title(task)
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("score (forget: lower is better)")
    return save_figure(fig, path)


def _cell(value: Any) -> str:
    return html.escape(cell_text(value))


def trials_table(rows: Sequence[dict], params: Sequence[str], best_id: str | None) -> str:
    """Every trial as an HTML table row: status, searched parameters and final scores."""
    columns = ["trial_id", "status", *params, *TABLE_METRICS]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        best = ' class="best"' if row.get("trial_id") == best_id else ""
        cells = "".join(f"<td{TEXT if c in ('trial_id', 'status') else ''}>{_cell(row.get(c))}</td>" for c in columns)
        body.append(f"<tr{best}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def scores_table(best: dict, references: dict[str, dict]) -> str:
    """The three terms of the aggregate, the aggregate and every attack's AUC: the best trial
    against each reference."""
    keys = [
        ("aggregate", ("aggregate-score",)),
        ("task harmonic mean", ("harmonic-mean-task-aggregate",)),
        ("MIA score", ("mia_final_score",)),
        ("MMLU", ("mmlu_average",)),
        ("MIA AUC: loss", ("mia_loss_acc",)),
        *((f"MIA AUC: {attack.replace('_', ' ')}", ("mia_attacks", attack, "auc")) for attack in MIA_ATTACKS),
    ]
    models = [("best trial", best), *references.items()]
    head = "<th></th>" + "".join(f"<th>{html.escape(name)}</th>" for name, _ in models)
    body = "".join(
        f"<tr><td{TEXT}>{label}</td>" + "".join(f"<td>{_cell(_lookup(m, key))}</td>" for _, m in models) + "</tr>"
        for label, key in keys
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _lookup(results: dict, key: tuple[str, ...]) -> Any:
    for part in key:
        results = results.get(part) if isinstance(results, dict) else None
    return results


def write_report(
    output: Path,
    *,
    title: str,
    rows: Sequence[dict],
    params: Sequence[str],
    best: dict | None,
    best_evaluation: dict | None,
    references: dict[str, dict] | None,
    plots: Sequence[Path],
) -> Path:
    """``report.html`` in ``output``: the trials, the study's plots and the best trial's scores
    beside ``references`` (``{"original": results, "retrained": results}``, either may be missing)."""
    references = references or {}
    output = Path(output)
    best_id = best["trial_id"] if best else None
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        f"<h2>Trials</h2><p>{len(rows)} trials; the best, highlighted, was re-evaluated on the final items.</p>",
        trials_table(rows, params, best_id),
    ]
    if best_evaluation is not None:
        chart = per_task_plot(best_evaluation, references, output / "plots" / f"{PER_TASK_PLOT}.png")
        against = " and ".join(f"the {name} model" for name in references)
        reference = f"against {against}, scored the same way" if references else "(no reference model)"
        parts += [
            f"<h2>Best trial {html.escape(str(best_id))}</h2><p>Its full re-evaluation {reference}.</p>",
            scores_table(best_evaluation, references),
            _image(chart, output, "per-task forget and retain scores"),
        ]
    else:
        parts.append("<h2>Best trial</h2><p>No finished trial met the constraints: no best trial.</p>")
    parts.append("<h2>The study</h2>")
    parts += [_image(path, output, path.stem.replace("_", " ")) for path in plots]
    parts.append("</body></html>")
    path = output / REPORT_FILE
    path.write_text("\n".join(parts))
    return path


def _image(path: Path, root: Path, caption: str) -> str:
    source = Path(path).resolve().relative_to(root.resolve()).as_posix()
    caption = html.escape(caption)
    return f"<figure><img src='{html.escape(source)}' alt='{caption}'><figcaption>{caption}</figcaption></figure>"
