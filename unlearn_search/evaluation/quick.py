"""The quick evaluation during training: the full evaluation's formula on a fixed small subset.

A search prunes on these figures, so they estimate the objective itself (task aggregate, MIA
and MMLU combined as the final aggregate), not one of its terms: a trial that keeps its task
scores while MMLU collapses, or whose MIA AUC drifts, is judged on what it will finally score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch

from unlearn_search.data import Benchmark
from unlearn_search.evaluation.evaluate import EvalConfig, EvalData, metric_values, score


def spread(values: Sequence, count: int) -> list:
    """``count`` of ``values`` evenly spaced over the list (all when there are fewer): a split of
    ``all`` puts train before validation items, so a prefix would miss the validation ones."""
    if count >= len(values):
        return list(values)
    return [values[i * len(values) // count] for i in range(count)]


def shares(sizes: Sequence[int], count: int) -> list[int]:
    """``count`` split as evenly as the group ``sizes`` allow (what a full group cannot take goes to
    the others), at least one per group and at most all of each."""
    taken, remaining = [0] * len(sizes), min(max(count, len(sizes)), sum(sizes))
    while remaining:
        room = [g for g, size in enumerate(sizes) if taken[g] < size]
        each = max(1, remaining // len(room))
        for g in room[:remaining]:
            extra = min(each, sizes[g] - taken[g], remaining)
            taken[g] += extra
            remaining -= extra
    return taken


def stratified(items: Sequence, count: int) -> list:
    """``count`` of ``items``, shared over the (task, kind) groups (so that every term of the task
    harmonic mean has an item) and spread within each, in the list's order."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault((item.task, item.kind), []).append(index)
    counts = shares([len(g) for g in groups.values()], count)
    return [items[i] for i in sorted(i for g, n in zip(groups.values(), counts) for i in spread(g, n))]


def quick_data(data: EvalData, items: int, documents: int) -> EvalData:
    """A fixed, deterministic subset: ``items`` forget + retain items (half of each, stratified by
    task and kind) and ``documents`` MIA members + non-members (half of each), spread over the
    evaluation's data."""
    half_items, half_documents = max(1, items // 2), max(1, documents // 2)
    benchmark = Benchmark(stratified(data.benchmark.forget, half_items), stratified(data.benchmark.retain, half_items))
    members, nonmembers = spread(data.members, half_documents), spread(data.nonmembers, half_documents)
    return EvalData(benchmark, members, nonmembers, data.reference_nll)


def quick_config(config: EvalConfig, max_new_tokens: int, mmlu_limit: int) -> EvalConfig:
    """The final evaluation's settings (shots, split, batch size) with the quick limits."""
    return dataclasses.replace(
        config,
        max_new_tokens=max_new_tokens,
        mmlu_limit=mmlu_limit,
        mmlu_threshold=None,
        original_mmlu=None,
        progress=False,
    )


@torch.no_grad()
def scored(model, tokenizer, data: EvalData, mmlu_dir: str | Path, config: EvalConfig) -> tuple[dict, dict]:
    """``score`` with the model in eval mode and no gradients (a training model is put back in
    training mode after): the evaluation a trial's workers run on the model they train."""
    was_training = model.training
    model.eval()
    try:
        return score(model, tokenizer, data, mmlu_dir, config)
    finally:
        if was_training:
            model.train()


def quick_scores(model, tokenizer, data: EvalData, mmlu_dir: str | Path, config: EvalConfig) -> dict[str, float]:
    """Every metric a finished trial reports (same names), estimated on ``data``."""
    return metric_values(scored(model, tokenizer, data, mmlu_dir, config)[0])
