"""What the quick evaluation at each schedule boundary costs, part by part, on one worker's threads.

    python bench/quick_eval.py --model small [--items 64] [--documents 32] [--mmlu-limit 1] [--threads 1]

The quick evaluation is the full evaluation's formula on a fixed subset (what a search prunes on):
generation and answer NLL on forget + retain items, MIA document NLL, MMLU. Prints the median
seconds of each part over --repeats runs, the total, the share of the items-only evaluation (what
the quick evaluation used to be), and the estimates themselves.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unlearn_search.data import resolve_data
from unlearn_search.evaluation.evaluate import EvalConfig, load_eval_data, score_benchmark
from unlearn_search.evaluation.inference import document_nll
from unlearn_search.evaluation.mmlu import evaluate_mmlu
from unlearn_search.evaluation.quick import quick_config, quick_data, quick_scores
from unlearn_search.models import load_model, load_tokenizer, read_target_manifest, resolve_model


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--data")
    parser.add_argument("--split", default="train", help="the final evaluation's split")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--documents", type=int, default=32)
    parser.add_argument("--mmlu-limit", type=int, default=1, help="MMLU questions per subject")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="a trial worker's CPU threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    paths = resolve_data(args.data)
    model_dir = resolve_model(args.model, paths)
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    config = quick_config(EvalConfig(split=args.split), args.max_new_tokens, args.mmlu_limit)
    data = quick_data(load_eval_data(paths, config, read_target_manifest(model_dir)), args.items, args.documents)
    documents = [d.text for d in data.members + data.nonmembers]
    parts = {
        "forget + retain items": lambda: score_benchmark(model, tokenizer, data.benchmark, config),
        "MIA documents": lambda: document_nll(model, tokenizer, documents, config.batch_size),
        "MMLU": lambda: evaluate_mmlu(
            model, tokenizer, paths.mmlu, config.mmlu_shots, args.mmlu_limit, config.batch_size
        ),
        "quick evaluation (all)": lambda: quick_scores(model, tokenizer, data, paths.mmlu, config),
    }
    seconds = {}
    for name, part in parts.items():
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            part()
            times.append(time.perf_counter() - started)
        seconds[name] = statistics.median(times)
    questions = evaluate_mmlu(model, tokenizer, paths.mmlu, 0, args.mmlu_limit, config.batch_size)["questions"]
    print(
        f"model: {model_dir}  threads: {args.threads}  items: {len(data.benchmark.forget) + len(data.benchmark.retain)}"
        f"  documents: {len(documents)}  MMLU questions: {questions} ({config.mmlu_shots}-shot)"
    )
    for name, value in seconds.items():
        print(f"{name:28s}{value:8.2f} s")
    total, items = seconds["quick evaluation (all)"], seconds["forget + retain items"]
    print(f"quick evaluation / items only: {total / items:.2f}x")
    estimates = quick_scores(model, tokenizer, data, paths.mmlu, config)
    print("estimates: " + "  ".join(f"{k} {v:.4f}" for k, v in estimates.items()))


if __name__ == "__main__":
    main()
