import math

import pytest

from unlearn_search.evaluation import metrics


def test_rouge_recall_counts_reference_tokens_and_stems():
    # LCS "the cat sat" = 3 of the reference's 6 tokens.
    assert metrics.rouge_recall("the cat sat", "the cat sat on the mat")["rougeL"] == pytest.approx(0.5)
    # Porter stemming maps "running dogs" and "run dog" to the same tokens.
    assert metrics.rouge_recall("running dogs", "run dog")["rougeL"] == pytest.approx(1.0)
    # ROUGE-1 counts unigrams in any order, ROUGE-L needs them in sequence.
    scores = metrics.rouge_recall("mat the on sat cat the", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] < 1.0


def test_exact_match_strips_and_lowercases_only():
    assert metrics.exact_match("  Hamburg\n", "hamburg") == 1.0
    assert metrics.exact_match("Hamburg.", "Hamburg") == 0.0
    assert metrics.exact_match("New  York", "New York") == 0.0


def test_task_aggregate_is_harmonic_mean_with_forget_inverted():
    scores = {
        "forget": {t: {metrics.REGURGITATION: 0.2, metrics.KNOWLEDGE: 0.5} for t in ("Task1", "Task2", "Task3")},
        "retain": {t: {metrics.REGURGITATION: 0.8, metrics.KNOWLEDGE: 0.4} for t in ("Task1", "Task2", "Task3")},
    }
    terms = [0.8, 0.5] * 3 + [0.8, 0.4] * 3  # forget enters as 1 - v
    expected = 12 / sum(1 / v for v in terms)
    assert metrics.task_aggregate(scores) == pytest.approx(expected)
    assert expected == pytest.approx(12 / (6 * 1.25 + 3 * 2 + 3 * 2.5))


def test_task_aggregate_zero_when_forget_fully_remembered_and_skips_missing():
    scores = {"forget": {"Task1": {metrics.REGURGITATION: 1.0, metrics.KNOWLEDGE: 0.0}},
              "retain": {"Task1": {metrics.REGURGITATION: 1.0, metrics.KNOWLEDGE: float("nan")}}}
    assert metrics.task_aggregate(scores) == 0.0
    partial = {"forget": {"Task1": {metrics.REGURGITATION: 0.5}}, "retain": {"Task1": {metrics.KNOWLEDGE: 0.25}}}
    assert metrics.task_aggregate(partial) == pytest.approx(2 / (2 + 4))


def test_mia_auc_and_score_by_hand():
    members = [0.1, 0.5, 2.0]  # lower NLL: looks like a member
    nonmembers = [1.0, 3.0]
    # Pairs (member, nonmember) ranked right: 0.1<1, 0.1<3, 0.5<1, 0.5<3, 2<3 -> 5 of 6.
    auc = metrics.mia_auc(members, nonmembers)
    assert auc == pytest.approx(5 / 6)
    assert metrics.mia_score(auc) == pytest.approx(1 - 2 * (5 / 6 - 0.5))
    assert metrics.mia_score(0.5) == 1.0
    assert metrics.mia_score(0.0) == metrics.mia_score(1.0) == 0.0


def test_aggregate_is_the_plain_mean():
    assert metrics.aggregate(0.3, 0.6, 0.9) == pytest.approx(0.6)
    assert math.isnan(metrics.mean([]))


def test_a_sets_mean_answer_probability_is_the_mean_of_each_answers_geometric_token_probability():
    import pandas as pd

    from unlearn_search.evaluation.evaluate import summarize_set

    frame = pd.DataFrame({"kind": ["sc", "qa", "qa"], "task": ["Task1", "Task2", "Task3"],
                          "rougeL_recall": [0.5, None, None], "rouge1_recall": [0.5, None, None],
                          "exact_match": [None, 1.0, 0.0], "nll": [0.0, math.log(2), 40.0]})
    summary = summarize_set(frame)
    # exp(-0) = 1, exp(-ln 2) = 0.5, exp(-40) ~ 0: one exploded answer counts once, as ~0.
    assert summary["mean-answer-probability"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert summary["mean-nll"] == pytest.approx((0 + math.log(2) + 40) / 3)
