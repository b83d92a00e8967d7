"""A trial on a real local Ray cluster: 2 Ray Train workers hosting DeepSpeed ZeRO-3 shards."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from unlearn_search.cli import main
from unlearn_search.evaluation.evaluate import EvalConfig, load_eval_data
from unlearn_search.evaluation.quick import quick_config, quick_data, quick_scores
from unlearn_search.models import load_model, load_tokenizer, read_target_manifest
from unlearn_search.training.trial import Resources, evaluate_checkpoint, read_metrics_log, run_trial, time_spent

pytestmark = pytest.mark.slow
SPACE = Path(__file__).resolve().parent / "spaces" / "tiny_gd.yaml"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from unlearn_search.training.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_two_worker_zero3_trial_with_teacher(ray_cluster, tiny_target, data_paths, tmp_path, capsys):
    out = tmp_path / "trial"
    code = main(
        [
            "trial",
            "--model",
            str(tiny_target),
            "--method",
            "ga_kl",
            "--set",
            "lr=5e-4",
            "--set",
            "epochs=3",
            "--workers",
            "2",
            "--zero-stage",
            "3",
            "--mmlu-limit",
            "1",
            "--mmlu-shots",
            "1",
            "--max-new-tokens",
            "64",
            "--eval-items",
            "8",
            "--eval-documents",
            "4",
            "--eval-max-new-tokens",
            "16",
            "--data",
            str(data_paths.root),
            "--output",
            str(out),
        ]
    )
    assert code == 0
    reports = read_metrics_log(out / "metrics.jsonl")
    boundaries = [r for r in reports if not r["trained"]]
    assert [r["boundary"] for r in boundaries] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all("retain_kl" in r and "forget_neg_ce" in r for r in boundaries)  # the teacher's KL was computed
    # Each boundary estimates the trial's result (what a search prunes on), not only the task terms.
    assert all(0 <= r["aggregate"] <= 1 and 0 <= r["mia_auc"] <= 1 and 0 <= r["mmlu"] <= 1 for r in boundaries)
    # dtype auto on CPU workers: float32, on the engine's own shards (no whole copy on rank 0).
    assert {(r["eval_device"], r["eval_dtype"]) for r in boundaries} == {("cpu", "float32")}
    assert all(r["gathered_parameters"] == 0 for r in boundaries)  # keep_best off: nothing gathered
    results = json.loads((out / "evaluation_results.json").read_text())
    assert (results["model_device"], results["model_dtype"]) == ("cpu", "float32")
    assert results["forget-set"]["overall-regurgitation-score"] < 0.9  # the memorized target was at ~1.0
    assert results["retain-set"]["overall-regurgitation-score"] > 0.8
    model = load_model(out / "model")  # a plain Hugging Face checkpoint
    assert type(model).__name__ == "OlmoForCausalLM"
    assert read_target_manifest(out / "model") == read_target_manifest(tiny_target)  # scored on the same items
    assert (out / "mia_results" / "nonmember_0.csv").exists()  # the official scorer's MIA input
    assert "aggregate-score" in capsys.readouterr().out
    # The last boundary is the trial's evaluation, run by the two workers on the model they
    # trained (each its share of the batches): it scores what the exported checkpoint scores in
    # one process, item by item.
    assert "eval_seconds" not in boundaries[-1] and boundaries[-1]["evaluation_seconds"] > 0
    assert boundaries[-1]["aggregate"] == pytest.approx(results["aggregate-score"], abs=1e-9)
    config = EvalConfig(
        split="train", max_new_tokens=64, mmlu_limit=1, mmlu_shots=1, mmlu_threshold=results["mmlu_threshold"]
    )
    again = evaluate_checkpoint(out / "model", tiny_target, data_paths.root, config, tmp_path / "again")
    for name in ("forget_0.csv", "retain_0.csv"):
        ours, theirs = pd.read_csv(out / name), pd.read_csv(tmp_path / "again" / name)
        assert ours.model_output.fillna("").tolist() == theirs.model_output.fillna("").tolist(), name
        assert ours.nll.tolist() == pytest.approx(theirs.nll.tolist(), rel=1e-4), name
    for key in ("aggregate-score", "harmonic-mean-task-aggregate", "mia_loss_acc", "mmlu_average"):
        assert results[key] == pytest.approx(again[key], abs=1e-6), key


def test_the_quick_evaluation_on_the_gathered_student_equals_the_sharded_one(
    ray_cluster, tiny_target, data_paths, tmp_path
):
    """``resources.eval_gather`` (DeepSpeed's ``unwrap_model_for_generation`` around the quick
    evaluation) changes no estimate, and the training after it (hooks put back, parameters
    partitioned again) takes the same steps: the next boundaries and the model agree too."""
    settings = {"method": "gd", "lr": 5e-4, "epochs": 2, "seed": 0}
    runs = {}
    for gather in (False, True):
        resources = Resources(
            workers=2, zero_stage=3, eval_gather=gather, eval_items=8, eval_documents=4, eval_max_new_tokens=16
        )
        out = tmp_path / f"gather_{gather}"
        run_trial(tiny_target, data_paths.root, settings, out, resources, None, name="g", export=False)
        reports = read_metrics_log(out / "metrics.jsonl")
        runs[gather] = [r for r in reports if not r["trained"]]
    assert [r["boundary"] for r in runs[True]] == [r["boundary"] for r in runs[False]] == ["epoch 1", "epoch 2"]
    names = ("aggregate", "forget_regurgitation", "retain_regurgitation", "mia_auc", "mmlu", "forget_nll")
    for sharded, gathered in zip(runs[False], runs[True]):
        for name in names:
            assert gathered[name] == pytest.approx(sharded[name], abs=1e-6), (sharded["boundary"], name)
    assert runs[True][-1]["forget_nll"] != runs[True][0]["forget_nll"]  # training went on between them


def test_an_rmu_trial_steers_through_zero3_shards_as_one_process_does(ray_cluster, tiny_target, data_paths, tmp_path):
    """RMU on 2 ZeRO-3 workers with a live ZeRO-3 teacher: the layer's hidden states come from
    forward hooks on partitioned modules, and each boundary's losses are those of the same run in
    one plain process; only the modules RMU names train (``trainable: method``)."""
    import torch

    from unlearn_search.training.config import trial_config
    from unlearn_search.training.unlearn import unlearn

    settings = {"method": "rmu", "layer": 2, "trained_layers": 2, "trainable": "method", "lr": 1e-2, "epochs": 2}
    out = tmp_path / "trial"
    run_trial(tiny_target, data_paths.root, settings, out, Resources(workers=2, eval_items=4, eval_max_new_tokens=8))
    boundaries = [r for r in read_metrics_log(out / "metrics.jsonl") if not r["trained"]]
    _, _, alone = unlearn(tiny_target, data_paths, trial_config(settings))
    assert [r["boundary"] for r in boundaries] == [r.boundary for r in alone.reports] == ["epoch 1", "epoch 2"]
    for trial, single in zip(boundaries, alone.reports):
        for name in ("loss", "forget_steer", "retain_activation"):
            assert trial[name] == pytest.approx(single.losses[name], rel=1e-3), (trial["boundary"], name)
    original, trained = load_model(tiny_target).state_dict(), load_model(out / "model").state_dict()
    changed = {name for name, value in trained.items() if not torch.equal(value, original[name])}
    assert changed == {f"model.layers.{i}.mlp.down_proj.weight" for i in (1, 2)}


def test_a_bf16_lora_trial_gathers_only_its_adapters_and_scores_in_bf16(ray_cluster, tiny_target, data_paths, tmp_path):
    """dtype: bfloat16 reaches DeepSpeed (bf16 engines), the quick estimates (on the engine's own
    shards) and the full evaluation, on CPU too; keep_best's boundary gathers and the export
    move only the LoRA adapters; the teacher is the student's base with the adapters off (no
    second copy), and the written model carries the target's manifest."""
    from safetensors import safe_open

    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.models.trainable import prepare_trainable
    from unlearn_search.training.trial import TRAINED_DIR

    out = tmp_path / "trial"
    settings = {
        "method": "ga_kl",
        "lr": 5e-4,
        "epochs": 2,
        "trainable": "lora",
        "lora_rank": 8,
        "keep_best": True,
        "dtype": "bfloat16",
        "max_length": 64,  # bf16 runs some 20x slower than fp32 on CPUs without bf16 units
    }
    result = run_trial(
        tiny_target,
        data_paths.root,
        settings,
        out,
        Resources(workers=2, eval_items=8, eval_documents=4, eval_max_new_tokens=8),
        EvalConfig(mmlu_limit=1, mmlu_shots=0, max_new_tokens=16),
    )
    adapters = {
        name: p.numel()
        for name, p in prepare_trainable(load_model(tiny_target), "lora", lora_rank=8).named_parameters()
        if p.requires_grad
    }
    boundaries = [r for r in result.metrics_history if not r["trained"]]
    assert {(r["eval_device"], r["eval_dtype"]) for r in boundaries} == {("cpu", "bfloat16")}
    assert boundaries[0]["gathered_parameters"] == sum(adapters.values())  # the first boundary always wins
    assert boundaries[0]["teacher_parameters"] == 0  # the teacher is the student's base, adapters off
    assert sum(adapters.values()) < 0.1 * sum(p.numel() for p in load_model(tiny_target).parameters())
    written = set()
    for file in (out / TRAINED_DIR).glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            written |= set(handle.keys())
    assert written == set(adapters) and all(".lora_" in name for name in written)
    assert (result.evaluation["model_device"], result.evaluation["model_dtype"]) == ("cpu", "bfloat16")
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    assert read_target_manifest(out / "model") == read_target_manifest(tiny_target)
    # Where the time went: phases that do not overlap, each measured, together within the wall time.
    spent = time_spent(result)
    assert all(
        spent[name] > 0
        for name in (
            "training steps",
            "quick evaluations",
            "checkpoints",
            "models and DeepSpeed initialization",
            "Ray Train and worker start-up",
            "full evaluation",
        )
    )
    assert 0 <= spent["other"] < 0.2 * result.seconds, spent


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_killed_worker_resumes_from_its_last_checkpoint(ray_cluster, tiny_target, data_paths, tmp_path):
    out = tmp_path / "trial"
    # last_k: keep_best copies only the trained layers, and the written model must still be the kept one.
    settings = {"method": "gd", "lr": 3e-4, "epochs": 4, "keep_best": True, "trainable": "last_k", "last_k": 2}
    # Every boundary evaluated and checkpointed: 4 boundaries, 1/4 of training apart.
    resources = Resources(workers=2, eval_every=0, eval_items=8, eval_documents=4, eval_max_new_tokens=16)
    outcome = {}

    def run():
        try:
            outcome["result"] = run_trial(tiny_target, data_paths.root, settings, out, resources)
        except BaseException as error:  # noqa: BLE001 - surfaced by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        reports = read_metrics_log(out / "metrics.jsonl")
        if any(r.get("step", 0) >= 6 and not r["trained"] for r in reports):  # two checkpoints written
            workers = _train_workers()
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.5)
    thread.join(timeout=600)
    assert killed is not None, "no checkpoint was reported before the run ended"
    assert "error" not in outcome, outcome.get("error")
    reports = read_metrics_log(out / "metrics.jsonl")
    resumed = [r for r in reports if r["resumed_from"] >= 0]
    assert resumed, reports
    start = resumed[0]["resumed_from"]
    assert start >= 6  # it continued from a checkpoint instead of starting over
    assert min(r["step"] for r in resumed) > start
    assert reports[-1]["trained"] and reports[-1]["step"] == 12
    boundaries = [r["step"] for r in reports if not r["trained"]]
    assert boundaries.count(3) == 1  # epoch 1 was never trained twice

    # keep_best: the model holds the boundary with the highest estimate (ties: the later), kept
    # across the killed worker: its quick scores are the ones that boundary reported.
    estimates = {r["step"]: r for r in reports if not r["trained"]}  # a boundary redone after the kill: its last
    kept = max(sorted(estimates), key=lambda step: estimates[step]["aggregate"] + 1e-12 * step)
    assert reports[-1]["kept_step"] == outcome["result"].kept_step == kept
    quick = quick_config(EvalConfig(), resources.eval_max_new_tokens, resources.eval_mmlu_limit)
    data = quick_data(
        load_eval_data(data_paths, quick, read_target_manifest(tiny_target)),
        resources.eval_items,
        resources.eval_documents,
    )
    scores = quick_scores(load_model(out / "model"), load_tokenizer(out / "model"), data, data_paths.mmlu, quick)
    for name in ("aggregate", "forget_regurgitation", "retain_regurgitation", "forget_nll", "retain_nll"):
        assert scores[name] == pytest.approx(estimates[kept][name], abs=1e-6), (name, kept, estimates)


@pytest.mark.parametrize(
    "estimates,kept", [([0.1, 0.3, 0.3, 0.2], 3), ([0.2, float("nan"), 0.1], 1), ([float("nan"), float("nan")], 2)]
)
def test_keep_best_holds_the_best_boundary_ties_to_the_later(estimates, kept, tmp_path):
    import torch

    from unlearn_search.training.trial import KeptBoundary

    model, boundary = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Linear(1, 1)), KeptBoundary()
    model[1].requires_grad_(False)  # frozen (last_k, LoRA's base): never moves, so never copied
    for step, estimate in enumerate(estimates, 1):
        with torch.no_grad():
            model[0].weight.fill_(step)
        boundary.offer(step, estimate, model)
    assert boundary.step == kept and torch.all(boundary.state["0.weight"] == kept)
    assert sorted(boundary.state) == ["0.bias", "0.weight"]
    boundary.save(tmp_path)
    resumed = KeptBoundary()
    resumed.load(tmp_path)
    assert resumed.step == kept and torch.equal(resumed.state["0.weight"], boundary.state["0.weight"])
    best = max((e for e in estimates if e == e), default=float("-inf"))
    assert resumed.offer(9, 0.25, model) == (0.25 >= best)  # a resumed run compares with what it had kept


def test_a_boundary_is_evaluated_every_eval_every_percent_of_training_and_always_at_the_end():
    from unlearn_search.training.trial import evaluation_due

    # SUGD with 13 chunks of 4 steps (52 steps), every 20 %: boundaries at 4, 8, ..., 52.
    evaluated, last = [], 0
    for step in range(4, 53, 4):
        if evaluation_due(step, last, 52, 20.0):
            evaluated.append(step)
            last = step
    assert evaluated == [12, 24, 36, 48, 52]  # 12/52 = 23 % >= 20 %; 8/52 = 15 % is not
    assert all(evaluation_due(step, step - 4, 52, 0.0) for step in range(4, 53, 4))  # 0: every boundary
    assert evaluation_due(52, 48, 52, 100.0) and not evaluation_due(48, 0, 52, 100.0)  # 100: the last only


def test_the_utility_threshold_compares_mmlu_on_the_same_questions(tiny_target, data_paths, tmp_path, monkeypatch):
    """A student's MMLU is held against the original's on the same questions: the target's own
    report when it scored those (one per subject here), else the original scored now (and kept
    in the user cache, not the report's figure, which is read again each time)."""
    import shutil

    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.evaluation.baseline import original_mmlu
    from unlearn_search.evaluation.mmlu import PROMPT_FORMAT, evaluate_mmlu
    from unlearn_search.models import load_tokenizer

    monkeypatch.setenv("UNLEARN_SEARCH_CACHE", str(tmp_path / "cache"))

    target = tmp_path / "target"
    shutil.copytree(tiny_target, target)
    report = {"mmlu_average": 0.5, "mmlu_questions": 57, "mmlu_prompt_format": PROMPT_FORMAT}
    (target / "target_evaluation.json").write_text(json.dumps(report))
    assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=1)) == 0.5
    scored = evaluate_mmlu(load_model(tiny_target), load_tokenizer(tiny_target), data_paths.mmlu, 5, 2, 32)
    assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=2)) == pytest.approx(scored["average"])
    # A report from before the prompt followed Open-Instruct (no format, or another): scored again.
    one = evaluate_mmlu(load_model(tiny_target), load_tokenizer(tiny_target), data_paths.mmlu, 5, 1, 32)["average"]
    for stale in (
        {k: v for k, v in report.items() if k != "mmlu_prompt_format"},
        {**report, "mmlu_prompt_format": "x"},
    ):
        (target / "target_evaluation.json").write_text(json.dumps(stale))
        assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=1)) == pytest.approx(one)
    # Other shots than the report's: scored again.
    zero_shot = evaluate_mmlu(load_model(tiny_target), load_tokenizer(tiny_target), data_paths.mmlu, 0, 1, 32)
    assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=1, mmlu_shots=0)) == pytest.approx(
        zero_shot["average"]
    )


def test_a_search_keeps_the_original_mmlu_per_question_set(ray_cluster, tiny_target, data_paths, tmp_path, monkeypatch):
    """Scoring the original on all of MMLU takes minutes: a search scores it on the cluster once,
    keeps it in its output and in the user cache, and a later search of the same checkpoint
    reuses it, also when its own copy is damaged."""
    from unlearn_search.evaluation.baseline import ORIGINAL_MMLU_FILE
    from unlearn_search.evaluation.mmlu import evaluate_mmlu
    from unlearn_search.models import load_tokenizer
    from unlearn_search.search import driver
    from unlearn_search.search.space import load_space
    from unlearn_search.training import trial

    monkeypatch.setenv("UNLEARN_SEARCH_CACHE", str(tmp_path / "cache"))
    space = load_space(SPACE)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    scored = driver.original_mmlu(tiny_target, data_paths.root, space, first, 2)
    expected = evaluate_mmlu(load_model(tiny_target), load_tokenizer(tiny_target), data_paths.mmlu, 5, 2, 32)
    assert scored == pytest.approx(expected["average"])
    assert driver.mmlu_threshold(tiny_target, data_paths.root, space, first, 2) == pytest.approx(0.75 * scored)

    def no_scoring(*args):
        raise AssertionError("scored again")

    monkeypatch.setattr(trial, "on_cluster", no_scoring)
    (second / ORIGINAL_MMLU_FILE).write_text("{")  # damaged: read from the user cache instead
    assert driver.original_mmlu(tiny_target, data_paths.root, space, second, 2) == scored
    for output in (first, second, tmp_path / "cache"):
        entries = json.loads((output / ORIGINAL_MMLU_FILE).read_text())
        assert [(e["key"]["limit"], e["mmlu_average"]) for e in entries] == [(2, scored)]
    with pytest.raises(AssertionError, match="scored again"):  # other questions: scored
        driver.original_mmlu(tiny_target, data_paths.root, space, second, 3)


def test_cluster_work_fits_one_node_when_the_workers_spread_over_several(ray_cluster):
    """Four spread workers of one CPU each hold more than this 2-CPU node has: the evaluation
    (and the original's MMLU) must take what one node has instead of waiting forever."""
    from unlearn_search.training.trial import on_cluster

    done: dict = {}
    runner = threading.Thread(
        target=lambda: done.update(
            pid=on_cluster(Resources(workers=4, cpus_per_worker=1, placement="spread"), os.getpid)
        ),
        daemon=True,
    )
    runner.start()
    runner.join(timeout=120)
    assert done.get("pid", os.getpid()) != os.getpid(), "the task never ran"


def test_the_lr_range_test_finds_where_the_forget_nll_rises_and_fits_the_space_to_it(
    ray_cluster, tiny_target, data_paths, tmp_path, capsys
):
    """Two ZeRO-3 workers ramp the first start's lr over params.lr: gradient difference at lr up to
    1 must raise the forget NLL; the searched range is placed around where it did, the start moved
    into it, and the record kept (a second call reads it back instead of running again)."""
    import yaml

    from unlearn_search.search.driver import fitted_space
    from unlearn_search.search.lr_range import RANGE_FILE
    from unlearn_search.search.space import parse_space

    raw = yaml.safe_load(SPACE.read_text())
    raw["params"]["lr"] = {"distribution": "float", "log": True, "low": 1e-5, "high": 1.0}
    raw["starts"] = [{"lr": 1e-5, "epochs": 1, "forget_weight": 1.0, "trainable": "full"}]
    raw["lr_range_test"] = {"steps": 12, "probe_every": 3, "probe_items": 4}
    space = parse_space(raw)
    fitted = fitted_space(space, tiny_target, data_paths.root, tmp_path)
    record = json.loads((tmp_path / RANGE_FILE).read_text())
    probes, test = record["probes"], space.lr_range_test
    assert [p["step"] for p in probes] == [0, 3, 6, 9, 12]
    assert [p["lr"] for p in probes[1:]] == pytest.approx([test.lr_at(s - 1) for s in (3, 6, 9, 12)])
    assert probes[-1]["forget_nll"] > probes[0]["forget_nll"] * math.exp(test.rise)  # the ramp's top unlearns
    onset = record["fitted"]["onset"]
    assert onset in [p["lr"] for p in probes[1:]]
    lr = next(p for p in fitted.params if p.name == "lr")
    assert (lr.low, lr.high) == (record["fitted"]["low"], record["fitted"]["high"])
    assert lr.low == pytest.approx(max(1e-5, onset * 10**-test.below)) and lr.low <= onset <= lr.high
    assert fitted.starts[0]["lr"] == pytest.approx(1e-5 if lr.low <= 1e-5 else math.sqrt(lr.low * lr.high))
    assert (tmp_path / "plots" / "lr_range.png").stat().st_size > 0
    assert "lr range test: 12 steps" in capsys.readouterr().out
    again = fitted_space(space, tiny_target, data_paths.root, tmp_path)
    assert again.params == fitted.params and "lr range test: 12 steps" not in capsys.readouterr().out
