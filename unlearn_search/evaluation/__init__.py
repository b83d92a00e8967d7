"""Evaluation exactly as SemEval-2025 Task 4 scores it."""

from unlearn_search.evaluation.evaluate import EvalConfig, evaluate, load_eval_data
from unlearn_search.evaluation.metrics import aggregate, exact_match, mia_auc, mia_score, rouge_recall, task_aggregate

__all__ = [
    "EvalConfig",
    "aggregate",
    "evaluate",
    "exact_match",
    "load_eval_data",
    "mia_auc",
    "mia_score",
    "rouge_recall",
    "task_aggregate",
]
