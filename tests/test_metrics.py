import math
import zlib

import numpy as np
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


def test_task_terms_follow_the_official_order_and_missing_terms_are_said_not_skipped():
    """The official scorer: per set, the tasks it holds (sorted, as groupby), regurgitation then
    knowledge, forget as 1 - v; a task the set lacks has no term; a kind a task lacks is NaN, and
    so is the harmonic mean."""
    scores = {
        "forget": {
            "Task2": {metrics.REGURGITATION: 1.0, metrics.KNOWLEDGE: 0.25},
            "Task1": {metrics.REGURGITATION: 0.5, metrics.KNOWLEDGE: 0.0},
        },
        "retain": {"Task1": {metrics.REGURGITATION: 1.0, metrics.KNOWLEDGE: 0.5}},
    }
    terms = metrics.task_terms(scores)
    assert list(terms) == [
        "forget/Task1/regurgitation-score",
        "forget/Task1/knowledge-score",
        "forget/Task2/regurgitation-score",
        "forget/Task2/knowledge-score",
        "retain/Task1/regurgitation-score",
        "retain/Task1/knowledge-score",
    ]
    assert list(terms.values()) == [0.5, 1.0, 0.0, 0.75, 1.0, 0.5]
    assert metrics.task_aggregate(scores) == 0.0  # forget Task2 regurgitated in full
    scores["forget"]["Task2"][metrics.REGURGITATION] = 0.5
    assert metrics.task_aggregate(scores) == pytest.approx(6 / (2 + 1 + 2 + 4 / 3 + 1 + 2))
    scores["retain"]["Task1"][metrics.KNOWLEDGE] = float("nan")  # no QA item in retain Task1
    assert metrics.missing_terms(metrics.task_terms(scores)) == ["retain/Task1/knowledge-score"]
    assert math.isnan(metrics.task_aggregate(scores))


def test_mia_auc_and_score_by_hand():
    members = [0.1, 0.5, 2.0]  # lower NLL: looks like a member
    nonmembers = [1.0, 3.0]
    # Pairs (member, nonmember) ranked right: 0.1<1, 0.1<3, 0.5<1, 0.5<3, 2<3 -> 5 of 6.
    auc = metrics.mia_auc(members, nonmembers)
    assert auc == pytest.approx(5 / 6)
    assert metrics.mia_score(auc) == pytest.approx(1 - 2 * (5 / 6 - 0.5))
    assert metrics.mia_score(0.5) == 1.0
    assert metrics.mia_score(0.0) == metrics.mia_score(1.0) == 0.0


def test_membership_auc_ranks_higher_scores_as_members():
    # The loss attack's pairs above with scores -NLL: the same 5 of 6.
    assert metrics.membership_auc([-0.1, -0.5, -2.0], [-1.0, -3.0]) == pytest.approx(5 / 6)
    assert metrics.membership_auc([1.0, 1.0], [1.0]) == 0.5  # ties: no information


def test_min_k_keeps_the_lowest_fraction_of_token_logprobs():
    logprob = np.array([-0.1, -2.0, -0.5, -3.0, -0.2])
    assert metrics.min_k_score(logprob, 0.4) == pytest.approx((-3.0 - 2.0) / 2)  # int(5 * 0.4) = 2 tokens
    assert metrics.min_k_score(logprob, 0.1) == pytest.approx(-3.0)  # at least one token
    assert metrics.min_k_score(logprob, 1.0) == pytest.approx(-5.8 / 5)


def test_min_k_plus_plus_standardizes_each_token_by_its_vocabulary_before_keeping_the_lowest():
    logprob = np.array([-1.0, -4.0, -2.0])
    vocab_mean = np.array([-0.5, -3.0, -2.5])
    vocab_std = np.array([0.5, 2.0, 1.0])
    # z = (-1 + 0.5) / 0.5 = -1, (-4 + 3) / 2 = -0.5, (-2 + 2.5) / 1 = 0.5; int(3 * 0.67) = 2 lowest: -1, -0.5.
    assert metrics.min_k_plus_plus_score(logprob, vocab_mean, vocab_std, 0.67) == pytest.approx(-0.75)
    # The second token is the least likely, but the likeliest relative to its position's spread.
    assert metrics.min_k_score(logprob, 0.34) == -4.0
    assert metrics.min_k_plus_plus_score(logprob, vocab_mean, vocab_std, 0.34) == pytest.approx(-1.0)


def test_zlib_score_divides_the_nll_by_the_compressed_length():
    repetitive, varied = "the cat " * 40, " ".join(f"w{i * 7919 % 1000}" for i in range(80))
    assert metrics.zlib_score(2.0, repetitive) == -2.0 / len(zlib.compress(repetitive.encode()))
    # At the same NLL, text that compresses well is the less surprising one: less of a member.
    assert metrics.zlib_score(2.0, repetitive) < metrics.zlib_score(2.0, varied)


def test_reference_score_is_how_far_the_nll_fell_below_the_originals():
    assert metrics.reference_score(1.0, 3.0) == 2.0
    assert metrics.reference_score(3.0, 3.0) == 0.0


def test_vocabulary_moments_are_the_mean_and_spread_of_log_p_under_p():
    import torch

    from unlearn_search.evaluation.inference import _vocab_moments

    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)) * 3
    logprobs = torch.log_softmax(logits, -1)
    mean, std = _vocab_moments(logprobs)
    for b in range(2):
        for t in range(3):
            lp = logprobs[b, t].tolist()
            p = [math.exp(v) for v in lp]
            mu = sum(pi * v for pi, v in zip(p, lp))
            variance = sum(pi * (v - mu) ** 2 for pi, v in zip(p, lp))
            assert mean[b, t].item() == pytest.approx(mu, rel=1e-5)
            assert std[b, t].item() == pytest.approx(math.sqrt(variance), rel=1e-4)
    one_hot = torch.log_softmax(torch.tensor([[[0.0, -1e4, -1e4]]]), -1)
    assert _vocab_moments(one_hot)[1].item() == pytest.approx(1e-3)  # the variance's floor, 1e-6


def test_aggregate_is_the_plain_mean():
    assert metrics.aggregate(0.3, 0.6, 0.9) == pytest.approx(0.6)
    assert math.isnan(metrics.mean([]))


def test_a_sets_mean_answer_probability_is_the_mean_of_each_answers_geometric_token_probability():
    import pandas as pd

    from unlearn_search.evaluation.evaluate import summarize_set

    frame = pd.DataFrame(
        {
            "kind": ["sc", "qa", "qa"],
            "task": ["Task1", "Task2", "Task3"],
            "rougeL_recall": [0.5, None, None],
            "rouge1_recall": [0.5, None, None],
            "exact_match": [None, 1.0, 0.0],
            "nll": [0.0, math.log(2), 40.0],
        }
    )
    summary = summarize_set(frame)
    # exp(-0) = 1, exp(-ln 2) = 0.5, exp(-40) ~ 0: one exploded answer counts once, as ~0.
    assert summary["mean-answer-probability"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert summary["mean-nll"] == pytest.approx((0 + math.log(2) + 40) / 3)


def _word_tokenizer():
    """A real fast tokenizer with one token per word or punctuation mark: token counts by eye."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))  # every word: one token
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_mmlu_prompt_is_open_instructs_text(data_paths):
    from unlearn_search.data.mmlu import load_questions
    from unlearn_search.evaluation.mmlu import prompt

    shot = load_questions(data_paths.mmlu, "abstract_algebra", "dev", 1)
    question = load_questions(data_paths.mmlu, "abstract_algebra", "test", 1)[0]
    # format_subject puts a space before each word: two after "about".
    assert prompt(question, shot) == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )


def test_mmlu_drops_shots_from_the_last_while_the_prompt_is_too_long():
    from unlearn_search.data.mmlu import Question
    from unlearn_search.evaluation.mmlu import fitted_prompt, prompt

    tokenizer = _word_tokenizer()
    shots = [Question("law", f"shot {i} has five words", ("a", "b", "c", "d"), "A") for i in range(5)]
    long = Question("law", " ".join(["word"] * 40), ("a", "b", "c", "d"), "B")
    # Header 10 words; the question 40 + 4 options x 2 + "Answer:" = 49; each shot 5 + 8 + 2 = 15.
    assert len(tokenizer(prompt(long, shots[:2]), add_special_tokens=False)["input_ids"]) == 10 + 2 * 15 + 49
    assert fitted_prompt(tokenizer, long, shots, limit=2048) == (prompt(long, shots), 5)
    assert fitted_prompt(tokenizer, long, shots, limit=10 + 3 * 15 + 49 - 1) == (prompt(long, shots[:2]), 2)
    assert fitted_prompt(tokenizer, long, shots, limit=30) == (prompt(long, []), 0)
