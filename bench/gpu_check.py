"""One short run that says whether the GPU path works: a real trial on a real GPU through Ray.

    bash bench/gpu_bundle.sh                # here, once: .gpu/ (wheels, data, tokenizer), about 45 MiB
    # on the GPU machine, carrying .gpu:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl
    PYTHONPATH=/tmp/site:. python3 bench/gpu_check.py --data .gpu/data --tokenizer .gpu/tokenizer

What it runs (about 3-5 minutes on one H200, most of it start-up and DeepSpeed's first-use
compilation of its fused Adam):
1. the published OLMo-1B configuration with random weights, saved in safetensors shards;
2. a 1-worker Ray Train trial with NCCL, ZeRO-3, ``dtype: auto`` (bfloat16 on the GPU), GA + KL
   against a live ZeRO-3 teacher, LoRA, ``keep_best``: two boundaries, each with the quick
   evaluation on the engine's shards; then the export and the full evaluation on the GPU
   (a Ray task holding the GPU);
3. with ``--kill``, the same trial again with its worker killed after the first checkpoint, to
   show it resumes on NCCL.

Prints the step time, the peak GPU memory (PyTorch's, on the worker) against the plan's
ZeRO-3 total on one GPU, the quick and full evaluation times, the dtype and device each
evaluation ran in, and a last line ``gpu_check: PASS`` or ``gpu_check: FAIL (...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

RANDOM_MODEL = "olmo-1B-random"


def build_model(directory: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unlearn_search.training.plan import model_config

    started = time.time()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(model_config("1B"), dtype=torch.float32)
    model.save_pretrained(directory, max_shard_size="500MB")
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(directory)
    del model
    torch.cuda.empty_cache()
    print(f"random OLMo-1B checkpoint written in {time.time() - started:.0f} s", flush=True)
    return directory


def manifest(data_root: Path, items: int) -> dict:
    """The shortest forget/retain items and MIA documents: a short trial's items."""
    from unlearn_search.data import load_benchmark, load_documents
    from unlearn_search.data.locate import paths_from_root

    paths = paths_from_root(data_root)
    bench = load_benchmark(paths.benchmark, "train")

    def shortest(rows, n, text):
        return [r.id for r in sorted(rows, key=lambda r: (len(text(r)), r.id))[:n]]

    return {
        "forget_ids": shortest(bench.forget, items, lambda i: i.input + i.output),
        "retain_ids": shortest(bench.retain, items, lambda i: i.input + i.output),
        "mia_member_ids": shortest(load_documents(paths.benchmark, "member", "train"), 4, lambda d: d.text),
        "mia_nonmember_ids": shortest(load_documents(paths.benchmark, "nonmember", "train"), 4, lambda d: d.text),
    }


def kill_after_first_checkpoint(log: Path, stop: threading.Event, killed: list) -> None:
    import psutil

    from unlearn_search.training.trial import read_metrics_log

    while not stop.is_set():
        if any(not r["trained"] for r in read_metrics_log(log)):
            for process in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                    os.kill(process.pid, signal.SIGKILL)
                    killed.append(process.pid)
                    return
        time.sleep(0.2)


def main() -> int:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".gpu/data")
    parser.add_argument("--tokenizer", default=".gpu/tokenizer")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--kill", action="store_true", help="also kill the worker once and check the resume")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: FAIL (no CUDA GPU here)")
        return 1
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.training.cluster import init_ray
    from unlearn_search.training.plan import count_parameters, model_config, plan_trial
    from unlearn_search.training.trial import Resources, run_trial

    problems = []
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model_dir = build_model(scratch / RANDOM_MODEL, Path(args.tokenizer))
    (model_dir / "unlearn_target.json").write_text(json.dumps(manifest(Path(args.data), args.steps * 2)))
    init_ray(num_cpus=min(8, os.cpu_count() or 1))
    settings = {
        "method": "ga_kl",
        "lr": 1e-4,
        "epochs": 2,
        "batch_size": 4,
        "max_length": args.seq_len,
        "trainable": "lora",
        "lora_rank": 16,
        "keep_best": True,
    }
    resources = Resources(
        workers=1,
        cpus_per_worker=4,
        gpus_per_worker=1,
        eval_items=16,
        eval_documents=8,
        eval_mmlu_limit=5,
        eval_max_new_tokens=32,
    )
    evaluation = EvalConfig(split="train", max_new_tokens=64, mmlu_limit=20, mmlu_threshold=0.0)
    runs = [("trial", False)] + ([("killed", True)] if args.kill else [])
    for name, kill in runs:
        out = scratch / name
        stop, killed = threading.Event(), []
        watcher = threading.Thread(
            target=kill_after_first_checkpoint, args=(out / "metrics.jsonl", stop, killed), daemon=True
        )
        if kill:
            watcher.start()
        started = time.time()
        try:
            result = run_trial(model_dir, Path(args.data), settings, out, resources, evaluation)
        except Exception as error:  # noqa: BLE001 - reported, then the check fails
            problems.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            continue
        finally:
            stop.set()
        seconds = time.time() - started
        boundaries = [r for r in result.metrics_history if not r["trained"]]
        steps = [r["step_seconds"] for r in boundaries if "step_seconds" in r]
        peak = max((r.get("peak_gpu_gib", 0.0) for r in boundaries), default=0.0)
        print(
            f"\n[{name}] {seconds:.0f} s in all; {len(boundaries)} boundaries; mean step "
            f"{sum(steps) / max(1, len(steps)):.3f} s"
        )
        print(
            f"[{name}] quick evaluation: {boundaries[-1].get('eval_seconds', float('nan')):.1f} s on "
            f"{boundaries[-1]['eval_device']} in {boundaries[-1]['eval_dtype']}"
        )
        evaluation_results = result.evaluation or {}
        print(
            f"[{name}] full evaluation on {evaluation_results.get('model_device')} in "
            f"{evaluation_results.get('model_dtype')}: aggregate {evaluation_results.get('aggregate-score')}"
        )
        if boundaries[-1]["eval_device"] == "cpu" or boundaries[-1]["eval_dtype"] != "bfloat16":
            problems.append(
                f"{name}: quick evaluation on {boundaries[-1]['eval_device']} in {boundaries[-1]['eval_dtype']}"
            )
        if evaluation_results.get("model_device") != "cuda" or evaluation_results.get("model_dtype") != "bfloat16":
            problems.append(
                f"{name}: full evaluation on {evaluation_results.get('model_device')} in "
                f"{evaluation_results.get('model_dtype')}"
            )
        if name == "trial":
            counts = count_parameters(model_config("1B"), "OLMo 1B", "lora", lora_rank=16)
            planned = {s.stage: s for s in plan_trial(counts, 1, 141, "lora", "live", 2, args.seq_len).stages}
            total = planned["ZeRO-3"].total_gib
            print(
                f"[{name}] peak GPU memory {peak:.2f} GiB; plan (ZeRO-3, 1 GPU) {total:.2f} GiB: "
                f"measured/planned {peak / total:.2f}"
            )
        if kill:
            resumed = [r for r in result.metrics_history if r.get("resumed_from", -1) >= 0]
            print(
                f"[{name}] killed worker {killed}; resumed from step {resumed[0]['resumed_from'] if resumed else None}"
            )
            if not killed or not resumed:
                problems.append(f"{name}: no kill-and-resume seen (killed {killed}, resumed {bool(resumed)})")
    shutil.rmtree(scratch, ignore_errors=True)
    print("gpu_check: PASS" if not problems else f"gpu_check: FAIL ({'; '.join(problems)})")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
