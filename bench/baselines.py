"""Every method at its starting configuration, and the retrained gold standard, on one target.

    python bench/baselines.py --model small [--only gd,npo] [--mmlu-limit 4] [--output outputs/baselines]

Each baseline is the settings and first start point of a shipped search space
(`search_spaces/*.yaml`: the authors' published values) plus GA and SimNPO, run as a real trial
(Ray Train, DeepSpeed ZeRO-3, 2 workers) and scored with the full evaluation (every item, 256 new
tokens, MMLU with a per-subject limit, every membership-inference attack). A space with an
`lr_range_test` has its start's lr placed by that test on this model, as a search's first trial
is (`--no-fit-lr`: the published lr as it is). The gold standard is the same builder trained on
the retain items only (`build_retrained`), as retraining without the forget data would give.
Also scored: the original target. Writes `results.json`, `results.md`, `baselines.png` (the
three terms of the aggregate per method) and `baselines_mia.png` (each attack's AUC per method)
to the output, and prints the tables. A finished baseline is kept and not rerun (delete its
folder to redo it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Methods without a shipped space: GA at the setting the forgetting test uses, SimNPO as NPO's start.
EXTRA = {
    "ga": {"method": "ga", "lr": 1.5e-4, "epochs": 6},
    "simnpo": {"method": "simnpo", "lr": 2.0e-4, "epochs": 4, "retain_loss": "ce"},
}
# Each attack's AUC (0.5: members look like non-members), the loss attack first.
ATTACKS = ("mia_auc", "mia_mink_auc", "mia_minkpp_auc", "mia_zlib_auc", "mia_reference_auc")
COLUMNS = (
    "aggregate",
    "task_aggregate",
    "mia_score",
    "mmlu",
    "forget_regurgitation",
    "forget_knowledge",
    "retain_regurgitation",
    "retain_knowledge",
)


def baselines(model_dir=None, data_root=None, output: Path | None = None, only=()) -> dict[str, dict]:
    """Each space's settings and first start; with ``model_dir``, a space's lr range test places
    that start's lr on the model (for the spaces in ``only``; kept under
    ``output/lr_range/<space>/``, so a rerun reads it back)."""
    from unlearn_search.search import load_space
    from unlearn_search.search.driver import fitted_space

    configs = {}
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        space = load_space(path)
        if model_dir is not None and space.name in only and space.lr_range_test is not None and space.starts:
            kept = output / "lr_range" / space.name
            kept.mkdir(parents=True, exist_ok=True)
            space = fitted_space(space, model_dir, data_root, kept)
        configs[space.name] = {**space.settings, **(space.starts[0] if space.starts else {})}
    configs.update(EXTRA)
    return configs


def task_scores(results: dict) -> dict[str, float]:
    """Per task, the harmonic mean of the four SemEval terms (forget ones inverted)."""
    from statistics import harmonic_mean

    out = {}
    for task in sorted(k for k in results["forget-set"] if k.startswith("Task")):
        forget, retain = results["forget-set"][task], results["retain-set"].get(task, {})
        terms = [1 - v for v in forget.values() if v == v] + [v for v in retain.values() if v == v]
        out[task] = harmonic_mean(terms) if terms and min(terms) > 0 else 0.0
    return out


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--data")
    parser.add_argument("--only", help="comma-separated baseline names (default: all)")
    parser.add_argument("--output", default="outputs/baselines")
    parser.add_argument("--split", default="all")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--mmlu-limit", type=int, default=4, help="MMLU questions per subject (all: 0)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--no-fit-lr", action="store_true", help="run each start at its published lr (default: the range test's)"
    )
    args = parser.parse_args()

    from unlearn_search.data import resolve_data
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.evaluation.evaluate import DEFAULT_THRESHOLD_FRACTION
    from unlearn_search.models import read_target_manifest, resolve_model
    from unlearn_search.models.target import build_retrained
    from unlearn_search.search.results import final_metrics
    from unlearn_search.training.cluster import init_ray
    from unlearn_search.training.trial import Resources, evaluate_checkpoint, run_trial

    paths = resolve_data(args.data)
    model_dir = resolve_model(args.model, paths)
    output = Path(args.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    known = baselines()
    chosen = args.only.split(",") if args.only else list(known)
    unknown = [c for c in chosen if c not in known and c not in ("original", "retrained")]
    if unknown:
        raise SystemExit(f"--only {','.join(unknown)}: unknown (expected some of {', '.join(known)})")
    limit = args.mmlu_limit or None

    def config(threshold=None):
        return EvalConfig(
            split=args.split,
            max_new_tokens=args.max_new_tokens,
            mmlu_limit=limit,
            mmlu_threshold=threshold,
            progress=False,
        )

    records: dict[str, dict] = {}

    def score_model(name: str, directory: Path, threshold=None) -> dict:
        saved = output / name / "evaluation_results.json"
        if not saved.exists():
            started = time.time()
            results = evaluate_checkpoint(directory, model_dir, paths.root, config(threshold), output / name)
            results["wall_seconds"] = time.time() - started
            saved.write_text(json.dumps(results, indent=2))
        return json.loads(saved.read_text())

    original = score_model("original", model_dir)
    threshold = DEFAULT_THRESHOLD_FRACTION * original["mmlu_average"]
    records["original"] = {"results": original, "settings": {}, "seconds": 0.0, "peak_rss_mb": None}
    if read_target_manifest(model_dir):  # a reference target: its retrained gold standard
        started = time.time()
        retrained_dir = build_retrained(paths, model_dir, progress=False)
        results = score_model("retrained", retrained_dir, threshold)
        records["retrained"] = {
            "results": results,
            "settings": {"retain only": True},
            "seconds": time.time() - started,
            "peak_rss_mb": None,
        }

    init_ray(None)
    configs = known if args.no_fit_lr else baselines(model_dir, paths.root, output, chosen)
    for name in [c for c in chosen if c in configs]:
        record_path = output / name / "baseline.json"
        if not record_path.exists():
            print(f"{name}: {configs[name]}", flush=True)
            result = run_trial(
                model_dir,
                paths.root,
                configs[name],
                output / name,
                Resources(workers=args.workers),
                config(threshold),
                name=name,
            )
            peak = max((r.get("peak_rss_mb", 0) for r in result.metrics_history), default=None)
            record_path.write_text(
                json.dumps(
                    {
                        "results": result.evaluation,
                        "settings": configs[name],
                        "seconds": result.seconds,
                        "peak_rss_mb": peak,
                    },
                    indent=2,
                )
            )
        records[name] = json.loads(record_path.read_text())

    rows = []
    for name, record in records.items():
        metrics = final_metrics(record["results"])
        rows.append(
            {
                "baseline": name,
                **{k: metrics[k] for k in COLUMNS},
                **{k: metrics.get(k, float("nan")) for k in ATTACKS},
                "passes": metrics["passes_utility_threshold"],
                "tasks": task_scores(record["results"]),
                "seconds": record["seconds"],
                "peak_rss_mb": record["peak_rss_mb"],
                "settings": record["settings"],
            }
        )
    (output / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown(rows, threshold) + "\n\n" + attacks_markdown(rows)
    (output / "results.md").write_text(table + "\n")
    plot(rows, output / "baselines.png")
    attacks_plot(rows, output / "baselines_mia.png")
    print(table)


def markdown(rows: list[dict], threshold: float) -> str:
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = ["baseline", *COLUMNS, *tasks, f"MMLU >= {threshold:.3f}", "wall s", "peak worker RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -r["aggregate"]):
        cells = [
            r["baseline"],
            *(f"{r[c]:.3f}" for c in COLUMNS),
            *(f"{r['tasks'].get(t, float('nan')):.3f}" for t in tasks),
            "yes" if r["passes"] else "no",
            f"{r['seconds']:.0f}",
            "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attacks_markdown(rows: list[dict]) -> str:
    """Each attack's AUC per baseline, in the first table's order."""
    head = ["baseline", *ATTACKS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: -r["aggregate"]):
        lines.append("| " + " | ".join([r["baseline"], *(f"{r[a]:.3f}" for a in ATTACKS)]) + " |")
    return "\n".join(lines)


def attacks_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unlearn_search.tracking.plots import save_figure

    rows = sorted(rows, key=lambda r: -r["aggregate"])
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(rows)), 4))
    width = 0.8 / len(ATTACKS)
    for i, key in enumerate(ATTACKS):
        offset = (i - (len(ATTACKS) - 1) / 2) * width
        label = key.removesuffix("_auc").removeprefix("mia_") if key != "mia_auc" else "loss"
        ax.bar([x + offset for x in range(len(rows))], [r[key] for r in rows], width, label=label)
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")  # members look like non-members
    ax.set_xticks(range(len(rows)), [r["baseline"] for r in rows], rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("AUC (0.5: no membership signal)")
    ax.set_title("Baselines: every membership-inference attack")
    ax.legend(fontsize=7, ncol=len(ATTACKS), loc="upper center", bbox_to_anchor=(0.5, -0.32))
    save_figure(fig, path)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unlearn_search.tracking.plots import save_figure

    rows = sorted(rows, key=lambda r: -r["aggregate"])
    names = [r["baseline"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(rows)), 4))
    width = 0.2
    for i, key in enumerate(("aggregate", "task_aggregate", "mia_score", "mmlu")):
        ax.bar([x + (i - 1.5) * width for x in range(len(rows))], [r[key] for r in rows], width, label=key)
    ax.set_xticks(range(len(rows)), names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("Baselines: the aggregate and its three terms")
    save_figure(fig, path)


if __name__ == "__main__":
    main()
