"""How evenly a trial's steps split over its data-parallel workers: rows alike, or padded size alike.

    python bench/rank_parts.py --model small [--method npo] [--workers 2 4] [--timed-steps 16]
        [--set retain_loss=kl ...]

Ranks wait for each other at every ZeRO collective, so a step takes as long as its slowest
rank. For each worker count this prints the slowest rank's padded tokens per step (forget +
retain batches, rows times the longest row), averaged over the trial's steps, with each rank
holding the same number of rows (every world-th item, as before) and with the parts the trials
use (``shard_steps``: balanced by padded size); then, on one thread as a worker has, the
slowest rank's forward and backward time over the first --timed-steps steps, both ways.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unlearn_search.data import resolve_data
from unlearn_search.models import load_model, resolve_model
from unlearn_search.models.trainable import prepare_trainable
from unlearn_search.training.config import parse_assignments, trial_config
from unlearn_search.training.distributed import shard_steps
from unlearn_search.training.unlearn import prepare


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--data")
    parser.add_argument("--method", default="npo")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--timed-steps", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    paths = resolve_data(args.data)
    model_dir = resolve_model(args.model, paths)
    config = trial_config({"method": args.method, **parse_assignments(args.set)})
    prepared = prepare(model_dir, paths, config)
    data, steps = prepared.data, prepared.steps
    torch.set_num_threads(1)
    model = prepare_trainable(
        load_model(model_dir), config.trainable, config.last_k, config.lora_rank, config.lora_alpha, config.lora_dropout
    )

    def padded(which: str, indices) -> int:
        examples = getattr(data, which)
        return len(indices) * max((len(examples[i].input_ids) for i in indices), default=0)

    def cost(part) -> int:
        return padded("forget", part.forget) + padded("retain", part.retain)

    def seconds(part) -> float:
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = sum(
            model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float().logsumexp(-1).mean()
            for batch in (data.batch("forget", part.forget), data.batch("retain", part.retain))
        )
        loss.backward()
        return time.perf_counter() - started

    print(
        f"model: {model_dir}  method: {args.method}  steps: {len(steps)}  batch_size: {config.batch_size}  "
        f"trainable: {config.trainable}"
    )
    print(
        f"{'workers':>8s}{'slowest rank, padded tokens per step':>40s}{'ratio':>8s}"
        f"{'slowest rank, fwd+bwd s per step':>36s}{'ratio':>8s}"
    )
    for world in args.workers:
        by_rows = [[rows_alike_part(step, rank, world) for rank in range(world)] for step in steps]
        balanced = [list(parts) for parts in zip(*(shard_steps(steps, rank, world, data) for rank in range(world)))]
        tokens = [statistics.mean(max(cost(p) for p in parts) for parts in split) for split in (by_rows, balanced)]
        timed = []
        for split in (by_rows, balanced):
            slowest = [max(parts, key=cost) for parts in split[: args.timed_steps]]
            seconds(slowest[0])  # warm-up
            timed.append(statistics.mean(seconds(part) for part in slowest))
        print(
            f"{world:8d}{tokens[0]:>18.0f} rows alike{tokens[1]:>10.0f} balanced{tokens[0] / tokens[1]:7.2f}x"
            f"{timed[0]:>14.3f} rows{timed[1]:>10.3f} bal.{timed[0] / timed[1]:7.2f}x"
        )


def rows_alike_part(step, rank: int, world: int):
    """Every world-th item, each rank the same number of rows (a rank short of items repeats one)."""
    import dataclasses

    def part(indices):
        mine = indices[rank::world]
        return mine if mine or not indices else (indices[rank % len(indices)],)

    return dataclasses.replace(step, forget=part(step.forget), retain=part(step.retain))


if __name__ == "__main__":
    main()
