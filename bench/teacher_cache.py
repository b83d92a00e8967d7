"""The same KL trial with a live ZeRO-3 teacher and with the teacher-output cache, in one run.

    python bench/teacher_cache.py --model tiny [--method ga_kl] [--epochs 3] [--workers 2] [--repeats 1]
        [--set trainable=last_k ...] [--layers N] [--eval-items 64] [--eval-max-new-tokens 64] [--bound-only]

Both are real Ray Train trials (DeepSpeed ZeRO-3 student; the live one also hosts a frozen
ZeRO-3 teacher). Prints the mean step time; the peak resident memory of a worker (rank 0) and
its largest proportional share at a boundary (PSS: pages shared with the node's other workers,
such as the memory-mapped cache, split among them); the teacher parameters held on it; the
one-off cache build time; and the ratios.
Target: >= 1.7x faster steps, and no teacher weights on the workers.

What the cache saves is the teacher's forward pass; what remains is the student's forward and
backward. The ratio therefore depends on how much of the student is trained (`--set
trainable=lora|last_k`): a frozen student body has no weight gradients to compute, so the
teacher's share of a step grows. It also depends on the model's shape: with a frozen body, the
student's backward runs through the output layer and the trained layers, which weigh far more
against a 4-layer body (`small`) than against a 32-layer one (OLMo-7B). So the bench prints the
ratio's compute bound for the trial it runs, the matrix-multiply FLOPs of the first steps
(whole steps, one process) with a live teacher over those with stored teacher outputs: a cache
gets near it at best (it also saves the teacher's parameter gathers and other work that is not
matrix products, so a single pair of trials can touch it). `--layers N` runs the same trials on a
model of the target's architecture, tokenizer and items with N layers and random weights, for
the bound and ratio at another depth (step times do not depend on what the weights have learned).
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from unlearn_search.data import resolve_data
from unlearn_search.models import load_model, resolve_model
from unlearn_search.models.loading import TARGET_EVALUATION
from unlearn_search.models.trainable import prepare_trainable
from unlearn_search.training.cluster import init_ray
from unlearn_search.training.config import parse_assignments, trial_config
from unlearn_search.training.loop import step_inputs
from unlearn_search.training.trial import Resources, build_teacher_cache, run_trial
from unlearn_search.training.unlearn import live_reference, prepare


def main() -> None:
    from unlearn_search.quiet import silence_known_warnings

    silence_known_warnings()  # the known third-party lines, as the command line does
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--data")
    parser.add_argument("--method", default="ga_kl")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other trial setting, e.g. trainable=last_k last_k=2 (repeatable)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="trials of each kind, run alternately (live, cached, live, ...); figures are medians",
    )
    parser.add_argument(
        "--layers", type=int, help="run on the model's architecture with this many layers and random weights"
    )
    parser.add_argument("--bound-steps", type=int, default=4, help="steps whose FLOPs give the compute bound")
    parser.add_argument("--bound-only", action="store_true", help="print the compute bound alone: no trials run")
    parser.add_argument(
        "--eval-items",
        type=int,
        default=Resources().eval_items,
        help="items of the quick evaluation at each boundary (not timed as steps; fewer: shorter trials)",
    )
    parser.add_argument("--eval-max-new-tokens", type=int, default=Resources().eval_max_new_tokens)
    args = parser.parse_args()
    extra = parse_assignments(args.set)

    paths = resolve_data(args.data)
    model_dir = resolve_model(args.model, paths)
    runs: dict[str, list[dict]] = {"live": [], "cached": []}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        if args.layers:
            model_dir = with_layers(model_dir, args.layers, scratch / f"layers{args.layers}")
        settings = {"method": args.method, "lr": args.lr, "epochs": args.epochs, **extra}
        flops = step_flops(model_dir, paths, trial_config(settings), args.bound_steps)
        if args.bound_only:
            print_bound(args, trial_config(settings).trainable, flops)
            return
        init_ray(None)
        resources = Resources(
            workers=args.workers, eval_items=args.eval_items, eval_max_new_tokens=args.eval_max_new_tokens
        )
        started = time.perf_counter()
        build_teacher_cache(model_dir, paths.root, trial_config({**settings, "teacher": "cached"}), scratch / "cache")
        cache_seconds = time.perf_counter() - started
        for repeat in range(args.repeats):
            for teacher in ("live", "cached"):
                result = run_trial(
                    model_dir,
                    paths.root,
                    {**settings, "teacher": teacher},
                    scratch / f"{teacher}{repeat}",
                    resources,
                    evaluation=None,
                    name=f"{teacher}{repeat}",
                    teacher_cache_dir=scratch / "cache",
                )
                reports = [r for r in result.metrics_history if "step_seconds" in r]
                # The first boundary's window holds the warm-up steps (allocations, first collectives).
                steady = reports[1:] or reports
                runs[teacher].append(
                    {
                        "step_seconds": statistics.mean(r["step_seconds"] for r in reports),
                        "steady_step_seconds": statistics.mean(r["step_seconds"] for r in steady),
                        "peak_rss_mb": max(r["peak_rss_mb"] for r in reports),
                        "pss_mb": max(r.get("pss_mb", math.nan) for r in reports),
                        "teacher_parameters": max(r["teacher_parameters"] for r in reports),
                        "trial_seconds": result.seconds,
                        "final_loss": reports[-1]["loss"],
                    }
                )
    live, cached = (
        {key: statistics.median(run[key] for run in runs[teacher]) for key in runs[teacher][0]}
        for teacher in ("live", "cached")
    )
    print(
        f"model: {args.model}{f' with {args.layers} layers, random weights' if args.layers else ''}  "
        f"method: {args.method}  workers: {args.workers}  epochs: {args.epochs}  "
        f"trainable: {trial_config(settings).trainable}  {' '.join(args.set)}"
    )
    print(f"{'':28s}{'live teacher':>16s}{'cached':>16s}{'ratio':>10s}")
    for key, label in (
        ("step_seconds", "mean step time (s)"),
        ("steady_step_seconds", "  after the first boundary"),
        ("peak_rss_mb", "peak worker RSS (MiB)"),
        ("pss_mb", "worker PSS (MiB)"),
        ("trial_seconds", "trial wall time (s)"),
    ):
        print(f"{label:28s}{live[key]:16.3f}{cached[key]:16.3f}{live[key] / cached[key]:9.2f}x")
    print(
        f"{'teacher parameters/worker':28s}{int(live['teacher_parameters']):16,d}"
        f"{int(cached['teacher_parameters']):16,d}"
    )
    print(f"{'last boundary loss':28s}{live['final_loss']:16.4f}{cached['final_loss']:16.4f}")
    print(f"cache built once in {cache_seconds:.1f} s (shared by every trial of a search)")
    if args.repeats > 1:
        for teacher in ("live", "cached"):
            each = ", ".join(f"{run['step_seconds']:.3f}" for run in runs[teacher])
            print(f"{teacher} mean step time of each trial (s): {each}  (figures above: medians of {args.repeats})")
    bound = print_bound(args, trial_config(settings).trainable, flops)
    ratio = live["step_seconds"] / cached["step_seconds"]
    print(
        f"step speed-up: {ratio:.2f}x "
        f"({live['steady_step_seconds'] / cached['steady_step_seconds']:.2f}x after the first boundary; "
        f"{ratio / bound:.0%} of the compute bound; target >= 1.7x)"
    )


def print_bound(args, trainable: str, flops: dict[str, int]) -> float:
    """The speed-up's compute bound: matrix-multiply FLOPs of whole steps with a live teacher over
    those with stored teacher outputs."""
    bound = flops["live"] / flops["cached"]
    depth = f"{args.layers} layers" if args.layers else args.model
    print(
        f"{args.method}, {trainable}, {depth}: matmul GFLOPs of the first {args.bound_steps} steps: live "
        f"{flops['live'] / 1e9:.2f}, cached {flops['cached'] / 1e9:.2f}: compute bound on the speed-up {bound:.2f}x"
    )
    return bound


def with_layers(model_dir: Path, layers: int, directory: Path) -> Path:
    """``model_dir``'s architecture, tokenizer and target manifest with ``layers`` random layers."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory.mkdir(parents=True)
    for path in model_dir.glob("*.json"):
        if path.name != TARGET_EVALUATION:  # the trained target's own scores, not this model's
            shutil.copy(path, directory)
    config = AutoConfig.from_pretrained(model_dir)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def step_flops(model_dir: Path, paths, config, steps: int) -> dict[str, int]:
    """Matrix-multiply FLOPs of the first ``steps`` whole steps in one process: the student's
    forwards, loss and backward, plus (``live``) the teacher's forwards. Eager attention, so the
    attention products are counted too (the fused CPU kernel has no FLOP formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    prepared = prepare(model_dir, paths, config)
    student = prepare_trainable(
        load_model(model_dir), config.trainable, config.last_k, config.lora_rank, config.lora_alpha, config.lora_dropout
    )
    teacher = load_model(model_dir)
    for model in (student, teacher):
        model.set_attn_implementation("eager")
    forward = lambda batch: student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # noqa: E731
    computed = live_reference(teacher)
    stored: dict[bytes, object] = {}

    def key(batch) -> bytes:
        return b"".join(batch[k].numpy().tobytes() + str(batch[k].shape).encode() for k in ("input_ids", "labels"))

    def live(batch):
        stored[key(batch)] = output = computed(batch)
        return output

    totals = {}
    for kind, reference in (("live", live), ("cached", lambda batch: stored[key(batch)])):
        with FlopCounterMode(display=False) as counter:
            for step in prepared.steps[:steps]:
                student.zero_grad(set_to_none=True)
                output = prepared.method.loss(
                    step_inputs(prepared.method, step, prepared.data, forward, reference, config.forget_loss_bound)
                )
                if output.loss.requires_grad:
                    output.loss.backward()
        totals[kind] = counter.get_total_flops()
    return totals


if __name__ == "__main__":
    main()
