"""One trial: a Ray Train ``TorchTrainer`` whose workers host DeepSpeed shards of the student
(and, when the method needs it, of the frozen teacher), then the full evaluation.

The same code runs a 7B model on GPU nodes (nccl, bf16) and the reference target on CPU here
(DeepSpeed's CPU accelerator, gloo). Each schedule boundary reports losses, a quick evaluation
and a DeepSpeed checkpoint; a worker that dies resumes from the last one.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn_search.errors import UnlearnSearchError

PROGRESS_FILE = "progress.json"
MODEL_DIR = "model"


@dataclass(frozen=True)
class Resources:
    """How a trial runs on the cluster."""

    workers: int = 2
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    zero_stage: int = 3
    offload: bool = False
    max_failures: int = 2
    checkpoints_to_keep: int = 1
    # The quick evaluation at each boundary (what a search prunes on): forget + retain items,
    # MIA members + non-members, and MMLU questions per subject.
    eval_items: int = 64
    eval_documents: int = 32
    eval_mmlu_limit: int = 1
    eval_max_new_tokens: int = 64
    placement: str = "pack"  # pack: a trial's workers on as few nodes as fit; spread: across nodes


PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}


def proportional_memory() -> dict[str, float]:
    """``pss_mb``: this process's memory with shared pages split among their users (Linux only).

    Peak RSS counts a memory-mapped teacher cache in full in every worker of a node, though the
    node holds it once; PSS charges each worker its share.
    """
    try:
        with open("/proc/self/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return {"pss_mb": int(line.split()[1]) / 1024}
    except OSError:
        pass
    return {}


def _worker_environment(cpus: float) -> None:
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, int(cpus)))


def scaling_config(resources: Resources):
    """Ray Train's ``ScalingConfig`` for a trial: its workers, their CPUs/GPUs and placement."""
    from ray.train import ScalingConfig

    if resources.placement not in PLACEMENTS:
        raise UnlearnSearchError(f"placement {resources.placement!r}: expected one of {', '.join(PLACEMENTS)}")
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.workers, use_gpu=resources.gpus_per_worker > 0,
                         resources_per_worker=per_worker, placement_strategy=PLACEMENTS[resources.placement])


def train_worker(cfg: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    resources = Resources(**cfg["resources"])
    _worker_environment(resources.cpus_per_worker)
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation.evaluate import EvalConfig, load_eval_data
    from unlearn_search.evaluation.quick import quick_data, quick_scores
    from unlearn_search.models import load_model, read_target_manifest
    from unlearn_search.models.trainable import plain_model, prepare_trainable
    from unlearn_search.training.config import trial_config
    from unlearn_search.training.distributed import (DeepSpeedBackend, deepspeed_config, full_state_dict,
                                                     shard_steps, teacher_config, teacher_reference)
    from unlearn_search.training.loop import DivergedError, run
    from unlearn_search.training.unlearn import prepare

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    config = trial_config(cfg["settings"])
    model_dir, paths = Path(cfg["model_dir"]), paths_from_root(cfg["data"])
    torch.manual_seed(config.seed)
    prepared = prepare(model_dir, paths, config)

    def trainable(model):
        return prepare_trainable(model, config.trainable, config.last_k, config.lora_rank, config.lora_alpha,
                                 config.lora_dropout)

    student = trainable(load_model(model_dir))
    micro_batch = max(1, math.ceil(config.batch_size / world))
    engine, *_ = deepspeed.initialize(
        model=student, model_parameters=[p for p in student.parameters() if p.requires_grad],
        config=deepspeed_config(resources.zero_stage, resources.offload, config.lr, config.weight_decay,
                                config.max_grad_norm, micro_batch))
    reference, teacher_parameters = None, 0
    if prepared.method.uses_reference() and cfg.get("teacher_cache"):
        from unlearn_search.training.teacher_cache import TeacherCache

        reference = TeacherCache.load(Path(cfg["teacher_cache"]))
    elif prepared.method.uses_reference():
        teacher = load_model(model_dir)
        teacher_parameters = sum(p.numel() for p in teacher.parameters())
        teacher.requires_grad_(False)
        teacher_engine, *_ = deepspeed.initialize(model=teacher, config=teacher_config())
        teacher_engine.eval()
        reference = teacher_reference(teacher_engine)

    start_step, resumed_from = 0, None
    kept = KeptBoundary() if config.keep_best and rank == 0 else None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
            if progress.get("final"):  # the run had finished: nothing left to train
                ray.train.report({"step": progress["step"], "trained": True, "resumed_from": progress["step"],
                                  **({"kept_step": progress["kept_step"]} if "kept_step" in progress else {})},
                                 checkpoint=checkpoint if rank == 0 else None)
                return
            engine.load_checkpoint(directory, tag="trial")
            start_step = progress["step"]
            if kept is not None:
                kept.load(Path(directory))
        resumed_from = start_step

    eval_model, eval_data = None, None
    quick = EvalConfig(**cfg["quick_evaluation"])
    if rank == 0:
        eval_model = trainable(load_model(model_dir))
        eval_data = quick_data(load_eval_data(paths, quick, read_target_manifest(model_dir)),
                               resources.eval_items, resources.eval_documents)

    def refresh_eval_model() -> None:
        state = full_state_dict(engine)
        if rank == 0:
            eval_model.load_state_dict(state, strict=False)

    def on_boundary(report) -> None:
        refresh_eval_model()
        metrics = {**report.losses, "step": report.step, "boundary": report.boundary, "steps_total": len(steps),
                   "progress": 100.0 * report.step / max(1, len(steps)),
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   **proportional_memory(),
                   "teacher_parameters": teacher_parameters,
                   "resumed_from": -1 if resumed_from is None else resumed_from, "trained": False,
                   "node_id": ray.get_runtime_context().get_node_id()}
        if rank == 0:
            metrics.update(quick_scores(eval_model, prepared.tokenizer, eval_data, paths.mmlu, quick))
        if kept is not None:
            kept.offer(report.step, metrics["aggregate"], eval_model)
            metrics["kept_step"] = kept.step
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag="trial")
            if rank == 0:
                (Path(directory) / PROGRESS_FILE).write_text(json.dumps({"step": report.step}))
            if kept is not None:  # a resumed worker keeps what it had kept
                kept.save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    steps = shard_steps(prepared.steps, rank, world, prepared.data)
    try:
        result = run(prepared.method, steps, prepared.data, DeepSpeedBackend(engine, config.lr), reference,
                     config.forget_loss_bound, on_boundary, progress=rank == 0, start_step=start_step)
    except DivergedError as error:
        # Deterministic: a retry would diverge again. End the run cleanly and write no model.
        ray.train.report({"diverged": str(error), "trained": True})
        return
    refresh_eval_model()
    ending = {"step": result.steps}
    if kept is not None and kept.state is not None:
        # The trained parameters; the rest never moved. Not strict, so check that every kept one landed.
        unexpected = eval_model.load_state_dict(kept.state, strict=False).unexpected_keys
        if unexpected:
            raise UnlearnSearchError(f"keep_best: kept parameters {unexpected[:3]} are not in the model "
                                     f"(expected the student's trained parameters)")
        ending["kept_step"] = kept.step
    with tempfile.TemporaryDirectory() as directory:
        if rank == 0:
            final = plain_model(eval_model)
            final.save_pretrained(Path(directory) / MODEL_DIR)
            prepared.tokenizer.save_pretrained(Path(directory) / MODEL_DIR)
            (Path(directory) / PROGRESS_FILE).write_text(json.dumps({**ending, "final": True}))
        # "trained", not "done": Tune reads a "done" key as the end of the trial, before its evaluation.
        ray.train.report({**ending, "trained": True, "resumed_from": -1 if resumed_from is None else resumed_from},
                         checkpoint=ray.train.Checkpoint.from_directory(directory) if rank == 0 else None)


class KeptBoundary:
    """The weights of the schedule boundary with the highest quick aggregate so far (``keep_best``).

    As ``load_best_model_at_end`` in transformers: a trial whose high learning rate overshoots
    (one SUGD trial here estimated 0.316 at 62 % of its steps and 0.083 at the end) ends with
    its best model rather than its last. Ties go to the later boundary, the further-trained
    model; an estimate that is not a number never wins. Rank 0 copies the trained parameters
    only (the frozen ones never move), into memory and into each checkpoint: with LoRA or
    last_k a small part of a 7B model, with full fine-tuning a second full copy. A trial that
    diverges still fails with no model.
    """

    FILE = "kept_boundary.pt"

    def __init__(self):
        self.step: int | None = None
        self.value = -math.inf
        self.state: dict | None = None

    def offer(self, step: int, value: float, model) -> bool:
        value = value if math.isfinite(value) else -math.inf
        if self.state is not None and value < self.value:
            return False
        self.step, self.value = step, value
        self.state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
        return True

    def save(self, directory: Path) -> None:
        import torch

        if self.state is not None:
            torch.save({"step": self.step, "value": self.value, "state": self.state}, directory / self.FILE)

    def load(self, directory: Path) -> None:
        import torch

        if (directory / self.FILE).exists():
            saved = torch.load(directory / self.FILE, weights_only=True)
            self.step, self.value, self.state = saved["step"], saved["value"], saved["state"]


def metrics_log_callback(path: Path):
    """A Ray Train callback (run by the controller) appending every report to a JSON-lines file."""
    from ray.train.v2.api.callback import UserCallback

    class MetricsLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            record = dict(metrics[0])
            nodes = [m["node_id"] for m in metrics if m.get("node_id")]
            if nodes:  # where every worker ran, not only rank 0
                record["worker_nodes"] = nodes
            with open(path, "a") as handle:
                handle.write(json.dumps(record, default=str) + "\n")

    return MetricsLog()


def read_metrics_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class TrialResult:
    output: Path
    model: Path
    metrics_history: list[dict]
    evaluation: dict | None
    seconds: float

    @property
    def kept_step(self) -> int | None:
        """The step whose weights the model holds, with ``keep_best`` (None: the last step's)."""
        return self.metrics_history[-1].get("kept_step") if self.metrics_history else None


def run_trial(model_dir: str | Path, data_root: str | Path, settings: dict[str, Any], output: str | Path,
              resources: Resources = Resources(), evaluation=None, name: str = "trial",
              storage: str | Path | None = None, resume: bool = False,
              teacher_cache_dir: str | Path | None = None) -> TrialResult:
    """Train one trial on Ray Train, copy its model into ``output``, and evaluate it there.

    ``evaluation`` is an ``EvalConfig`` (None skips the full evaluation). Ray must be
    initialized (a local instance or a cluster). Ray Train continues a run it finds under the
    same storage and name; without ``resume`` an earlier run there is removed first.
    """
    import dataclasses

    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from unlearn_search.evaluation.evaluate import EvalConfig
    from unlearn_search.evaluation.quick import quick_config
    from unlearn_search.training.config import check_output_dir, trial_config

    config = trial_config(settings)  # refuse bad settings before any worker starts
    scaling = scaling_config(resources)
    output = check_output_dir(output, model_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    import torch

    storage = Path(storage or output / "ray").resolve()
    log = output / "metrics.jsonl"
    if not resume:
        shutil.rmtree(storage / name, ignore_errors=True)
        log.unlink(missing_ok=True)
    callbacks = [metrics_log_callback(log)]
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if _in_tune_session():  # a search: intermediate metrics go to Tune, which may prune on them
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    teacher_cache = None
    if config.teacher == "cached":
        path = build_teacher_cache(model_dir, data_root, config, Path(teacher_cache_dir or output / "teacher_cache"))
        teacher_cache = str(path) if path else None
    use_gpu = resources.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"settings": settings, "model_dir": str(Path(model_dir).resolve()),
                           "data": str(Path(data_root).resolve()), "resources": dataclasses.asdict(resources),
                           "teacher_cache": teacher_cache,
                           # The final evaluation's settings with the quick limits: an estimate of the result.
                           "quick_evaluation": dataclasses.asdict(quick_config(
                               evaluation or EvalConfig(), resources.eval_max_new_tokens, resources.eval_mmlu_limit))},
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if use_gpu and torch.cuda.is_available() else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=resources.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=resources.checkpoints_to_keep),
                             callbacks=callbacks),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    history = read_metrics_log(log)
    if history and history[-1].get("diverged"):
        from unlearn_search.training.loop import DivergedError

        raise DivergedError(history[-1]["diverged"])
    model_path = output / MODEL_DIR
    with result.checkpoint.as_directory() as directory:
        if model_path.exists():
            shutil.rmtree(model_path)
        shutil.copytree(Path(directory) / MODEL_DIR, model_path)
    evaluation_results = None
    if evaluation is not None:
        evaluation_results = evaluate_on_cluster(model_path, model_dir, data_root, evaluation, output, resources)
    return TrialResult(output, model_path, history, evaluation_results, time.time() - started)


def build_teacher_cache(model_dir, data_root, config, directory: Path) -> Path | None:
    """The teacher-output cache for this trial's sequences (shared by every trial with the same ones)."""
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.training.teacher_cache import ensure_cache
    from unlearn_search.training.unlearn import prepare

    prepared = prepare(Path(model_dir), paths_from_root(data_root), config)
    if not prepared.method.uses_reference():
        return None
    return ensure_cache(Path(model_dir), prepared.data, directory,
                        "auto" if config.teacher_top_k is None else config.teacher_top_k)


def on_cluster(resources: Resources, function, *args):
    """``function(*args)`` as a Ray task holding as many CPUs as a trial's workers (after a trial,
    the ones its finished workers freed; at most one node's) and one GPU on GPU clusters, so that
    a 7B model is never scored on a CPU-only process."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = 1 if resources.gpus_per_worker > 0 else 0
    # At most what one node that can run it has: spread workers may hold more CPUs than any node,
    # and a task asking for more would wait forever.
    fitting = [node["Resources"].get("CPU", 0.0) for node in ray.nodes()
               if node["Alive"] and node["Resources"].get("GPU", 0.0) >= gpus]
    cpus = resources.workers * resources.cpus_per_worker
    cpus = min(cpus, max(fitting)) if fitting and max(fitting) > 0 else cpus
    # Outside the Tune trial's placement group (which holds only the trial's own memory).
    task = ray.remote(_cluster_task).options(
        num_cpus=cpus, num_gpus=gpus, max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    return ray.get(task.remote(function, *args))


def evaluate_on_cluster(model_path: Path, original_dir, data_root, evaluation, output: Path,
                        resources: Resources) -> dict:
    """The full evaluation of a trained student, on the cluster (``on_cluster``)."""
    return on_cluster(resources, evaluate_checkpoint, model_path, original_dir, data_root, evaluation, output)


def _cluster_task(function, *args):
    import ray
    import torch

    # As many threads as the CPUs the task holds (a reused worker process may have set fewer).
    torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    return function(*args)


def evaluate_checkpoint(model_path: Path, original_dir: str | Path, data_root: str | Path, evaluation,
                        output: Path) -> dict:
    """The full evaluation of a trained student, on the original model's item subset."""
    import dataclasses

    import torch

    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation import evaluate
    from unlearn_search.models import load_model, load_tokenizer, read_target_manifest

    if evaluation.original_mmlu is None and evaluation.mmlu_threshold is None:
        evaluation = dataclasses.replace(evaluation, original_mmlu=original_mmlu(original_dir, data_root, evaluation))
    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return evaluate(model, tokenizer, paths_from_root(data_root), evaluation, read_target_manifest(original_dir), output)


def reported_mmlu(original_dir: str | Path, data_root: str | Path, evaluation) -> float | None:
    """The target's MMLU from its own report (``unlearn-search target build``) when that scored
    ``evaluation``'s questions with the same shots; None otherwise."""
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.data.mmlu import load_mmlu
    from unlearn_search.evaluation import EvalConfig
    from unlearn_search.models import TARGET_EVALUATION

    report = Path(original_dir) / TARGET_EVALUATION
    if not report.exists() or evaluation.mmlu_shots != EvalConfig().mmlu_shots:  # the shots a target build uses
        return None
    saved = json.loads(report.read_text())
    # The first n questions of each subject: the same count is the same questions.
    same = saved.get("mmlu_questions") == len(load_mmlu(paths_from_root(data_root).mmlu, "test", evaluation.mmlu_limit))
    return saved["mmlu_average"] if same else None


def original_mmlu(original_dir: str | Path, data_root: str | Path, evaluation) -> float:
    """The original model's MMLU on ``evaluation``'s questions, for its utility threshold: the
    target's report when it scored them, else scored now."""
    reported = reported_mmlu(original_dir, data_root, evaluation)
    if reported is not None:
        return reported
    return score_mmlu(original_dir, data_root, evaluation.mmlu_shots, evaluation.mmlu_limit, evaluation.batch_size)


def score_mmlu(model_path: str | Path, data_root: str | Path, shots: int, limit: int | None, batch_size: int) -> float:
    """A checkpoint's MMLU average (``limit`` questions per subject, all if None)."""
    import torch

    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation.mmlu import evaluate_mmlu
    from unlearn_search.models import load_model, load_tokenizer

    model, tokenizer = load_model(model_path), load_tokenizer(model_path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return evaluate_mmlu(model, tokenizer, paths_from_root(data_root).mmlu, shots, limit, batch_size)["average"]
