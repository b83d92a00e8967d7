"""The search: YAML spaces, Ray Tune + Optuna with pruning, best-trial export."""

from unlearn_search.search.driver import SearchOptions, SearchOutcome, run_search
from unlearn_search.search.results import best_trial, final_metrics, pareto_front, summary_table
from unlearn_search.search.space import SearchSpace, load_space, parse_space

__all__ = [
    "SearchOptions",
    "SearchOutcome",
    "SearchSpace",
    "best_trial",
    "final_metrics",
    "load_space",
    "pareto_front",
    "parse_space",
    "run_search",
    "summary_table",
]
