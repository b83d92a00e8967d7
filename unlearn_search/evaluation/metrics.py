"""The SemEval-2025 Task 4 metrics, as pure functions over model outputs."""

from __future__ import annotations

import math
import statistics
import zlib
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache

import numpy as np
from rouge_score import rouge_scorer
from sklearn.metrics import roc_auc_score

REGURGITATION, KNOWLEDGE = "regurgitation-score", "knowledge-score"


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_recall(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L recall of ``prediction`` against ``reference`` (stemmer on)."""
    scores = _scorer().score(reference, prediction)
    return {"rouge1": scores["rouge1"].recall, "rougeL": scores["rougeL"].recall}


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when equal after strip and lower-case, as the official scorer normalizes."""
    return float(prediction.strip().lower() == reference.strip().lower())


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


SETS = ("forget", "retain")


def task_terms(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, float]:
    """The terms of the task harmonic mean, in the official scorer's order, keyed
    ``set/task/metric``: per set (forget, retain), per task the set holds (sorted, as its
    ``groupby("task")``), regurgitation then knowledge; a forget value v enters as 1 - v.

    ``scores[set][task][metric]``: 12 terms on the full benchmark. A task a set lacks has no terms
    (the official groupby has no row for it); a task with no item of one kind has that term NaN.
    """
    terms = {}
    for set_name in SETS:
        for task in sorted(scores.get(set_name, {})):
            for metric in (REGURGITATION, KNOWLEDGE):
                value = scores[set_name][task].get(metric, math.nan)
                value = math.nan if value is None else float(value)
                terms[f"{set_name}/{task}/{metric}"] = 1.0 - value if set_name == "forget" else value
    return terms


def missing_terms(terms: Mapping[str, float]) -> list[str]:
    """The terms with no item to score them (NaN)."""
    return [name for name, value in terms.items() if math.isnan(value)]


def task_aggregate(scores: Mapping[str, Mapping[str, Mapping[str, float]]]) -> float:
    """Harmonic mean of ``task_terms``; any zero makes it zero. NaN when a term is missing, as
    the official scorer's harmonic mean is, rather than a mean of fewer terms."""
    terms = task_terms(scores)
    if not terms:
        raise ValueError("task_aggregate needs at least one per-task score")
    if missing_terms(terms):
        return math.nan
    return statistics.harmonic_mean(list(terms.values()))


def mia_auc(member_nll: Sequence[float], nonmember_nll: Sequence[float]) -> float:
    """ROC AUC of the loss attack: score -NLL, label member = 1."""
    labels = [1] * len(member_nll) + [0] * len(nonmember_nll)
    scores = [-x for x in member_nll] + [-x for x in nonmember_nll]
    return float(roc_auc_score(labels, scores))


def membership_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of an attack whose score is higher for what it takes to be a member (label 1)."""
    labels = [1] * len(member_scores) + [0] * len(nonmember_scores)
    return float(roc_auc_score(labels, [*member_scores, *nonmember_scores]))


# Membership scores of one document, higher meaning "member", from its token log-probs under the
# model (``logprob``; ``vocab_mean``/``vocab_std``: log p's mean and spread over the vocabulary at
# each position). ``k``: the fraction of tokens min-k % keeps.


def _lowest_mean(values: np.ndarray, k: float) -> float:
    # At least one token, as Shi et al.'s code and open-unlearning's keep: int(len * k) or 1.
    return float(np.sort(values)[: max(1, int(len(values) * k))].mean())


def min_k_score(logprob: np.ndarray, k: float) -> float:
    """Min-k % prob (Shi et al. 2023, eq. 1): the mean of the lowest ``k`` fraction of token
    log-probs. A member has few surprising tokens."""
    return _lowest_mean(np.asarray(logprob, dtype=np.float64), k)


def min_k_plus_plus_score(logprob: np.ndarray, vocab_mean: np.ndarray, vocab_std: np.ndarray, k: float) -> float:
    """Min-k %++ (Zhang et al. 2024, arXiv 2404.02936, eqs. 2-3): each token's log-prob
    standardized by the mean and spread of log p over the vocabulary at its position (members sit
    at local maxima of the likelihood), then the mean of the lowest ``k`` fraction."""
    z = (np.asarray(logprob, np.float64) - np.asarray(vocab_mean, np.float64)) / np.asarray(vocab_std, np.float64)
    return _lowest_mean(z, k)


def zlib_score(nll: float, text: str) -> float:
    """The zlib ratio (Carlini et al. 2021, section 6.1) negated: the mean token NLL over the
    text's zlib-compressed length in bytes, so that text that is simply easy to predict (a
    repetitive one) is not taken for a member."""
    return -nll / len(zlib.compress(text.encode("utf-8")))


def reference_score(nll: float, reference_nll: float) -> float:
    """The reference attack (Carlini et al. 2021; open-unlearning's ``mia_reference``): how much
    lower the model's NLL is than a reference model's, here the original before unlearning."""
    return reference_nll - nll


def mia_score(auc: float) -> float:
    """1 at chance (AUC 0.5: members look like non-members), 0 at AUC 0 or 1."""
    return 1.0 - 2.0 * abs(auc - 0.5)


def aggregate(task_aggregate_value: float, mmlu_average: float, mia_final_score: float) -> float:
    return (task_aggregate_value + mmlu_average + mia_final_score) / 3.0
