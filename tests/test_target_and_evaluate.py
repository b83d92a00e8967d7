"""The tiny reference target end to end: build, memorization, and ``unlearn-search evaluate``."""

import collections
import dataclasses
import json
import math
import zlib
from pathlib import Path

import numpy as np
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


def _official_scores(output: Path) -> dict:
    """The organizers' evaluate_generations.py formulas, rewritten here from its text and run on
    the written files alone (read as it reads them, ``pd.read_csv`` with its defaults)."""
    from statistics import harmonic_mean

    from rouge_score import rouge_scorer
    from sklearn.metrics import auc, roc_curve

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    results, terms = {}, []
    for split in ("forget", "retain"):
        df = pd.concat([pd.read_csv(f) for f in sorted(output.glob(f"{split}_*.csv"))], ignore_index=True)
        df["regurgitation-score"], df["knowledge-score"] = None, None
        for i, (gen, gt) in enumerate(zip(df["model_output"], df["expected_output"])):
            if df.loc[i, "id"][:-1].endswith("sc"):
                df.loc[i, "regurgitation-score"] = scorer.score(str(gt), str(gen))["rougeL"].recall
            elif df.loc[i, "id"][:-1].endswith("qa"):
                df.loc[i, "knowledge-score"] = int(str(gt).strip().lower() == str(gen).strip().lower())
        per_task = df.groupby("task")[["regurgitation-score", "knowledge-score"]].mean().to_dict(orient="index")
        values = [float(v) for inner in per_task.values() for v in inner.values()]
        terms += [1 - v for v in values] if split == "forget" else values
        results[split] = {
            "regurgitation": np.mean(df["regurgitation-score"]),
            "knowledge": np.mean(df["knowledge-score"]),
        }
    nll = {
        kind: pd.concat([pd.read_csv(f) for f in sorted((output / "mia_results").glob(f"{kind}_*.csv"))])[
            "nll"
        ].tolist()
        for kind in ("member", "nonmember")
    }
    fp, tp, _ = roc_curve(
        [1] * len(nll["member"]) + [0] * len(nll["nonmember"]), -np.array(nll["member"] + nll["nonmember"])
    )
    mia_auc = float(auc(fp, tp))
    mmlu = json.loads((output / "mmlu_metrics.json").read_text())["average_acc"]
    task = harmonic_mean(terms)
    mia_final = 1 - abs(mia_auc - 0.5) * 2
    return {
        "terms": terms,
        "task": task,
        "mia_auc": mia_auc,
        "mia_final": mia_final,
        "mmlu": mmlu,
        "aggregate": (task + mmlu + mia_final) / 3,
        "sets": results,
    }


def test_evaluate_writes_what_the_official_scorer_recomputes_exactly(tiny_target, data_paths, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--model",
            str(tiny_target),
            "--output",
            str(out),
            "--split",
            "train",
            "--mmlu-limit",
            "1",
            "--mmlu-shots",
            "1",
            "--data",
            str(data_paths.root),
            "--reference",
            str(tiny_target),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "MIA AUC by attack: loss" in printed
    manifest = read_target_manifest(tiny_target)
    assert f"{len(manifest['mia_member_ids'])} MIA members" in printed and "those the target memorized" in printed
    results = json.loads((out / "evaluation_results.json").read_text())
    assert json.loads((out / "evaluation_results.jsonl").read_text()) == results
    assert results["mmlu_questions"] == 57
    assert list(pd.read_csv(out / "forget_0.csv").columns) == [
        "id",
        "task",
        "input",
        "expected_output",
        "model_output",
        "nll",
    ]
    assert list(pd.read_csv(out / "mia_results" / "member_0.csv").columns) == ["id", "nll"]
    official = _official_scores(out)
    assert len(official["terms"]) == 12 and results["missing-terms"] == []
    assert results["aggregated-terms"] == pytest.approx(official["terms"], abs=1e-9)
    assert results["harmonic-mean-task-aggregate"] == pytest.approx(official["task"], abs=1e-9)
    assert results["mia_loss_acc"] == pytest.approx(official["mia_auc"], abs=1e-9)
    assert results["mia_final_score"] == pytest.approx(official["mia_final"], abs=1e-9)
    assert results["mmlu_average"] == pytest.approx(official["mmlu"], abs=1e-9)
    assert results["aggregate-score"] == pytest.approx(official["aggregate"], abs=1e-9)
    # The target scored against itself as the reference: every document's score ties at 0.
    assert results["mia_attacks"]["reference"] == {"auc": 0.5, "score": 1.0}
    for set_name, scores in official["sets"].items():
        assert results[f"{set_name}-set"]["overall-regurgitation-score"] == pytest.approx(
            scores["regurgitation"], abs=1e-9
        )
        assert results[f"{set_name}-set"]["overall-knowledge-score"] == pytest.approx(scores["knowledge"], abs=1e-9)
    assert list(results["final-mean-terms"].values()) == [
        results["harmonic-mean-task-aggregate"],
        results["mmlu_average"],
        results["mia_final_score"],
    ]
    # The memorized target has not forgotten anything: the task aggregate is near zero.
    assert results["harmonic-mean-task-aggregate"] < 0.1
    assert "aggregate-score" in printed


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
    results = evaluate(
        load_model(retrained),
        load_tokenizer(retrained),
        data_paths,
        EvalConfig(split="train", max_new_tokens=64, mmlu_limit=1),
        read_target_manifest(tiny_target),
    )
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
    items = load_benchmark(data_paths.benchmark, "train").restricted(
        manifest["forget_ids"][:6] + manifest["retain_ids"][:6]
    )
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
    # Generation stops at the checkpoint's own EOS (its generation_config), as the official scorer's.
    continuation = tokenizer(one[0], add_special_tokens=False)["input_ids"]
    stop = next(k for k in range(2, len(continuation)) if continuation[k] not in continuation[:k])
    model.generation_config.eos_token_id = continuation[stop]
    assert generate(model, tokenizer, prompts[:1], max_new_tokens=24) == [tokenizer.decode(continuation[: stop + 1])]


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
    mp.spawn(
        _quick_scores_on_rank,
        args=(str(tmp_path / "init"), str(tiny_target), str(data_paths.root), str(tmp_path)),
        nprocs=2,
    )
    ranks = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert math.isnan(alone["mia_reference_auc"])  # no original's NLLs given: the reference attack is NaN
    for rank in ranks:
        assert rank["scores"] == pytest.approx(alone, nan_ok=True)
        assert rank["calls"] < 0.75 * len(calls)


def test_quick_scores_are_the_full_evaluation_on_a_subset(tiny_target, data_paths):
    """What a search prunes on estimates the trial's result: on the whole data with the final
    limits, the quick scores equal the full evaluation's metrics, and on a subset they combine
    their own terms the way the final aggregate does."""
    from unlearn_search.evaluation.evaluate import METRIC_NAMES, EvalConfig, evaluate, load_eval_data, metric_values
    from unlearn_search.evaluation.inference import document_nll, document_statistics
    from unlearn_search.evaluation.quick import quick_config, quick_data, quick_scores
    from unlearn_search.evaluation.reference import original_nll
    from unlearn_search.models import load_model, load_tokenizer

    model, tokenizer = load_model(tiny_target), load_tokenizer(tiny_target)
    manifest = read_target_manifest(tiny_target)
    final = EvalConfig(split="train", max_new_tokens=24, mmlu_limit=2, mmlu_threshold=0.2)
    # The target as its own reference, scored as the evaluation scores: every reference score ties.
    reference = original_nll(tiny_target, data_paths, final)
    data = dataclasses.replace(load_eval_data(data_paths, final, manifest), reference_nll=reference)

    whole = quick_scores(model, tokenizer, quick_data(data, 10**6, 10**6), data_paths.mmlu, quick_config(final, 24, 2))
    full = metric_values(evaluate(model, tokenizer, data_paths, final, manifest, reference_nll=reference))
    assert whole == pytest.approx(full)
    assert set(whole) == set(METRIC_NAMES)  # the names MLflow keeps apart as estimates
    assert whole["mia_reference_auc"] == 0.5 and whole["mia_reference_score"] == 1.0
    # The other attacks by hand from the documents' token log-probs.
    members = document_statistics(model, tokenizer, [d.text for d in data.members])
    nonmembers = document_statistics(model, tokenizer, [d.text for d in data.nonmembers])

    def hand_min_k(stats, k=0.4):
        values = sorted(stats.logprob.tolist())
        return sum(values[: max(1, int(len(values) * k))]) / max(1, int(len(values) * k))

    def hand_zlib(stats, document):
        return -float(-stats.logprob.mean()) / len(zlib.compress(document.text.encode("utf-8")))

    min_k = metrics.membership_auc([hand_min_k(m) for m in members], [hand_min_k(n) for n in nonmembers])
    assert whole["mia_mink_auc"] == pytest.approx(min_k)
    zlib_auc = metrics.membership_auc(
        [hand_zlib(m, d) for m, d in zip(members, data.members)],
        [hand_zlib(n, d) for n, d in zip(nonmembers, data.nonmembers)],
    )
    assert whole["mia_zlib_auc"] == pytest.approx(zlib_auc)
    # The memorized target gives its members away to every attack but the reference.
    for name in ("mia_auc", "mia_mink_auc", "mia_minkpp_auc", "mia_zlib_auc"):
        assert whole[name] >= 0.8, name

    subset = quick_data(data, items=16, documents=6)
    assert [
        len(subset.benchmark.forget),
        len(subset.benchmark.retain),
        len(subset.members),
        len(subset.nonmembers),
    ] == [8, 8, 3, 3]
    # Every task and kind of each set (each term of the task harmonic mean), shared evenly.
    for items in (subset.benchmark.forget, subset.benchmark.retain):
        groups = collections.Counter((i.task, i.kind) for i in items)
        assert set(groups) == {(t, k) for t in ("Task1", "Task2", "Task3") for k in ("sc", "qa")}, groups
        assert max(groups.values()) - min(groups.values()) <= 1, groups
    # What a group cannot take goes to the others: the train split's forget set has 10 Task2 QA
    # items and 2 of each other group, so 16 items are 5 x 2 and 6 of Task2 QA.
    larger = collections.Counter((i.task, i.kind) for i in quick_data(data, items=32, documents=6).benchmark.forget)
    assert sum(larger.values()) == 16 and larger[("Task2", "qa")] == 6, larger
    assert subset == quick_data(data, items=16, documents=6)  # fixed: the same items at every boundary
    # Spread within each group: with split "all" a prefix would hold no validation item.
    both = load_eval_data(data_paths, EvalConfig(split="all"), manifest)
    splits = {item.split for item in quick_data(both, items=24, documents=6).benchmark.forget}
    assert splits == {"train", "validation"}, splits
    quick = quick_scores(model, tokenizer, subset, data_paths.mmlu, quick_config(final, 24, 1))
    assert quick["aggregate"] == pytest.approx((quick["task_aggregate"] + quick["mmlu"] + quick["mia_score"]) / 3)
    members = document_nll(model, tokenizer, [d.text for d in subset.members])
    nonmembers = document_nll(model, tokenizer, [d.text for d in subset.nonmembers])
    assert quick["mia_auc"] == pytest.approx(metrics.mia_auc(members, nonmembers))
    assert quick["mia_score"] == pytest.approx(1 - 2 * abs(quick["mia_auc"] - 0.5))


BUILD_ONE = """
import dataclasses, json, sys, time
from unlearn_search.data import resolve_data
from unlearn_search.models import PRESETS, build_target
preset = dataclasses.replace(PRESETS["tiny"], name="micro", documents=1, mia_documents=2, vocab_size=512,
                             hidden_size=32, layers=1, heads=2, max_length=128, epochs=20)
directory = build_target(resolve_data(sys.argv[1]), preset, output=sys.argv[2], progress=False)
print(json.dumps({"built_seconds": json.loads(open(f"{directory}/unlearn_target.json").read())["build_seconds"]}))
"""


def test_two_processes_started_together_build_a_shared_target_once(data_paths, tmp_path):
    """The user cache is shared by every search on a machine: a target (or a report, the
    original's MMLU, a teacher cache) is built under a lock, and the process that waited finds
    the finished build instead of building it again over the first one's files."""
    import subprocess
    import sys

    target = tmp_path / "micro"
    command = [sys.executable, "-c", BUILD_ONE, str(data_paths.root), str(target)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    done = [run.communicate(timeout=600) + (run.returncode,) for run in runs]
    assert [code for _, _, code in done] == [0, 0], [err[-2000:] for _, err, _ in done]
    waited = [out for out, _, _ in done if "waiting for another process building the micro target" in out]
    assert len(waited) == 1, [out for out, _, _ in done]
    # Both got the one build: the same manifest, the waiting one never started its own.
    assert len({json.loads(out.strip().splitlines()[-1])["built_seconds"] for out, _, _ in done}) == 1
    assert not list(tmp_path.glob("*.partial"))
