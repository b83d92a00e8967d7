"""One trial: a Ray Train ``TorchTrainer`` whose workers host DeepSpeed shards of the student
(and, when the method needs it, of the frozen teacher), then the full evaluation.

The same code runs a 7B model on GPU nodes (nccl, bf16) and the reference target on CPU here
(DeepSpeed's CPU accelerator, gloo). Each schedule boundary reports losses, a quick evaluation
and a DeepSpeed checkpoint; a worker that dies resumes from the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods.base import setting

PROGRESS_FILE = "progress.json"
MODEL_DIR = "model"


PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}  # Ray's placement-group strategies


@dataclass(frozen=True)
class Resources:
    """How a trial runs on the cluster (a space's ``resources`` block)."""

    workers: int = setting(2, "Ray Train workers per trial, each a DeepSpeed data-parallel rank", low=1)
    cpus_per_worker: float = setting(1, "CPUs each worker reserves", positive=True, kind=float)
    gpus_per_worker: float = setting(0, "GPUs each worker reserves (0: CPU workers)", low=0, kind=float)
    zero_stage: int = setting(
        3,
        "DeepSpeed ZeRO stage (at 3 the student and a live teacher are sharded)",
        choices=(0, 2, 3),  # the stages cluster/deepspeed/ has configs for
    )
    offload: bool = setting(False, "ZeRO CPU offload of the optimizer (and of the parameters at stage 3)")
    max_failures: int = setting(
        2, "worker failures a trial survives: its workers restart from the last boundary's checkpoint", low=0
    )
    checkpoints_to_keep: int = setting(1, "boundary checkpoints kept per trial", low=1)
    # The quick evaluation at each boundary (what a search prunes on).
    eval_items: int = setting(64, "quick evaluation: forget + retain items", low=1)
    eval_documents: int = setting(32, "quick evaluation: MIA member + non-member documents", low=1)
    eval_mmlu_limit: int = setting(1, "quick evaluation: MMLU questions per subject", low=1)
    eval_max_new_tokens: int = setting(64, "quick evaluation: tokens generated per item", low=1)
    # A schedule of many short chunks (SUGD with chunk_size 8: 7 boundaries on small's train
    # split) would otherwise spend most of its trial evaluating.
    eval_every: float = setting(
        20.0,
        "percent of training between two boundaries that get a quick evaluation, a report and a checkpoint "
        "(the last boundary always does)",
        low=0,
        high=100,
    )
    eval_gather: bool = setting(
        True,
        "evaluation under ZeRO-3 (no offload), at each boundary and at the end: each rank gathers the whole "
        "student once, not each layer at every generated token (one full copy per rank while it runs: 12.8 GiB "
        "for a 7B model in bfloat16, which `unlearn-search plan` counts)",
    )
    placement: str = setting(
        "pack", "a trial's workers on as few nodes as fit, or across nodes", choices=tuple(PLACEMENTS)
    )


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (loading included), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """This process's resident memory now, MiB (Linux; elsewhere its peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def gpu_memory() -> dict[str, float]:
    """``peak_gpu_gib``: the most GPU memory PyTorch has allocated in this process (GPU workers only)."""
    import torch

    return {"peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}


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


def accelerator_environment(environ: dict[str, str], has_gpu: bool) -> dict[str, str]:
    """The environment a trial worker runs DeepSpeed under, decided from that worker's own devices.

    A GPU worker never keeps ``DS_ACCELERATOR=cpu``, whatever the driver or the job's runtime
    environment had (a CPU head node submitting to GPU workers); a CPU worker gets it.
    """
    environ = dict(environ)
    if has_gpu:
        if environ.get("DS_ACCELERATOR") == "cpu":
            del environ["DS_ACCELERATOR"]
    else:
        environ["DS_ACCELERATOR"] = "cpu"
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return environ


def _worker_environment(cpus: float) -> None:
    import torch

    from unlearn_search.quiet import silence_known_warnings
    from unlearn_search.training.distributed import return_large_frees

    silence_known_warnings()
    return_large_frees()
    wanted = accelerator_environment(dict(os.environ), torch.cuda.is_available())
    for key in set(os.environ) - set(wanted):
        del os.environ[key]
    os.environ.update(wanted)
    torch.set_num_threads(max(1, int(cpus)))


def scaling_config(resources: Resources):
    """Ray Train's ``ScalingConfig`` for a trial: its workers, their CPUs/GPUs and placement."""
    from ray.train import ScalingConfig

    if resources.placement not in PLACEMENTS:
        raise UnlearnSearchError(f"placement {resources.placement!r}: expected one of {', '.join(PLACEMENTS)}")
    per_worker = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(
        num_workers=resources.workers,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker=per_worker,
        placement_strategy=PLACEMENTS[resources.placement],
    )


TRAINED_DIR = "trained"  # a checkpoint's trained parameters (safetensors shards)


@dataclass
class Worker:
    """What one Ray Train worker of a trial knows: its place, settings, data and device."""

    rank: int
    world: int
    config: Any  # TrialConfig
    resources: Resources
    model_dir: Path
    paths: Any  # DataPaths
    prepared: Any  # Prepared
    dtype: Any  # torch.dtype
    handles: list  # transformers' ZeRO-3 handles: alive while the models are used
    memory: dict = field(default_factory=dict)  # resident MiB after each start-up phase (rss_*_mb)
    timing: dict = field(default_factory=dict)  # seconds of each start-up phase (*_seconds)

    def record(self, phase: str) -> None:
        self.memory[f"rss_{phase}_mb"] = resident_mb()
        self.memory[f"peak_rss_{phase}_mb"] = peak_rss_mb()

    def trainable(self, model):
        from unlearn_search.training.unlearn import trainable_student

        return trainable_student(model, self.config, self.prepared.method)


def start_worker(cfg: dict[str, Any]) -> Worker:
    """This process as a trial worker: environment, process group, settings and data."""
    resources = Resources(**cfg["resources"])
    _worker_environment(resources.cpus_per_worker)
    import deepspeed
    import torch
    import torch.distributed as dist

    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.models.loading import resolve_dtype
    from unlearn_search.quiet import known_prints_dropped
    from unlearn_search.training.config import trial_config
    from unlearn_search.training.unlearn import prepare

    with known_prints_dropped():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    config = trial_config(cfg["settings"])
    model_dir, paths = Path(cfg["model_dir"]), paths_from_root(cfg["data"])
    torch.manual_seed(config.seed)
    return Worker(
        dist.get_rank(),
        dist.get_world_size(),
        config,
        resources,
        model_dir,
        paths,
        prepare(model_dir, paths, config),
        resolve_dtype(config.dtype),
        [],
    )


def load_for(worker: Worker, ds_config: dict):
    """The original model for one engine, in the trial's dtype: built into ZeRO-3 partitions (no
    rank holds it whole), or, under ZeRO 0 and 2, which replicate the weights, whole on each
    rank, loaded straight onto the worker's device (not first into host memory)."""
    import ray.train.torch

    from unlearn_search.models import load_model
    from unlearn_search.training.distributed import load_partitioned, zero3_enabled

    if not zero3_enabled(ds_config):
        return load_model(worker.model_dir, worker.dtype, device=str(ray.train.torch.get_device()))
    model, handle = load_partitioned(worker.model_dir, ds_config, worker.dtype)
    worker.handles.append(handle)
    return model


def build_student(worker: Worker):
    """The student's DeepSpeed engine: the trainable parameters (full, LoRA or last_k) and AdamW."""
    import deepspeed

    from unlearn_search.training.distributed import deepspeed_config

    c, r = worker.config, worker.resources
    ds_config = deepspeed_config(
        r.zero_stage,
        r.offload,
        c.lr,
        c.weight_decay,
        c.max_grad_norm,
        max(1, math.ceil(c.batch_size / worker.world)),
        worker.dtype,
    )
    student = worker.trainable(load_for(worker, ds_config))
    engine, *_ = deepspeed.initialize(
        model=student, config=ds_config, model_parameters=[p for p in student.parameters() if p.requires_grad]
    )
    return engine


def build_reference(worker: Worker, engine, teacher_cache: str | None):
    """``(reference, teacher parameters loaded for it, probe)``: the cache of the teacher's
    outputs, a LoRA student's own base with the adapters off, or the frozen teacher as a ZeRO-3
    engine (none when the method needs no reference); ``probe`` keeps the student's hidden states
    at the layer the method reads (None: it reads none), for ``loop.run``."""
    import deepspeed

    from unlearn_search.training.distributed import adapter_reference, full_numel, teacher_config, teacher_reference
    from unlearn_search.training.unlearn import method_probe

    method = worker.prepared.method
    probe = method_probe(engine.module, method)
    if not method.uses_reference():
        return None, 0, probe
    if teacher_cache:
        from unlearn_search.training.teacher_cache import TeacherCache

        return TeacherCache.load(Path(teacher_cache)), 0, probe
    if worker.config.trainable == "lora":
        return adapter_reference(engine, probe), 0, probe
    teacher = load_for(worker, teacher_config(dtype=worker.dtype))
    teacher.requires_grad_(False)
    parameters = sum(full_numel(p) for p in teacher.parameters())
    teacher_engine, *_ = deepspeed.initialize(model=teacher, config=teacher_config(dtype=worker.dtype))
    teacher_engine.eval()
    return teacher_reference(teacher_engine, probe.layer if probe is not None else None), parameters, probe


@dataclass
class Resumed:
    """Where a worker starts: step 0, or the last checkpoint's step (``final``: nothing left)."""

    step: int = 0
    from_step: int | None = None
    final: dict | None = None


def resume(worker: Worker, engine, kept: KeptBoundary | None) -> Resumed:
    """The run's last checkpoint, if Ray Train has one, loaded into the engine and ``kept``."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Resumed()
    with checkpoint.as_directory() as directory:
        progress = json.loads((Path(directory) / PROGRESS_FILE).read_text())
        if progress.get("final"):  # the run had finished: nothing left to train
            return Resumed(progress["step"], progress["step"], progress)
        # Not strict: the checkpoints leave out the frozen weights, which are the original's.
        engine.load_checkpoint(directory, tag="trial", load_module_strict=False)
        if kept is not None:
            kept.load(Path(directory), keep_state=worker.rank == 0)
    return Resumed(progress["step"], progress["step"])


def evaluation_due(step: int, last_evaluated: int, steps_total: int, every: float) -> bool:
    """Whether the boundary after ``step`` gets a quick evaluation: ``every`` percent of training
    after the last evaluated one (``last_evaluated``: its step, or where the run started), or the
    last boundary. Every rank decides the same: the evaluation's forwards are collective."""
    since = 100.0 * (step - last_evaluated) / max(1, steps_total)
    return step >= steps_total or since >= every - 1e-9


@contextlib.contextmanager
def gathered_for_evaluation(engine, resources: Resources) -> Iterator[None]:
    """Within it, under ZeRO-3 with ``resources.eval_gather`` and no offload, every rank holds the
    whole student with DeepSpeed's partitioning hooks off (``unwrap_model_for_generation``: one
    all-gather, the hooks put back and the parameters partitioned again on exit). Generation runs
    a forward per token, and with the hooks each forward all-gathers every layer."""
    if not resources.eval_gather or resources.offload or engine.zero_optimization_stage() != 3:
        yield
        return
    from deepspeed.runtime.zero import unwrap_model_for_generation

    with unwrap_model_for_generation(engine):
        yield


class BoundaryReporter:
    """At each schedule boundary: the quick evaluation on the engine's own shards (every rank runs
    it, in step, on the trial's device and dtype), keep_best's offer, a checkpoint, the report."""

    def __init__(
        self,
        worker: Worker,
        engine,
        kept: KeptBoundary | None,
        resumed: Resumed,
        steps_total: int,
        teacher_parameters: int,
        quick_evaluation: dict,
        evaluation: dict | None = None,
    ):
        from unlearn_search.evaluation.evaluate import EvalConfig, load_eval_data
        from unlearn_search.evaluation.quick import quick_data
        from unlearn_search.evaluation.reference import cached_original_nll
        from unlearn_search.models import read_target_manifest

        self.worker, self.engine, self.kept, self.resumed = worker, engine, kept, resumed
        self.train_seconds, self.last_step = 0.0, resumed.step
        self.last_estimated = resumed.step  # the step of the last boundary evaluated
        self.checkpoint_seconds = 0.0  # saving and reporting the boundaries' checkpoints, so far
        self.steps_total, self.teacher_parameters = steps_total, teacher_parameters
        self.quick = EvalConfig(**quick_evaluation)
        r = worker.resources
        data = load_eval_data(worker.paths, self.quick, read_target_manifest(worker.model_dir))
        # The reference attack's baseline only where the search scored it before (None: that
        # estimate NaN); loading the original on every worker to score it would cost its memory.
        reference = cached_original_nll(worker.model_dir, worker.paths, self.quick, str(engine.device))
        self.data = quick_data(dataclasses.replace(data, reference_nll=reference), r.eval_items, r.eval_documents)
        # The trial's own (full) evaluation, run here on the trained model when training ends.
        self.evaluation = EvalConfig(**evaluation) if evaluation else None
        self.evaluated: Evaluated | None = None

    def estimates(self) -> dict[str, Any]:
        """The quick scores, each rank computing its share of them in step (ZeRO-3 forwards are
        collective); rank 0's are kept."""
        import torch
        import torch.distributed as dist

        from unlearn_search.evaluation.inference import shared_over_ranks
        from unlearn_search.evaluation.quick import quick_scores

        module, started = self.engine.module, time.time()
        # Each rank scores its share of the batches; all get every result.
        with shared_over_ranks(), gathered_for_evaluation(self.engine, self.worker.resources):
            scores = quick_scores(module, self.worker.prepared.tokenizer, self.data, self.worker.paths.mmlu, self.quick)
        scores.update(
            eval_device=torch.device(self.engine.device).type,
            eval_dtype=str(next(module.parameters()).dtype).removeprefix("torch."),
            eval_seconds=time.time() - started,
        )
        shared = [scores]
        dist.broadcast_object_list(shared, src=0, device=self.engine.device)  # one decision for keep_best
        return shared[0]

    def evaluates_in_place(self, step: int) -> bool:
        """Whether this boundary reports the trial's full evaluation instead of a quick estimate:
        the last one, when nothing compares it with earlier estimates (no keep_best)."""
        return step >= self.steps_total and self.evaluation is not None and self.kept is None

    def full_evaluation(self) -> Evaluated:
        """The trial's evaluation of the model the workers hold, each rank scoring its share of
        the batches on the gathered student (as the quick evaluation): no export, no reload, no
        second process. Run once; every rank must call it."""
        if self.evaluated is None:
            self.evaluated = evaluate_in_workers(self.worker, self.engine, self.evaluation)
        return self.evaluated

    def __call__(self, report) -> None:
        import ray.train

        before_estimates = peak_rss_mb()
        # The window's mean step time times its steps: the optimizer steps alone, no boundary work.
        self.train_seconds += report.losses.get("step_seconds", 0.0) * (report.step - self.last_step)
        self.last_step = report.step
        if not evaluation_due(report.step, self.last_estimated, self.steps_total, self.worker.resources.eval_every):
            return
        self.last_estimated = report.step
        metrics = {
            **report.losses,
            "train_seconds": self.train_seconds,
            **self.worker.timing,
            "checkpoint_seconds": self.checkpoint_seconds,
            "step": report.step,
            "boundary": report.boundary,
            "steps_total": self.steps_total,
            "progress": 100.0 * report.step / max(1, self.steps_total),
            "peak_rss_mb": peak_rss_mb(),
            **proportional_memory(),
            **gpu_memory(),
            **self.worker.memory,
            "teacher_parameters": self.teacher_parameters,
            "resumed_from": -1 if self.resumed.from_step is None else self.resumed.from_step,
            "trained": False,
            "node_id": ray.get_runtime_context().get_node_id(),
            "peak_rss_before_estimates_mb": before_estimates,
            **(self.full_evaluation().metrics() if self.evaluates_in_place(report.step) else self.estimates()),
            "gathered_parameters": 0,
        }
        if self.kept is not None:
            if self.kept.offer(report.step, metrics["aggregate"], self.engine.module, self.worker.rank):
                metrics["gathered_parameters"] = self.kept.parameters
            metrics["kept_step"] = self.kept.step
        saving = time.time()
        with tempfile.TemporaryDirectory() as directory:
            self.engine.save_checkpoint(directory, tag="trial", exclude_frozen_parameters=True)
            if self.worker.rank == 0:
                (Path(directory) / PROGRESS_FILE).write_text(json.dumps({"step": report.step}))
            if self.kept is not None:  # a resumed worker keeps what it had kept
                self.kept.save(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        self.checkpoint_seconds += time.time() - saving  # this report's, in the next one


@dataclass
class Evaluated:
    """The trial's evaluation as its workers ran it: the results and the frames behind them."""

    results: dict
    frames: dict
    seconds: float

    def metrics(self) -> dict[str, Any]:
        from unlearn_search.evaluation.evaluate import metric_values

        where = {"eval_device": self.results["model_device"], "eval_dtype": self.results["model_dtype"]}
        return {**metric_values(self.results), **where, EVALUATION_SECONDS: self.seconds}


EVALUATION_DIR = "evaluation"  # in a trial's final checkpoint: the evaluation its workers ran
EVALUATION_SECONDS = "evaluation_seconds"  # the workers' full evaluation, in their reports


def evaluate_in_workers(worker: Worker, engine, evaluation) -> Evaluated:
    """``evaluation`` (an ``EvalConfig``) of the engine's student on the original's item subset,
    every rank scoring its share on the gathered model; all ranks return the whole result. The
    threshold and the original's document NLLs were settled before the workers started
    (``run_trial``), so no worker loads the original."""
    import torch

    from unlearn_search.evaluation.evaluate import load_eval_data
    from unlearn_search.evaluation.inference import shared_over_ranks
    from unlearn_search.evaluation.quick import scored
    from unlearn_search.evaluation.reference import cached_original_nll
    from unlearn_search.models import read_target_manifest

    started = time.time()
    evaluation = dataclasses.replace(evaluation, progress=evaluation.progress and worker.rank == 0)
    data = load_eval_data(worker.paths, evaluation, read_target_manifest(worker.model_dir))
    reference = cached_original_nll(worker.model_dir, worker.paths, evaluation, str(engine.device))
    data = dataclasses.replace(data, reference_nll=reference)
    with torch.no_grad(), shared_over_ranks(), gathered_for_evaluation(engine, worker.resources):
        results, frames = scored(engine.module, worker.prepared.tokenizer, data, worker.paths.mmlu, evaluation)
    return Evaluated(results, frames, time.time() - started)


def export_trained(
    worker: Worker,
    engine,
    kept: KeptBoundary | None,
    steps: int,
    resumed: Resumed,
    checkpoint_seconds: float = 0.0,
    evaluated: Evaluated | None = None,
) -> None:
    """The run's result as a checkpoint of its trained parameters (the kept boundary's with
    keep_best) and, where the workers ran it, the trial's evaluation: the full model is put
    together later, from the original, where someone needs it."""
    import ray.train

    from unlearn_search.evaluation.evaluate import write_results
    from unlearn_search.training.distributed import gather_trained

    started, ending = time.time(), {"step": steps}
    if kept is not None and kept.step is not None:
        state = kept.state
        ending["kept_step"] = kept.step
    else:
        state = gather_trained(engine.module, worker.rank)
    if evaluated is not None:
        ending[EVALUATION_SECONDS] = evaluated.seconds
    with tempfile.TemporaryDirectory() as directory:
        if worker.rank == 0:
            write_tensors(state, Path(directory) / TRAINED_DIR)
            if evaluated is not None:
                write_results(evaluated.results, evaluated.frames, Path(directory) / EVALUATION_DIR)
            (Path(directory) / PROGRESS_FILE).write_text(json.dumps({**ending, "final": True}))
        # "trained", not "done": Tune reads a "done" key as the end of the trial, before its evaluation.
        ray.train.report(
            {
                **ending,
                "trained": True,
                "peak_rss_mb": peak_rss_mb(),
                "resumed_from": -1 if resumed.from_step is None else resumed.from_step,
                "export_seconds": time.time() - started,
                "checkpoint_seconds": checkpoint_seconds,
                READY_AT: time.time(),
            },
            checkpoint=ray.train.Checkpoint.from_directory(directory) if worker.rank == 0 else None,
        )


def train_worker(cfg: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train

    from unlearn_search.training.distributed import DeepSpeedBackend, shard_steps
    from unlearn_search.training.loop import DivergedError, run

    entered = time.time()
    worker = start_worker(cfg)
    worker.record("started")
    started = time.time()
    engine = build_student(worker)
    worker.record("student")
    reference, teacher_parameters, probe = build_reference(worker, engine, cfg.get("teacher_cache"))
    worker.record("teacher")
    worker.timing = {
        "worker_start_seconds": entered - cfg["submitted_at"],
        "setup_seconds": started - entered,
        "build_seconds": time.time() - started,
    }
    kept = KeptBoundary() if worker.config.keep_best else None
    resumed = resume(worker, engine, kept)
    if resumed.final is not None:
        final = resumed.final
        ray.train.report(
            {
                "step": final["step"],
                "trained": True,
                "resumed_from": final["step"],
                **({"kept_step": final["kept_step"]} if "kept_step" in final else {}),
            },
            checkpoint=ray.train.get_checkpoint() if worker.rank == 0 else None,
        )
        return
    steps = shard_steps(worker.prepared.steps, worker.rank, worker.world, worker.prepared.data)
    on_boundary = BoundaryReporter(
        worker, engine, kept, resumed, len(steps), teacher_parameters, cfg["quick_evaluation"], cfg.get("evaluation")
    )
    try:
        result = run(
            worker.prepared.method,
            steps,
            worker.prepared.data,
            DeepSpeedBackend(engine, worker.config.lr),
            reference,
            worker.config.forget_loss_bound,
            on_boundary,
            progress=worker.rank == 0,
            start_step=resumed.step,
            probe=probe,
        )
    except DivergedError as error:
        # Deterministic: a retry would diverge again. End the run cleanly and write no model.
        ray.train.report({"diverged": str(error), "trained": True})
        return
    evaluated = None
    if on_boundary.evaluation is not None and (kept is None or kept.step == result.steps):
        evaluated = on_boundary.full_evaluation()  # else the driver scores the kept boundary's export
    export_trained(worker, engine, kept, result.steps, resumed, on_boundary.checkpoint_seconds, evaluated)


def write_tensors(state: dict, directory: Path, shard_bytes: int = 2 * 2**30) -> None:
    """``state`` as safetensors files of at most about ``shard_bytes`` each."""
    from safetensors.torch import save_file

    from unlearn_search.training.distributed import byte_groups

    directory.mkdir(parents=True, exist_ok=True)
    groups = byte_groups(list(state.items()), shard_bytes)
    for number, group in enumerate(groups, 1):
        save_file(
            {name: tensor.contiguous() for name, tensor in group},
            directory / f"trained-{number:05d}-of-{len(groups):05d}.safetensors",
        )


class KeptBoundary:
    """The trained parameters of the schedule boundary with the highest quick aggregate so far (``keep_best``).

    As ``load_best_model_at_end`` in transformers: a trial whose high learning rate overshoots
    ends with its best model rather than its last. Ties go to the later boundary, the
    further-trained model; an estimate that is not a number never wins. Every rank decides
    alike (on rank 0's estimate) and gathers the trained parameters when one wins; rank 0 alone
    holds them, in memory and in each checkpoint: with LoRA or last_k a small part of a 7B
    model, with full fine-tuning a second full copy. A trial that diverges still fails with no model.
    """

    FILE = "kept_boundary.pt"

    def __init__(self):
        self.step: int | None = None
        self.value = -math.inf
        self.state: dict | None = None  # rank 0's; None on the others

    @property
    def parameters(self) -> int:
        return sum(t.numel() for t in self.state.values()) if self.state else 0

    def offer(self, step: int, value: float, model, rank: int = 0) -> bool:
        from unlearn_search.training.distributed import gather_trained

        value = value if math.isfinite(value) else -math.inf
        if self.step is not None and value < self.value:
            return False
        self.step, self.value = step, value
        self.state = gather_trained(model, rank)
        return True

    def save(self, directory: Path) -> None:
        import torch

        if self.state is not None:
            torch.save({"step": self.step, "value": self.value, "state": self.state}, directory / self.FILE)

    def load(self, directory: Path, keep_state: bool = True) -> None:
        import torch

        if (directory / self.FILE).exists():
            saved = torch.load(directory / self.FILE, weights_only=True)
            self.step, self.value = saved["step"], saved["value"]
            self.state = saved["state"] if keep_state else None


# When the final report left its worker (seconds since the epoch), and when the controller
# logged each report: between the two, the trained parameters went to the run's storage.
READY_AT, LOGGED_AT = "ready_at", "logged_at"

WORKER_MEMORY = (
    "peak_rss_mb",
    "peak_rss_before_estimates_mb",
    "rss_started_mb",
    "rss_student_mb",
    "rss_teacher_mb",
    "peak_rss_teacher_mb",
)


def metrics_log_callback(path: Path):
    """A Ray Train callback (run by the controller) appending every report to a JSON-lines file."""
    from ray.train import UserCallback

    class MetricsLog(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            record = {**metrics[0], LOGGED_AT: time.time()}
            for key in WORKER_MEMORY:  # each worker's, not only rank 0's
                if all(key in m for m in metrics):
                    record[f"worker_{key}"] = [m[key] for m in metrics]
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
    # Driver-side (``time_spent``): before Ray Train's run, its end, copying its model, the export and evaluation.
    timing: dict = field(default_factory=dict)

    @property
    def kept_step(self) -> int | None:
        """The step whose weights the model holds, with ``keep_best`` (None: the last step's)."""
        return self.metrics_history[-1].get("kept_step") if self.metrics_history else None


def run_trial(
    model_dir: str | Path,
    data_root: str | Path,
    settings: dict[str, Any],
    output: str | Path,
    resources: Resources = Resources(),
    evaluation=None,
    name: str = "trial",
    storage: str | Path | None = None,
    resume: bool = False,
    teacher_cache_dir: str | Path | None = None,
    export: bool = True,
) -> TrialResult:
    """Train one trial on Ray Train, evaluate it, and keep its trained parameters in ``output``.

    ``evaluation`` is an ``EvalConfig`` (None skips the evaluation). The workers run it on the
    model they trained, unless keep_best kept an earlier boundary: then the kept parameters are
    exported and scored on the cluster. ``export`` writes the student as a Hugging Face
    checkpoint into ``output/model`` (a search exports only its best trial). Ray must be
    initialized (a local instance or a cluster). Ray Train continues a run it finds under the
    same storage and name; without ``resume`` an earlier run there is removed first.
    """
    from unlearn_search.training.config import check_output_dir, trial_config

    config = trial_config(settings)  # refuse bad settings before any worker starts
    scaling = scaling_config(resources)
    output = check_output_dir(output, model_dir)
    output.mkdir(parents=True, exist_ok=True)
    started = time.time()
    storage = Path(storage or output / "ray").resolve()
    log = output / "metrics.jsonl"
    if not resume:
        shutil.rmtree(storage / name, ignore_errors=True)
        log.unlink(missing_ok=True)
    teacher_cache = None
    if config.teacher == "cached":
        path = build_teacher_cache(model_dir, data_root, config, Path(teacher_cache_dir or output / "teacher_cache"))
        teacher_cache = str(path) if path else None
    settling = time.time()
    if evaluation is not None:  # the trial's model is scored in the dtype it was trained in
        evaluation = dataclasses.replace(evaluation, dtype=config.dtype)
        evaluation = settled_for_workers(evaluation, model_dir, data_root, resources)
    submitted = time.time()  # the workers' start-up is counted from here
    loop_config = {
        "settings": settings,
        "model_dir": str(Path(model_dir).resolve()),
        "data": str(Path(data_root).resolve()),
        "resources": dataclasses.asdict(resources),
        "teacher_cache": teacher_cache,
        "submitted_at": submitted,
        "quick_evaluation": _quick_evaluation(evaluation, resources),
        "evaluation": None if evaluation is None else dataclasses.asdict(evaluation),
    }
    result = _trainer(loop_config, scaling, resources, name, storage, log).fit()
    fit_ended = time.time()
    history = _finished(result, log)
    trained = output / TRAINED_DIR
    evaluation_results = None
    with result.checkpoint.as_directory() as directory:
        if trained.exists():
            shutil.rmtree(trained)
        shutil.copytree(Path(directory) / TRAINED_DIR, trained)
        if evaluation is not None and (Path(directory) / EVALUATION_DIR).is_dir():
            evaluation_results = kept_evaluation(Path(directory) / EVALUATION_DIR, output)
    model_path = output / MODEL_DIR
    copied = time.time()
    scored_after = evaluation is not None and evaluation_results is None  # keep_best kept an earlier boundary
    if scored_after:
        evaluation_results = on_cluster(
            resources, export_and_evaluate, trained, model_dir, settings, model_path, data_root, evaluation, output
        )
    elif export:
        on_cluster(resources, export_model, trained, model_dir, settings, model_path, None, False)
    timing = {
        "before_fit_seconds": settling - started,
        "settle_seconds": submitted - settling,
        "fit_ended_at": fit_ended,
        "copy_seconds": copied - fit_ended,
        "after_fit_seconds": time.time() - copied,
        "scored_after_fit": scored_after,
    }
    return TrialResult(output, model_path, history, evaluation_results, time.time() - started, timing)


def settled_for_workers(evaluation, model_dir, data_root, resources: Resources):
    """``evaluation`` with what its workers cannot score themselves settled first, on the cluster
    and once per user cache: the original's MMLU (for the default threshold) and its MIA document
    NLLs (the reference attack's baseline). A worker never loads the original beside its shards."""
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation.reference import cached_original_nll

    if evaluation.original_mmlu is None and evaluation.mmlu_threshold is None:
        evaluation = dataclasses.replace(
            evaluation, original_mmlu=on_cluster(resources, _original_mmlu, model_dir, data_root, evaluation)
        )
    device = "cuda" if resources.gpus_per_worker > 0 else "cpu"
    if cached_original_nll(model_dir, paths_from_root(data_root), evaluation, device) is None:
        on_cluster(resources, _score_original_nll, model_dir, data_root, evaluation)
    return evaluation


def _original_mmlu(model_dir, data_root, evaluation) -> float:
    from unlearn_search.evaluation.baseline import original_mmlu

    return original_mmlu(model_dir, data_root, evaluation)


def _score_original_nll(model_dir, data_root, evaluation) -> None:
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation.reference import original_nll

    original_nll(model_dir, paths_from_root(data_root), evaluation)


def kept_evaluation(directory: Path, output: Path) -> dict:
    """The workers' evaluation files (``EVALUATION_DIR`` of the final checkpoint) copied into the
    trial's ``output``, as ``evaluate`` writes them; returns the results."""
    from unlearn_search.evaluation.evaluate import RESULTS_FILE

    shutil.copytree(directory, output, dirs_exist_ok=True)
    return json.loads((directory / RESULTS_FILE).read_text())


def _quick_evaluation(evaluation, resources: Resources) -> dict:
    """The final evaluation's settings with the quick limits: each boundary's estimate of the result."""
    from unlearn_search.evaluation.evaluate import EvalConfig
    from unlearn_search.evaluation.quick import quick_config

    quick = quick_config(evaluation or EvalConfig(), resources.eval_max_new_tokens, resources.eval_mmlu_limit)
    return dataclasses.asdict(quick)


def _trainer(loop_config: dict, scaling, resources: Resources, name: str, storage: Path, log: Path):
    """Ray Train's ``TorchTrainer`` over ``train_worker``: its metrics logged to ``log`` (and
    reported to Tune inside a search), its checkpoints and retries as ``resources`` say."""
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    callbacks = [metrics_log_callback(log)]
    if in_tune_trial():  # a search: intermediate metrics go to Tune, which may prune on them
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    nccl = resources.gpus_per_worker > 0 and torch.cuda.is_available()
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if nccl else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=resources.checkpoints_to_keep),
            callbacks=callbacks,
        ),
    )


def _finished(result, log: Path) -> list[dict]:
    """The trial's metrics history once Ray Train ended it; its error, or the divergence its
    workers reported, raised."""
    if result.error is not None:
        raise result.error
    history = read_metrics_log(log)
    if history and history[-1].get("diverged"):
        from unlearn_search.training.loop import DivergedError

        raise DivergedError(history[-1]["diverged"])
    return history


def time_spent(result: TrialResult) -> dict[str, float]:
    """Where a trial's wall time went, in seconds, for a trial that ran once (not resumed).

    From its reports' timings: Ray Train starting the workers and each worker's set-up, the
    original's MMLU and document NLLs where no cache had them, building the models and DeepSpeed
    engines, the optimizer steps, the quick evaluations, the boundaries' checkpoints (saved, sent
    and registered), the full evaluation (in the workers, or exported and scored after them), the
    export of the trained parameters, Ray Train's shutdown, and the Hugging Face export. ``other``
    is what none of them covers.
    """
    history = result.metrics_history
    boundaries = [r for r in history if "boundary" in r]
    first, final, timing = (boundaries or history)[0], history[-1], result.timing
    after_fit = timing["after_fit_seconds"]
    scored_after = timing["scored_after_fit"]
    spent = {
        "Ray Train and worker start-up": timing["before_fit_seconds"]
        + first["worker_start_seconds"]
        + first["setup_seconds"],
        "the original's MMLU and MIA NLLs (once per cache)": timing["settle_seconds"],
        "models and DeepSpeed initialization": first["build_seconds"],
        "training steps": boundaries[-1]["train_seconds"] if boundaries else 0.0,
        "quick evaluations": sum(r.get("eval_seconds", 0.0) for r in boundaries),
        "checkpoints": final.get("checkpoint_seconds", 0.0),
        "full evaluation": final.get(EVALUATION_SECONDS, 0.0) + (after_fit if scored_after else 0.0),
        "export of the trained parameters": final.get("export_seconds", 0.0)
        + final[LOGGED_AT]
        - final[READY_AT]
        + timing["copy_seconds"],
        "Ray Train shutdown": timing["fit_ended_at"] - final[LOGGED_AT],
        "Hugging Face checkpoint": 0.0 if scored_after else after_fit,
    }
    spent["other"] = result.seconds - sum(spent.values())
    return spent


def in_tune_trial() -> bool:
    """Whether this runs inside a Tune trial (a search), where reports go to Tune too."""
    import warnings

    import ray.tune

    with warnings.catch_warnings():  # outside a trial Ray warns, then answers None
        warnings.simplefilter("ignore")
        return ray.tune.get_context().get_trial_id() is not None


def build_teacher_cache(model_dir, data_root, config, directory: Path) -> Path | None:
    """The teacher-output cache for this trial's sequences (shared by every trial with the same ones)."""
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.models.loading import layer_count
    from unlearn_search.training.teacher_cache import ensure_cache
    from unlearn_search.training.unlearn import prepare

    prepared = prepare(Path(model_dir), paths_from_root(data_root), config)
    if not prepared.method.uses_reference():
        return None
    return ensure_cache(
        Path(model_dir),
        prepared.data,
        directory,
        "auto" if config.teacher_top_k is None else config.teacher_top_k,
        layer=prepared.method.probed_layer(layer_count(model_dir)),
    )


def on_cluster(resources: Resources, function, *args):
    """``function(*args)`` as a Ray task holding as many CPUs as a trial's workers (after a trial,
    the ones its finished workers freed; at most one node's) and one GPU on GPU clusters, so that
    a 7B model is never scored on a CPU-only process."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    gpus = 1 if resources.gpus_per_worker > 0 else 0
    # At most what one node that can run it has: spread workers may hold more CPUs than any node,
    # and a task asking for more would wait forever.
    fitting = [
        node["Resources"].get("CPU", 0.0)
        for node in ray.nodes()
        if node["Alive"] and node["Resources"].get("GPU", 0.0) >= gpus
    ]
    cpus = resources.workers * resources.cpus_per_worker
    cpus = min(cpus, max(fitting)) if fitting and max(fitting) > 0 else cpus
    # Outside the Tune trial's placement group (which holds only the trial's own memory).
    task = ray.remote(_cluster_task).options(
        num_cpus=cpus,
        num_gpus=gpus,
        max_retries=0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return ray.get(task.remote(function, *args))


def _cluster_task(function, *args):
    import ray

    # As many threads as the CPUs the task holds (a reused worker process may have set fewer).
    _worker_environment(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))
    return function(*args)


def export_model(
    trained: Path,
    original_dir: str | Path,
    settings: dict[str, Any],
    model_path: Path,
    device: str | None = None,
    returned: bool = True,
):
    """The trained student as a plain Hugging Face checkpoint in ``model_path``, and the model
    (None without ``returned``: a Ray task's caller needs only the files).

    Built from the original (loaded in the trial's dtype, straight onto ``device``) and the
    trial's trained parameters: LoRA adapters are merged, the last k layers or every weight
    replaced. The reference target's manifest goes with it, so that scoring it again scores
    what the target memorized.
    """
    from safetensors.torch import load_file

    from unlearn_search.methods import get_method
    from unlearn_search.models import load_model, load_tokenizer
    from unlearn_search.models.loading import copy_target_manifest, default_device, resolve_dtype
    from unlearn_search.models.trainable import plain_model
    from unlearn_search.training.config import trial_config

    config, device = trial_config(settings), device or default_device()
    method = get_method(config.method, **config.method_params)
    model = load_model(original_dir, resolve_dtype(config.dtype, device), device=device)
    from unlearn_search.training.unlearn import trainable_student

    model = trainable_student(model, config, method)
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    found = set()
    for file in sorted(Path(trained).glob("*.safetensors")):
        tensors = load_file(file, device=device)
        unexpected = model.load_state_dict(tensors, strict=False).unexpected_keys
        if unexpected:
            raise UnlearnSearchError(
                f"trained parameters {unexpected[:3]} in {file} are not in the model "
                f"(expected the student's trained parameters)"
            )
        found.update(tensors)
    if found != expected:
        raise UnlearnSearchError(
            f"{trained}: lacks trained parameters {sorted(expected - found)[:3]} "
            f"(expected all {len(expected)} of trainable={config.trainable})"
        )
    model = plain_model(model)
    model.eval()
    if model_path.exists():
        shutil.rmtree(model_path)
    model.save_pretrained(model_path)
    load_tokenizer(original_dir).save_pretrained(model_path)
    copy_target_manifest(original_dir, model_path)
    return model if returned else None


def evaluate_on_cluster(
    model_path: Path,
    original_dir,
    data_root,
    evaluation,
    output: Path,
    resources: Resources,
    known_mmlu: float | None = None,
) -> dict:
    """The full evaluation of a written model, on the cluster (``on_cluster``)."""
    args = (model_path, original_dir, data_root, evaluation, output, known_mmlu)
    return on_cluster(resources, evaluate_checkpoint, *args)


def evaluate_checkpoint(
    model_path: Path,
    original_dir: str | Path,
    data_root: str | Path,
    evaluation,
    output: Path,
    known_mmlu: float | None = None,
) -> dict:
    """The full evaluation of a written model (a student, or the original itself), on the original
    model's item subset, on this process's device in ``evaluation.dtype``; ``known_mmlu``: its
    MMLU on those questions, scored before (``evaluate``)."""
    from unlearn_search.models import load_model, load_tokenizer
    from unlearn_search.models.loading import default_device

    model = load_model(model_path, evaluation.dtype, device=default_device())
    tokenizer = load_tokenizer(model_path)
    return evaluate_loaded(model, tokenizer, original_dir, data_root, evaluation, output, known_mmlu)


def evaluate_loaded(model, tokenizer, original_dir, data_root, evaluation, output: Path, known_mmlu=None) -> dict:
    from unlearn_search.data.locate import paths_from_root
    from unlearn_search.evaluation import evaluate
    from unlearn_search.models import read_target_manifest

    if evaluation.original_mmlu is None and evaluation.mmlu_threshold is None:
        from unlearn_search.evaluation.baseline import original_mmlu

        evaluation = dataclasses.replace(evaluation, original_mmlu=original_mmlu(original_dir, data_root, evaluation))
    from unlearn_search.evaluation.reference import original_nll

    paths, manifest = paths_from_root(data_root), read_target_manifest(original_dir)
    reference = original_nll(original_dir, paths, evaluation)
    return evaluate(model, tokenizer, paths, evaluation, manifest, output, known_mmlu, reference)


def export_and_evaluate(
    trained: Path, original_dir, settings: dict[str, Any], model_path: Path, data_root, evaluation, output: Path
) -> dict | None:
    """``export_model``, then the full evaluation of the student (None without one), on the
    original model's item subset, on this process's device in the trial's dtype."""
    from unlearn_search.models import load_tokenizer

    model = export_model(trained, original_dir, settings, model_path)
    if evaluation is None:
        return None
    return evaluate_loaded(model, load_tokenizer(model_path), original_dir, data_root, evaluation, output)
