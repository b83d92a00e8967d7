"""A trial on a real local Ray cluster: 2 Ray Train workers hosting DeepSpeed ZeRO-3 shards."""

import json
import os
import signal
import threading
import time

import psutil
import pytest

from unlearn_search.cli import main
from unlearn_search.models import load_model
from unlearn_search.training.trial import Resources, read_metrics_log, run_trial

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from unlearn_search.training.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_two_worker_zero3_trial_with_teacher(ray_cluster, tiny_target, data_paths, tmp_path, capsys):
    out = tmp_path / "trial"
    code = main(["trial", "--model", str(tiny_target), "--method", "ga_kl", "--set", "lr=5e-4", "--set", "epochs=3",
                 "--workers", "2", "--zero-stage", "3", "--mmlu-limit", "1", "--mmlu-shots", "1",
                 "--data", str(data_paths.root), "--output", str(out)])
    assert code == 0
    reports = read_metrics_log(out / "metrics.jsonl")
    boundaries = [r for r in reports if not r["trained"]]
    assert [r["boundary"] for r in boundaries] == ["epoch 1", "epoch 2", "epoch 3"]
    assert all("retain_kl" in r and "forget_neg_ce" in r for r in boundaries)  # the teacher's KL was computed
    # Each boundary estimates the trial's result (what a search prunes on), not only the task terms.
    assert all(0 <= r["aggregate"] <= 1 and 0 <= r["mia_auc"] <= 1 and 0 <= r["mmlu"] <= 1 for r in boundaries)
    results = json.loads((out / "evaluation_results.json").read_text())
    assert results["forget-set"]["overall-regurgitation-score"] < 0.9  # the memorized target was at ~1.0
    assert results["retain-set"]["overall-regurgitation-score"] > 0.8
    model = load_model(out / "model")  # a plain Hugging Face checkpoint
    assert type(model).__name__ == "OlmoForCausalLM"
    assert "aggregate-score" in capsys.readouterr().out


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_killed_worker_resumes_from_its_last_checkpoint(ray_cluster, tiny_target, data_paths, tmp_path):
    out = tmp_path / "trial"
    settings = {"method": "gd", "lr": 3e-4, "epochs": 6}
    outcome = {}

    def run():
        try:
            outcome["result"] = run_trial(tiny_target, data_paths.root, settings, out, Resources(workers=2))
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
    assert reports[-1]["trained"] and reports[-1]["step"] == 18
    boundaries = [r["step"] for r in reports if not r["trained"]]
    assert boundaries.count(3) == 1  # epoch 1 was never trained twice


def test_the_utility_threshold_compares_mmlu_on_the_same_questions(tiny_target, data_paths, tmp_path):
    """A student's MMLU is held against the original's on the same questions: the target's own
    report when it scored those (one per subject here), else the original scored now."""
    import shutil

    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.evaluation.mmlu import evaluate_mmlu
    from unlearn_search.models import load_tokenizer
    from unlearn_search.training.trial import original_mmlu

    target = tmp_path / "target"
    shutil.copytree(tiny_target, target)
    (target / "target_evaluation.json").write_text(json.dumps({"mmlu_average": 0.5, "mmlu_questions": 57}))
    assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=1)) == 0.5
    scored = evaluate_mmlu(load_model(tiny_target), load_tokenizer(tiny_target), data_paths.mmlu, 5, 2, 32)
    assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=2)) == pytest.approx(scored["average"])
    # Other shots than the report's: scored again.
    assert original_mmlu(target, data_paths.root, EvalConfig(mmlu_limit=1, mmlu_shots=0)) != 0.5
