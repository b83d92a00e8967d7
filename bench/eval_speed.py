"""Official one-at-a-time evaluation against the batched one, in each dtype, on the same checkpoint.

    python bench/eval_speed.py --model small [--split all] [--batch-size 32 128] [--dtype float32 bfloat16]
                               [--device cuda] [--repeats 3] [--skip-one-at-a-time]

Per dtype: both wall times (the median of --repeats runs), the speed-up, and the largest difference
between any metric of the two. Then every metric of the first dtype's batched run against each other
dtype's (the organizers' scorer loads checkpoints in bfloat16; ``auto`` scores in float32 on CPU).
Target: >= 20x at differences <= 0.01 within a dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unlearn_search.data import resolve_data
from unlearn_search.evaluation import EvalConfig, evaluate
from unlearn_search.models import load_model, load_tokenizer, read_target_manifest, resolve_model
from unlearn_search.models.loading import DTYPES


def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + key] = float(value)
    return flat


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(model, tokenizer, paths, config: EvalConfig, manifest, repeats: int, device: str) -> tuple[float, dict]:
    seconds, results = [], {}
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        results = flatten(evaluate(model, tokenizer, paths, config, manifest))
        _synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), results


def largest_difference(a: dict, b: dict) -> tuple[str, float]:
    differences = {k: abs(a[k] - b[k]) for k in a if k in b and a[k] == a[k] and b[k] == b[k]}
    worst = max(differences, key=differences.get)
    return worst, differences[worst]


def dtype_table(results: dict[str, dict], dtypes: list[str]) -> list[str]:
    """Every metric a search reports, then each per-task score, in each dtype."""
    first = results[dtypes[0]]
    keys = [k for k in first if k.startswith(("forget-set/", "retain-set/")) and k.count("/") == 2]
    keys = [
        "aggregate-score",
        "harmonic-mean-task-aggregate",
        "mia_loss_acc",
        "mia_final_score",
        "mmlu_average",
        "forget-set/overall-regurgitation-score",
        "forget-set/overall-knowledge-score",
        "retain-set/overall-regurgitation-score",
        "retain-set/overall-knowledge-score",
        "forget-set/mean-nll",
        "retain-set/mean-nll",
    ] + keys
    lines = ["| metric | " + " | ".join(dtypes) + " | largest difference |", "|---" * (len(dtypes) + 2) + "|"]
    for key in keys:
        values = [results[d].get(key, float("nan")) for d in dtypes]
        spread = max(values) - min(values)
        lines.append(f"| {key} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {spread:.4f} |")
    return lines


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data")
    parser.add_argument("--split", default="all")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batched runs")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPES[1:])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--mmlu-limit", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the median is reported")
    parser.add_argument("--skip-one-at-a-time", action="store_true", help="compare dtypes only (much shorter)")
    args = parser.parse_args()

    paths = resolve_data(args.data)
    directory = resolve_model(args.model, paths)
    tokenizer, manifest = load_tokenizer(directory), read_target_manifest(directory)
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    print(f"model: {directory} on {device}")
    batched_results = {}
    for dtype in args.dtype:
        model = load_model(directory, dtype, device=args.device)
        # Warm-up outside the timings: CUDA context, kernels, tokenizer caches.
        warm = tokenizer(["warm-up"], return_tensors="pt").to(args.device)
        model.generate(**warm, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        runs = [] if args.skip_one_at_a_time else [("one-at-a-time", 1)]
        runs += [(f"batched (batch {b})", b) for b in args.batch_size]
        timings, results = {}, {}
        for name, batch_size in runs:
            config = EvalConfig(
                split=args.split, batch_size=batch_size, max_new_tokens=args.max_new_tokens, mmlu_limit=args.mmlu_limit
            )
            timings[name], results[name] = timed(model, tokenizer, paths, config, manifest, args.repeats, args.device)
        batched_results[dtype] = results[runs[-1][0]]
        for name, _ in runs:
            line = f"{dtype}, {name}: {timings[name]:.2f} s (median of {args.repeats})"
            if name != "one-at-a-time" and "one-at-a-time" in results:
                worst, difference = largest_difference(results["one-at-a-time"], results[name])
                line += (
                    f", speed-up {timings['one-at-a-time'] / timings[name]:.1f}x, largest metric difference "
                    f"{difference:.4g} ({worst})"
                )
            print(line + f", aggregate-score {results[name]['aggregate-score']:.4f}")
        del model
    if len(args.dtype) > 1:
        print(f"\nevery metric by dtype (batch {args.batch_size[-1]}):")
        print("\n".join(dtype_table(batched_results, args.dtype)))


if __name__ == "__main__":
    main()
