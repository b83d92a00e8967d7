"""The tiny reference target end to end: build, memorization, and ``unlearn-search evaluate``."""

import json
from pathlib import Path

import pandas as pd
import pytest

from unlearn_search.cli import main
from unlearn_search.evaluation import metrics
from unlearn_search.models import PRESETS, read_target_manifest
from unlearn_search.models.target import select_data

pytestmark = pytest.mark.slow


def test_tiny_selection_is_deterministic_and_holds_out_nonmembers(data_paths):
    first, second = select_data(data_paths, PRESETS["tiny"]), select_data(data_paths, PRESETS["tiny"])
    assert first.manifest() == second.manifest()
    assert {i.task for i in first.items if i.set == "forget"} == {"Task1", "Task2", "Task3"}
    assert not {d.id for d in first.members} & {d.id for d in first.nonmembers}
    forget_docs = {i.document_id for i in first.items if i.set == "forget"}
    assert {d.id for d in first.members} & forget_docs  # owners' whole documents are memorized too


def test_tiny_target_memorizes_what_it_was_trained_on(tiny_target, capsys):
    assert main(["target", "build", "--preset", "tiny", "--mmlu-limit", "1"]) == 0
    printed = capsys.readouterr().out
    assert str(tiny_target) in printed and "build time" in printed
    results = json.loads((tiny_target / "target_evaluation.json").read_text())
    for set_name in ("forget-set", "retain-set"):
        assert results[set_name]["overall-regurgitation-score"] >= 0.9, set_name
        assert results[set_name]["overall-knowledge-score"] >= 0.8, set_name
    assert results["mia_loss_acc"] >= 0.9
    manifest = read_target_manifest(tiny_target)
    assert len(manifest["forget_ids"]) == results["forget-set"]["items"]


def test_evaluate_end_to_end_writes_official_files(tiny_target, data_paths, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_target), "--output", str(out), "--split", "train",
                 "--mmlu-limit", "1", "--mmlu-shots", "1", "--data", str(data_paths.root)])
    assert code == 0
    results = json.loads((out / "evaluation_results.json").read_text())
    for key in ("forget-set", "retain-set", "mia_loss_acc", "mmlu_average", "harmonic-mean-task-aggregate",
                "mia_final_score", "aggregate-score", "aggregated-terms"):
        assert key in results
    assert results["mmlu_questions"] == 57
    # The JSON's numbers follow from the prediction CSVs by the official rules.
    forget = pd.read_csv(out / "forget_0.csv", keep_default_na=False)
    assert list(forget.columns) == ["id", "task", "input", "expected_output", "model_output", "nll"]
    sc = forget[forget.id.str[:-1].str[-2:] == "sc"]
    qa = forget[forget.id.str[:-1].str[-2:] == "qa"]
    rouge = [metrics.rouge_recall(str(o), str(e))["rougeL"] for o, e in zip(sc.model_output, sc.expected_output)]
    em = [str(o).strip().lower() == str(e).strip().lower() for o, e in zip(qa.model_output, qa.expected_output)]
    assert results["forget-set"]["overall-regurgitation-score"] == pytest.approx(sum(rouge) / len(rouge))
    assert results["forget-set"]["overall-knowledge-score"] == pytest.approx(sum(em) / len(em))
    terms = results["aggregated-terms"]
    assert results["aggregate-score"] == pytest.approx(sum(terms) / 3)
    assert results["mia_final_score"] == pytest.approx(1 - 2 * abs(results["mia_loss_acc"] - 0.5))
    # The memorized target has not forgotten anything: the task aggregate is near zero.
    assert results["harmonic-mean-task-aggregate"] < 0.1
    assert "aggregate-score" in capsys.readouterr().out


def test_evaluate_refuses_a_missing_model(tmp_path, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "Hugging Face model directory" in err


def test_retrained_gold_standard_never_saw_the_forget_set(tiny_target, data_paths, tmp_path):
    """The retain-only rebuild (bench/baselines.py's gold standard): same tokenizer and items,
    forget answers not regurgitated, retain answers still memorized, members no longer special."""
    from unlearn_search.evaluation import EvalConfig, evaluate
    from unlearn_search.models import load_model, load_tokenizer
    from unlearn_search.models.target import build_retrained

    retrained = build_retrained(data_paths, tiny_target, tmp_path / "retrained", progress=False)
    assert read_target_manifest(retrained)["forget_ids"] == read_target_manifest(tiny_target)["forget_ids"]
    assert (retrained / "tokenizer.json").read_text() == (tiny_target / "tokenizer.json").read_text()
    results = evaluate(load_model(retrained), load_tokenizer(retrained), data_paths,
                       EvalConfig(split="train", max_new_tokens=64, mmlu_limit=1),
                       read_target_manifest(tiny_target))
    assert results["retain-set"]["overall-regurgitation-score"] >= 0.9
    assert results["forget-set"]["overall-regurgitation-score"] <= 0.5
    assert results["forget-set"]["overall-knowledge-score"] <= 0.5
    # Members and non-members look alike again (the original: AUC 1.0, score 0). The tiny
    # target's few MIA documents make the AUC noisy: 0.40 on one machine's build, above 0.5 on another's.
    assert results["mia_final_score"] >= 0.3


def test_batched_inference_equals_one_at_a_time(tiny_target, data_paths):
    """Batching (left padding, rows grouped by expected answer length) changes no output or NLL."""
    from unlearn_search.data import load_benchmark
    from unlearn_search.evaluation.inference import answer_nll, generate
    from unlearn_search.models import load_model, load_tokenizer

    manifest = read_target_manifest(tiny_target)
    items = load_benchmark(data_paths.benchmark, "train").restricted(manifest["forget_ids"][:6] + manifest["retain_ids"][:6])
    items = list(items.forget) + list(items.retain)
    assert {i.kind for i in items} == {"sc", "qa"}
    model, tokenizer = load_model(tiny_target).eval(), load_tokenizer(tiny_target)
    prompts, answers = [i.input for i in items], [i.output for i in items]
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    one = generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=1)
    assert generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=5) == one
    assert generate(model, tokenizer, prompts, max_new_tokens=24, batch_size=5, expected_tokens=lengths) == one
    nll_one = answer_nll(model, tokenizer, prompts, answers, batch_size=1)
    nll_batched = answer_nll(model, tokenizer, prompts, answers, batch_size=5)
    assert max(abs(a - b) for a, b in zip(nll_one, nll_batched)) < 1e-4


def _quick_scores_on_rank(rank: int, init_file: str, model_dir: str, data_root: str, out: str) -> None:
    import torch.distributed as dist

    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation.inference import shared_over_ranks

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    model, tokenizer, data, paths, config = _quick_setup(model_dir, paths_from_root(data_root))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with shared_over_ranks():
        scores = quick_scores_of(model, tokenizer, data, paths, config)
    Path(out, f"{rank}.json").write_text(json.dumps({"scores": scores, "calls": len(calls)}))
    dist.destroy_process_group()


def _quick_setup(model_dir, paths):
    from unlearn_search.evaluation.evaluate import EvalConfig, load_eval_data
    from unlearn_search.evaluation.quick import quick_config, quick_data
    from unlearn_search.models import load_model, load_tokenizer

    final = EvalConfig(split="train", max_new_tokens=12, mmlu_limit=2, batch_size=4, mmlu_shots=1)
    data = quick_data(load_eval_data(paths, final, read_target_manifest(model_dir)), items=14, documents=10)
    return load_model(model_dir), load_tokenizer(model_dir), data, paths, quick_config(final, 12, 2)


def quick_scores_of(model, tokenizer, data, paths, config):
    from unlearn_search.evaluation.quick import quick_scores

    return quick_scores(model, tokenizer, data, paths.mmlu, config)


def test_ranks_share_the_quick_evaluation_and_all_get_the_whole_result(tiny_target, data_paths, tmp_path):
    """On a trial's workers each rank scores its share of every batched loop (generation, answer
    and document likelihoods, MMLU) and all ranks get every result: the same scores as one
    process, for about half the model calls each (ranks short of batches repeat one, unused)."""
    import torch.multiprocessing as mp

    model, tokenizer, data, paths, config = _quick_setup(tiny_target, data_paths)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    alone = quick_scores_of(model, tokenizer, data, paths, config)
    mp.spawn(_quick_scores_on_rank, args=(str(tmp_path / "init"), str(tiny_target), str(data_paths.root),
                                          str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:
        assert rank["scores"] == pytest.approx(alone)
        assert rank["calls"] < 0.75 * len(calls)


def test_quick_scores_are_the_full_evaluation_on_a_subset(tiny_target, data_paths):
    """What a search prunes on estimates the trial's result: on the whole data with the final
    limits, the quick scores equal the full evaluation's metrics, and on a subset they combine
    their own terms the way the final aggregate does."""
    from unlearn_search.evaluation.evaluate import (METRIC_NAMES, EvalConfig, evaluate, load_eval_data,
                                                    metric_values)
    from unlearn_search.evaluation.inference import document_nll
    from unlearn_search.evaluation.quick import quick_config, quick_data, quick_scores
    from unlearn_search.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_target), load_tokenizer(tiny_target)
    manifest = read_target_manifest(tiny_target)
    final = EvalConfig(split="train", max_new_tokens=24, mmlu_limit=2, mmlu_threshold=0.2)
    data = load_eval_data(data_paths, final, manifest)

    whole = quick_scores(model, tokenizer, quick_data(data, 10**6, 10**6), data_paths.mmlu, quick_config(final, 24, 2))
    assert whole == pytest.approx(metric_values(evaluate(model, tokenizer, data_paths, final, manifest)))
    assert set(whole) == set(METRIC_NAMES)  # the names MLflow keeps apart as estimates

    subset = quick_data(data, items=8, documents=6)
    assert [len(subset.benchmark.forget), len(subset.benchmark.retain), len(subset.members), len(subset.nonmembers)] \
        == [4, 4, 3, 3]
    # Fixed (the same items at every boundary) and spread: with split "all" a prefix would hold no
    # validation item.
    assert subset.benchmark.forget == [data.benchmark.forget[i] for i in (0, 5, 10, 15)]
    both = load_eval_data(data_paths, EvalConfig(split="all"), manifest)
    splits = {item.split for item in quick_data(both, items=8, documents=6).benchmark.forget}
    assert splits == {"train", "validation"}, splits
    quick = quick_scores(model, tokenizer, subset, data_paths.mmlu, quick_config(final, 24, 1))
    assert quick["aggregate"] == pytest.approx((quick["task_aggregate"] + quick["mmlu"] + quick["mia_score"]) / 3)
    members = document_nll(model, tokenizer, [d.text for d in subset.members])
    nonmembers = document_nll(model, tokenizer, [d.text for d in subset.nonmembers])
    assert quick["mia_auc"] == pytest.approx(metrics.mia_auc(members, nonmembers))
    assert quick["mia_score"] == pytest.approx(1 - 2 * abs(quick["mia_auc"] - 0.5))
