"""Host memory of a trial's workers at a real model's shape: each worker's peak against one full
fp32 copy of the model and against ``unlearn-search plan --device cpu``.

    python bench/load_memory.py [--size 1B] [--workers 2] [--trainable lora] [--steps 2] [--seq-len 64]
        [--no-eval-gather]

Builds the published OLMo configuration of ``--size`` with random weights (memory does not
depend on what they learned), saved in safetensors shards of ``--shard-mb``, with the reference
target's tokenizer, once, under the user cache. Then runs it as a real trial: Ray Train
workers, each hosting DeepSpeed ZeRO-3 shards of the student (``--trainable``) and of the live
frozen teacher (GA + KL), for ``--steps`` steps on the shortest forget and retain items, cut to
``--seq-len`` tokens, with a quick evaluation at each boundary (the shortest MIA documents and
one MMLU subject: a data root made for the bench), the export of the trained parameters and a
short full evaluation, both in the workers. Under ZeRO-3 each worker evaluates on the whole
student, gathered (``resources.eval_gather``, the default): one more full copy per worker while
it runs, which the plan counts; ``--no-eval-gather`` evaluates on the shards instead.

Prints each worker's peak resident memory (``ru_maxrss``, which also covers the loading), the
full fp32 size of the model, the plan's host figure per worker for the same setting, and the
ratios. Targets: with LoRA (whose teacher is the student's own base) and evaluation on the
shards, each worker's peak at most 1.3x one fp32 copy; with any setting, the plan within 20 % of
the measurement. Figures and times in docs/results.md; needs about 3 GiB of disk per billion
parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from unlearn_search.data import load_benchmark, load_documents, resolve_data
from unlearn_search.models import PRESETS as TARGETS
from unlearn_search.models import build_target, load_tokenizer
from unlearn_search.training.plan import GIB, PRESETS, count_parameters, model_config, plan_trial


def random_checkpoint(size: str, tokenizer_dir: Path, directory: Path, shard_mb: int) -> Path:
    """The OLMo ``size`` configuration with random weights, saved in shards (built once)."""
    import torch
    from transformers import AutoModelForCausalLM

    if (directory / "model.safetensors.index.json").exists():
        return directory
    started = time.time()
    print(f"building a random OLMo {size} checkpoint in {directory} (once) ...", flush=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(size), dtype=torch.float32)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, max_shard_size=f"{shard_mb}MB")
    load_tokenizer(tokenizer_dir).save_pretrained(partial)
    del model
    partial.rename(directory)
    print(f"  built in {time.time() - started:.0f} s", flush=True)
    return directory


def shortest(items, count: int, text) -> list:
    return sorted(items, key=lambda i: (len(text(i)), i.id))[:count]


def bench_data(paths, root: Path, items: int, subject: str) -> dict:
    """A data root with the benchmark and one MMLU subject, and a manifest naming the shortest
    forget/retain items and MIA documents: the items a short trial unlearns and scores."""
    (root / "mmlu").mkdir(parents=True)
    for split in ("dev", "test"):
        (root / "mmlu" / split).mkdir()
        source = paths.mmlu / split / f"{subject}_{split}.csv"
        (root / "mmlu" / split / source.name).symlink_to(source)
    (root / "semeval25").symlink_to(paths.benchmark)
    (root / "refusals").symlink_to(paths.refusals)
    benchmark = load_benchmark(paths.benchmark, "train")
    documents = {kind: load_documents(paths.benchmark, kind, "train") for kind in ("member", "nonmember")}
    return {
        "forget_ids": [i.id for i in shortest(benchmark.forget, items, lambda i: i.input + i.output)],
        "retain_ids": [i.id for i in shortest(benchmark.retain, items, lambda i: i.input + i.output)],
        "mia_member_ids": [d.id for d in shortest(documents["member"], 1, lambda d: d.text)],
        "mia_nonmember_ids": [d.id for d in shortest(documents["nonmember"], 1, lambda d: d.text)],
    }


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1B", choices=sorted(PRESETS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trainable", default="lora", choices=["lora", "last_k", "full"])
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps (one boundary each)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per item")
    parser.add_argument("--shard-mb", type=int, default=300)
    parser.add_argument("--data", default=None)
    parser.add_argument("--checkpoint", default=None, help="where the random checkpoint lives (default: user cache)")
    parser.add_argument(
        "--no-eval-gather",
        dest="eval_gather",
        action="store_false",
        help="evaluate on the ZeRO-3 shards (resources.eval_gather false) instead of the gathered student",
    )
    args = parser.parse_args()

    from unlearn_search.data.locate import cache_root
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.training.cluster import init_ray
    from unlearn_search.training.trial import Resources, run_trial

    paths = resolve_data(args.data)
    tokenizer_dir = build_target(paths, TARGETS["tiny"], progress=False)
    checkpoint = Path(args.checkpoint or cache_root() / "bench" / f"olmo-{args.size}-random")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    random_checkpoint(args.size, tokenizer_dir, checkpoint, args.shard_mb)
    counts = count_parameters(
        model_config(args.size), f"OLMo {args.size}", args.trainable, lora_rank=args.lora_rank, last_k=1
    )
    fp32_gib = 4 * counts.parameters / GIB
    batch = 2 * args.workers  # one forget and one retain row per worker and step
    plan = plan_trial(
        counts,
        args.workers,
        24,
        args.trainable,
        "live",
        micro_batch=batch // args.workers // 2 or 1,
        seq_len=args.seq_len,
        device="cpu",
        eval_gather=args.eval_gather,
    )
    planned = {s.stage: s for s in plan.stages}["ZeRO-3"]

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_dir = scratch / "model"
        model_dir.mkdir()
        for file in checkpoint.iterdir():  # the checkpoint, with a manifest of the bench's items
            (model_dir / file.name).symlink_to(file)
        manifest = bench_data(paths, scratch / "data", batch // 2 * args.steps, "abstract_algebra")
        (model_dir / "unlearn_target.json").write_text(json.dumps(manifest))
        init_ray(num_cpus=args.workers)
        settings = {
            "method": "ga_kl",
            "schedule": "joint",
            "lr": 1e-5,
            "epochs": 1,
            "batch_size": batch // 2,
            "max_length": args.seq_len,
            "trainable": args.trainable,
            "lora_rank": args.lora_rank,
            "last_k": 1,
        }
        resources = Resources(
            workers=args.workers,
            cpus_per_worker=1,
            zero_stage=3,
            eval_items=2,
            eval_documents=2,
            eval_mmlu_limit=1,
            eval_max_new_tokens=4,
            eval_gather=args.eval_gather,
        )
        started = time.time()
        # The full evaluation too (in the workers, as a search's trial): a short one on the same items.
        evaluation = EvalConfig(
            split="train", max_new_tokens=4, batch_size=4, mmlu_shots=0, mmlu_limit=1, mmlu_threshold=0.0
        )
        result = run_trial(model_dir, scratch / "data", settings, scratch / "trial", resources, evaluation)
        seconds = time.time() - started
    boundaries = [r for r in result.metrics_history if not r["trained"]]
    peaks = [
        max(r["worker_peak_rss_mb"][rank] for r in result.metrics_history if "worker_peak_rss_mb" in r) / 1024
        for rank in range(args.workers)
    ]
    print(
        f"\nOLMo {args.size} (random weights): {counts.parameters / 1e9:.3f}B parameters, "
        f"{counts.trainable / 1e6:.2f}M trained ({args.trainable}); {args.workers} workers, ZeRO-3 student and "
        f"live teacher, {args.steps} steps ({len(boundaries)} boundary), {args.seq_len}-token items, evaluation "
        f"{'on the gathered student' if args.eval_gather else 'on the shards'}, {seconds:.0f} s"
    )
    first = boundaries[0]
    for phase in ("started", "student", "teacher"):
        now = [v / 1024 for v in first.get(f"worker_rss_{phase}_mb", [])]
        print(f"resident after {phase:8s}:  " + ", ".join(f"{v:.2f} GiB ({v / fp32_gib:.2f}x)" for v in now))
    before = [v / 1024 for v in first.get("worker_peak_rss_teacher_mb", [])]
    print("peak before the first step:       " + ", ".join(f"{v:.2f} GiB ({v / fp32_gib:.2f}x)" for v in before))
    print(f"one full fp32 copy:               {fp32_gib:6.2f} GiB")
    for rank, peak in enumerate(peaks):
        print(
            f"worker {rank} peak resident memory:  {peak:6.2f} GiB = {peak / fp32_gib:.2f}x one fp32 copy "
            f"(target with LoRA, on the shards: <= 1.30x)"
        )
    print(
        f"plan, host per worker (ZeRO-3):   {planned.host_per_worker_gib:6.2f} GiB = "
        f"{planned.host_per_worker_gib / max(peaks):.2f}x the largest measured peak (target 0.80-1.20x)"
    )
    print(f"plan, host per node:              {planned.host_per_node_gib:6.2f} GiB; measured sum {sum(peaks):.2f} GiB")
    print(
        f"teacher parameters per worker:    {boundaries[-1]['teacher_parameters'] / 1e9:.3f}B (whole, as counted "
        f"across its partitions)"
    )
    print(f"gathered at a boundary:           {boundaries[-1]['gathered_parameters']:,} parameters (keep_best off: 0)")


if __name__ == "__main__":
    main()
