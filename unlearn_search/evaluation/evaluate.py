"""The full SemEval-2025 Task 4 evaluation of one model: task aggregate, MIA, MMLU."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from unlearn_search.data import Benchmark, DataPaths, load_benchmark, load_documents
from unlearn_search.data.benchmark import Item
from unlearn_search.evaluation import metrics
from unlearn_search.evaluation.inference import document_statistics, encode_answers, generate, max_length, sequence_nll
from unlearn_search.evaluation.mmlu import PROMPT_FORMAT, evaluate_mmlu
from unlearn_search.methods.base import setting
from unlearn_search.models.loading import DTYPES

DEFAULT_THRESHOLD_FRACTION = 0.75  # of the original model's MMLU; SemEval fixed 0.371 for its 7B (--mmlu-threshold)


EVAL_SPLITS = ("train", "validation", "all")  # the benchmark items scored


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how; the defaults are the official settings. The declared fields are
    the ``evaluate`` and ``trial`` commands' options."""

    split: str = setting("validation", "the benchmark items scored: `train`, `validation` or both", choices=EVAL_SPLITS)
    max_new_tokens: int = setting(256, "tokens generated per item (256: the official setting)", low=1)
    batch_size: int = setting(32, "items per generation and scoring batch", low=1)
    mmlu_shots: int = setting(5, "MMLU shots (5: the official setting)", low=0)
    mmlu_limit: int | None = setting(None, "MMLU questions per subject (default: all)", low=1, kind=int, nullable=True)
    mmlu_threshold: float | None = setting(
        None,
        "utility threshold (0.371 for the SemEval 7B); default 75% of the original model's MMLU",
        low=0,
        kind=float,
        nullable=True,
    )
    original_mmlu: float | None = setting(
        None,
        "the original model's MMLU average (default: scored, or its target report's)",
        low=0,
        kind=float,
        nullable=True,
    )
    mia_split: str = "train"
    progress: bool = False
    dtype: str = setting(
        "auto",
        "what the model is scored in: auto is bfloat16 on a GPU (as the organizers ran it), float32 on CPU",
        choices=DTYPES,
    )
    mia_k: float = 0.4  # the fraction of tokens min-k % and min-k %++ keep (open-unlearning's setting)


@dataclass(frozen=True)
class EvalData:
    benchmark: Benchmark
    members: list
    nonmembers: list
    # The original model's mean NLL of each MIA document by id, for the reference attack; without
    # it that attack is not scored (its metrics NaN).
    reference_nll: Mapping[str, float] | None = None


def load_eval_data(paths: DataPaths, config: EvalConfig, manifest: dict | None = None) -> EvalData:
    """The items and MIA documents to score; a reference target is scored on what it memorized."""
    benchmark = load_benchmark(paths.benchmark, config.split)
    members = load_documents(paths.benchmark, "member", config.mia_split)
    nonmembers = load_documents(paths.benchmark, "nonmember", config.mia_split)
    if manifest:
        benchmark = benchmark.restricted(manifest["forget_ids"] + manifest["retain_ids"])
        members = [d for d in members if d.id in set(manifest["mia_member_ids"])]
        nonmembers = [d for d in nonmembers if d.id in set(manifest["mia_nonmember_ids"])]
    return EvalData(benchmark, members, nonmembers)


def score_items(model, tokenizer, items: list[Item], config: EvalConfig) -> pd.DataFrame:
    """One row per item in the official prediction-CSV layout, plus its metric values."""
    prompts = [i.input for i in items]
    # Tokenized once for both passes: the prompts start the generations and the answers' NLL.
    prompt_ids, sequences = encode_answers(tokenizer, prompts, [i.output for i in items], max_length(model, tokenizer))
    starts = [len(ids) for ids in prompt_ids]
    outputs = generate(
        model,
        tokenizer,
        prompts,
        config.max_new_tokens,
        config.batch_size,
        config.progress,
        expected_tokens=[len(ids) - n for ids, n in zip(sequences, starts)],
        prompt_ids=prompt_ids,
    )
    nll = sequence_nll(model, sequences, starts, tokenizer.pad_token_id, config.batch_size)
    rows = []
    for item, output, item_nll in zip(items, outputs, nll):
        row = {
            "id": item.id,
            "task": item.task,
            "input": item.input,
            "expected_output": item.output,
            "model_output": output,
            "nll": item_nll,
            "kind": item.kind,
            "set": item.set,
        }
        if item.kind == "sc":
            rouge = metrics.rouge_recall(output, item.output)
            row.update(rougeL_recall=rouge["rougeL"], rouge1_recall=rouge["rouge1"], exact_match=math.nan)
        else:
            row.update(
                rougeL_recall=math.nan, rouge1_recall=math.nan, exact_match=metrics.exact_match(output, item.output)
            )
        rows.append(row)
    return pd.DataFrame(rows)


def score_benchmark(model, tokenizer, benchmark: Benchmark, config: EvalConfig) -> dict[str, pd.DataFrame]:
    """``score_items`` per set (forget, retain), in one pass over both: batches span the two sets,
    so there are fewer of them, each bounded by its longest answer."""
    frame = score_items(model, tokenizer, list(benchmark.forget) + list(benchmark.retain), config)
    return {s: frame[frame.set == s].reset_index(drop=True) for s in ("forget", "retain")}


def summarize_set(frame: pd.DataFrame) -> dict:
    """Overall and per-task regurgitation (ROUGE-L recall, sc) and knowledge (exact match, qa)."""
    sc, qa = frame[frame.kind == "sc"], frame[frame.kind == "qa"]
    summary = {
        "overall-regurgitation-score": metrics.mean(sc.rougeL_recall),
        "overall-rouge1-recall": metrics.mean(sc.rouge1_recall),
        "overall-knowledge-score": metrics.mean(qa.exact_match),
        "mean-nll": metrics.mean(frame.nll),
        # Each answer's geometric-mean token probability, averaged: bounded, where one answer
        # whose NLL explodes under ascent dominates the mean NLL.
        "mean-answer-probability": metrics.mean(np.exp(-frame.nll)),
        "items": int(len(frame)),
    }
    for task in sorted(frame.task.unique()):  # the tasks the set holds, as the official groupby
        summary[task] = {
            metrics.REGURGITATION: metrics.mean(sc[sc.task == task].rougeL_recall),
            metrics.KNOWLEDGE: metrics.mean(qa[qa.task == task].exact_match),
        }
    return summary


def utility_threshold(config: EvalConfig) -> float | None:
    if config.mmlu_threshold is not None:
        return config.mmlu_threshold
    if config.original_mmlu is not None:
        return DEFAULT_THRESHOLD_FRACTION * config.original_mmlu
    return None


def evaluate(
    model,
    tokenizer,
    paths: DataPaths,
    config: EvalConfig,
    manifest: dict | None = None,
    output: str | Path | None = None,
    known_mmlu: float | None = None,
    reference_nll: Mapping[str, float] | None = None,
) -> dict:
    """Score ``model``; write ``evaluation_results.json`` and the prediction CSVs into ``output``.

    ``known_mmlu``: this model's MMLU average on ``config``'s questions, scored before (the
    original's, which the search caches): used as it is instead of scoring MMLU again.
    ``reference_nll``: the original's NLL of each MIA document by id, for the reference attack."""
    data = dataclasses.replace(load_eval_data(paths, config, manifest), reference_nll=reference_nll)
    results, frames = score(model, tokenizer, data, paths.mmlu, config, known_mmlu)
    if output is not None:
        write_results(results, frames, Path(output))
    return results


def score(
    model, tokenizer, data: EvalData, mmlu_dir: str | Path, config: EvalConfig, known_mmlu: float | None = None
) -> tuple[dict, dict]:
    """The evaluation results (``evaluation_results.json``'s layout) and the frames behind them: per
    set (forget, retain) one row per item, per MIA kind (member, nonmember) one row per document.
    With ``known_mmlu`` MMLU is not scored: that average stands, with no per-subject figures."""
    frames = score_benchmark(model, tokenizer, data.benchmark, config)
    results: dict = {f"{s}-set": summarize_set(frames[s]) for s in frames}
    per_task = {s: {t: results[f"{s}-set"][t] for t in frames[s].task.unique()} for s in frames}
    terms = metrics.task_terms(per_task)
    # The official key: the 12 terms of the task harmonic mean, forget ones as 1 - v.
    results["aggregated-terms"] = list(terms.values())
    results["task-terms"] = terms
    results["missing-terms"] = metrics.missing_terms(terms)
    results["harmonic-mean-task-aggregate"] = metrics.task_aggregate(per_task)

    for kind, documents in zip(MIA_KINDS, (data.members, data.nonmembers)):
        frames[kind] = score_documents(model, tokenizer, documents, data.reference_nll, config)
    member_nll, nonmember_nll = frames["member"].nll, frames["nonmember"].nll
    auc = metrics.mia_auc(member_nll, nonmember_nll)
    results["mia_loss_acc"] = auc
    results["mia_final_score"] = metrics.mia_score(auc)
    results["mia_member_mean_nll"] = metrics.mean(member_nll)
    results["mia_nonmember_mean_nll"] = metrics.mean(nonmember_nll)
    results["mia_attacks"] = attack_results(frames["member"], frames["nonmember"])
    results["mia_k"] = config.mia_k

    if known_mmlu is None:
        mmlu = evaluate_mmlu(
            model, tokenizer, mmlu_dir, config.mmlu_shots, config.mmlu_limit, config.batch_size, config.progress
        )
    else:
        mmlu = {"average": known_mmlu, "questions": None, "subjects": {}, "prompt_format": PROMPT_FORMAT}
        results["mmlu_scored_before"] = True
    results["mmlu_average"] = mmlu["average"]
    results["mmlu_questions"] = mmlu["questions"]
    results["mmlu_subjects"] = mmlu["subjects"]
    results["mmlu_prompt_format"] = mmlu["prompt_format"]
    threshold = utility_threshold(config)
    results["mmlu_threshold"] = threshold
    results["passes_utility_threshold"] = None if threshold is None else bool(mmlu["average"] >= threshold)

    parameter = next(model.parameters())
    results["model_dtype"], results["model_device"] = str(parameter.dtype).removeprefix("torch."), parameter.device.type
    final = {k: results[k] for k in ("harmonic-mean-task-aggregate", "mmlu_average", "mia_final_score")}
    results["final-mean-terms"] = final  # ours: the three terms of the aggregate
    results["aggregate-score"] = metrics.aggregate(*final.values())
    return results, frames


# The membership-inference attacks beside the official loss attack (whose AUC and score are
# mia_auc and mia_score): each is reported as an AUC and as the SemEval-style 1 - 2|AUC - 0.5|,
# under ``{prefix}_auc`` and ``{prefix}_score``. A member scores higher under each.
MIA_ATTACKS = {"min_k": "mia_mink", "min_k_plus_plus": "mia_minkpp", "zlib": "mia_zlib", "reference": "mia_reference"}
MIA_ATTACK_METRICS = tuple(f"{prefix}_{kind}" for prefix in MIA_ATTACKS.values() for kind in ("auc", "score"))


def score_documents(model, tokenizer, documents: list, reference_nll: Mapping[str, float] | None, config: EvalConfig):
    """One row per MIA document: its mean token NLL (the official ``nll`` column) and its score
    under each attack of ``MIA_ATTACKS`` (``reference`` NaN without the original's NLLs)."""
    stats = document_statistics(model, tokenizer, [d.text for d in documents], config.batch_size)
    nll = [s.nll for s in stats]
    reference = [math.nan] * len(documents)
    if reference_nll is not None:  # a document the original was not scored on has none (NaN)
        reference = [metrics.reference_score(n, reference_nll.get(d.id, math.nan)) for d, n in zip(documents, nll)]
    return pd.DataFrame(
        {
            "id": [d.id for d in documents],
            "nll": nll,
            "min_k": [metrics.min_k_score(s.logprob, config.mia_k) for s in stats],
            "min_k_plus_plus": [
                metrics.min_k_plus_plus_score(s.logprob, s.vocab_mean, s.vocab_std, config.mia_k) for s in stats
            ],
            "zlib": [metrics.zlib_score(n, d.text) for d, n in zip(documents, nll)],
            "reference": reference,
        }
    )


def attack_results(members: pd.DataFrame, nonmembers: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per attack of ``MIA_ATTACKS``, its AUC and score over the two documents' frames (NaN for an
    attack with no scores)."""
    results = {}
    for attack in MIA_ATTACKS:
        if members[attack].isna().any() or nonmembers[attack].isna().any():
            results[attack] = {"auc": math.nan, "score": math.nan}
            continue
        auc = metrics.membership_auc(members[attack].tolist(), nonmembers[attack].tolist())
        results[attack] = {"auc": auc, "score": metrics.mia_score(auc)}
    return results


# metric_values' names (the two NLLs only where the evaluation computed them): what a finished
# trial reports and what the quick evaluation estimates at each boundary.
METRIC_NAMES = (
    "aggregate",
    "task_aggregate",
    "mia_auc",
    "mia_score",
    "mmlu",
    "forget_regurgitation",
    "forget_knowledge",
    "retain_regurgitation",
    "retain_knowledge",
    "forget_efficacy",
    "retain_utility",
    "forget_nll",
    "retain_nll",
    "forget_signal",
    *MIA_ATTACK_METRICS,
)


def metric_values(results: dict) -> dict[str, float]:
    """The flat metrics of an evaluation (``evaluation_results.json``) under the platform's names:
    what trials report, MLflow logs and a search may optimize."""
    forget, retain = results["forget-set"], results["retain-set"]
    values = {
        "aggregate": results["aggregate-score"],
        "task_aggregate": results["harmonic-mean-task-aggregate"],
        "mia_auc": results["mia_loss_acc"],
        "mia_score": results["mia_final_score"],
        "mmlu": results["mmlu_average"],
        "forget_regurgitation": forget["overall-regurgitation-score"],
        "forget_knowledge": forget["overall-knowledge-score"],
        "retain_regurgitation": retain["overall-regurgitation-score"],
        "retain_knowledge": retain["overall-knowledge-score"],
    }
    for attack, prefix in MIA_ATTACKS.items():
        if attack in results.get("mia_attacks", {}):
            values[f"{prefix}_auc"] = results["mia_attacks"][attack]["auc"]
            values[f"{prefix}_score"] = results["mia_attacks"][attack]["score"]
    values["forget_efficacy"] = 1 - _mean_present(values["forget_regurgitation"], values["forget_knowledge"])
    values["retain_utility"] = _mean_present(values["retain_regurgitation"], values["retain_knowledge"])
    for set_name, summary in (("forget", forget), ("retain", retain)):
        if "mean-nll" in summary:
            values[f"{set_name}_nll"] = summary["mean-nll"]
    if "mean-answer-probability" in forget and "mean-answer-probability" in retain:
        values["forget_signal"] = forget_signal(forget["mean-answer-probability"], retain["mean-answer-probability"])
    return values


def forget_signal(forget_probability: float, retain_probability: float) -> float:
    """``(1 - p_forget) * p_retain`` in [0, 1], ``p`` a set's mean answer probability (each
    answer's geometric-mean token probability): how far the forget answers fell, times how much
    of the retain answers is left. It moves with every trial that changes the model, where the
    aggregate stays at MMLU / 3 until some forget exact match drops (the task's harmonic mean is 0
    while any forget term is 1), so a sampler can climb it."""
    return (1 - forget_probability) * retain_probability


def _mean_present(*values: float) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


PREDICTION_COLUMNS = ["id", "task", "input", "expected_output", "model_output", "nll"]
MIA_KINDS, MIA_COLUMNS = ("member", "nonmember"), ["id", "nll"]
RESULTS_FILE, OFFICIAL_RESULTS_FILE = "evaluation_results.json", "evaluation_results.jsonl"
MIA_DIR, MMLU_METRICS_FILE = "mia_results", "mmlu_metrics.json"


def write_results(results: dict, frames: dict[str, pd.DataFrame], output: Path) -> None:
    """The official scorer's input layout, so that it recomputes our numbers from these files alone:
    ``forget_0.csv`` and ``retain_0.csv`` (one row per item), ``mia_results/member_0.csv`` and
    ``nonmember_0.csv`` (one row per document), an MMLU metrics file with ``average_acc``, and the
    results under both our name and the official ``evaluation_results.jsonl``."""
    output.mkdir(parents=True, exist_ok=True)
    (output / MIA_DIR).mkdir(exist_ok=True)
    for name, frame in frames.items():
        if name in MIA_KINDS:
            frame[MIA_COLUMNS].to_csv(output / MIA_DIR / f"{name}_0.csv", index=False)
        else:
            frame[PREDICTION_COLUMNS].to_csv(output / f"{name}_0.csv", index=False)
    mmlu = {"average_acc": results["mmlu_average"], "subcat_acc": results["mmlu_subjects"]}
    (output / MMLU_METRICS_FILE).write_text(json.dumps(mmlu, indent=2))
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2))
    (output / OFFICIAL_RESULTS_FILE).write_text(json.dumps(results) + "\n")
