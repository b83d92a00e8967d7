"""A cheap evaluation for use during training: generation scores on a fixed set of items."""

from __future__ import annotations

import torch

from unlearn_search.data import Benchmark
from unlearn_search.evaluation import metrics
from unlearn_search.evaluation.evaluate import EvalConfig, score_benchmark, summarize_set
from unlearn_search.data.benchmark import TASKS


@torch.no_grad()
def quick_scores(model, tokenizer, benchmark: Benchmark, max_new_tokens: int = 64, batch_size: int = 32) -> dict:
    """Forget/retain regurgitation and knowledge and the task aggregate on ``benchmark``'s items."""
    was_training = model.training
    model.eval()
    config = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    summaries = {s: summarize_set(frame) for s, frame in score_benchmark(model, tokenizer, benchmark, config).items()}
    if was_training:
        model.train()
    scores = {}
    for set_name, summary in summaries.items():
        scores[f"{set_name}_regurgitation"] = summary["overall-regurgitation-score"]
        scores[f"{set_name}_knowledge"] = summary["overall-knowledge-score"]
        scores[f"{set_name}_nll"] = summary["mean-nll"]
    scores["task_aggregate"] = metrics.task_aggregate({s: {t: summaries[s][t] for t in TASKS} for s in summaries})
    return scores
