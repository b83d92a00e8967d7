"""Official one-at-a-time evaluation against the batched one, on the same checkpoint.

    python bench/eval_speed.py --model tiny [--split all] [--batch-size 32 128] [--device cuda] [--repeats 3]

Prints both wall times (the median of --repeats runs), the speed-up, and the largest difference
between any metric of the two.
Target: >= 20x at differences <= 0.01.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unlearn_search.data import resolve_data
from unlearn_search.evaluation import EvalConfig, evaluate
from unlearn_search.models import load_model, load_tokenizer, read_target_manifest, resolve_model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data")
    parser.add_argument("--split", default="all")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[32], help="one or more batched runs")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--mmlu-limit", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the median is reported")
    args = parser.parse_args()

    paths = resolve_data(args.data)
    directory = resolve_model(args.model, paths)
    model, tokenizer = load_model(directory).to(args.device), load_tokenizer(directory)
    manifest = read_target_manifest(directory)
    # Warm-up outside the timings: CUDA context, kernels, tokenizer caches.
    warm = tokenizer(["warm-up"], return_tensors="pt").to(args.device)
    model.generate(**warm, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    timings, results = {}, {}
    runs = [("one-at-a-time", 1)] + [(f"batched (batch {b})", b) for b in args.batch_size]
    for name, batch_size in runs:
        config = EvalConfig(split=args.split, batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                            mmlu_limit=args.mmlu_limit)
        seconds = []
        for _ in range(args.repeats):
            _synchronize(args.device)
            started = time.perf_counter()
            results[name] = flatten(evaluate(model, tokenizer, paths, config, manifest))
            _synchronize(args.device)
            seconds.append(time.perf_counter() - started)
        timings[name] = statistics.median(seconds)
    device = args.device + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
    print(f"model: {directory} on {device}")
    one = results["one-at-a-time"]
    print(f"one-at-a-time: {timings['one-at-a-time']:.2f} s (median of {args.repeats})")
    for name, _ in runs[1:]:
        batched = results[name]
        differences = {k: abs(one[k] - batched[k]) for k in one if k in batched and one[k] == one[k]}
        worst = max(differences, key=differences.get)
        print(f"{name}: {timings[name]:.2f} s, speed-up {timings['one-at-a-time'] / timings[name]:.1f}x, "
              f"largest metric difference {differences[worst]:.4g} ({worst}), "
              f"aggregate-score {batched['aggregate-score']:.4f} (one-at-a-time {one['aggregate-score']:.4f})")

if __name__ == "__main__":
    main()
