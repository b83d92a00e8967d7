"""DeepSpeed engines for the student and the frozen teacher, on the current Ray Train worker."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from unlearn_search.data.tokenize import IGNORE_INDEX
from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods import Reference
from unlearn_search.methods.schedules import Step
from unlearn_search.training.loop import ScheduledOptimizer, TrainData, torch_optimizer

DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "cluster" / "deepspeed"
ZERO_CONFIGS = {0: "zero0.json", 2: "zero2.json", 3: "zero3.json"}


def on_gpu() -> bool:
    return torch.cuda.is_available()


def deepspeed_config(
    stage: int,
    offload: bool,
    lr: float,
    weight_decay: float,
    max_grad_norm: float,
    micro_batch: int,
    dtype: torch.dtype = torch.float32,
    config_dir: Path = DEEPSPEED_DIR,
) -> dict[str, Any]:
    """One of ``cluster/deepspeed/*.json`` with its ``auto`` fields filled from the trial
    (``bf16`` on exactly when the trial's dtype is bfloat16)."""
    if stage not in ZERO_CONFIGS:
        raise UnlearnSearchError(f"zero_stage={stage}: expected one of 0, 2, 3")
    name = "zero3_offload.json" if offload and stage == 3 else ZERO_CONFIGS[stage]
    config = json.loads((config_dir / name).read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_clipping"] = max_grad_norm
    config["optimizer"]["params"].update(lr=lr, weight_decay=weight_decay)
    config["bf16"]["enabled"] = dtype == torch.bfloat16
    if offload and stage == 2:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if not on_gpu():  # pinned host memory needs a GPU driver
        for key in ("offload_optimizer", "offload_param"):
            if key in config["zero_optimization"]:
                config["zero_optimization"][key]["pin_memory"] = False
        if not offloaded(config):
            # torch's AdamW, not DeepSpeed's FusedAdam: on the CPU accelerator that is a C++ extension
            # compiled on first use (minutes) and loaded by every worker of every trial (seconds).
            config["optimizer"]["params"]["torch_adam"] = True
    return config


def offloaded(config: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config moves the optimizer's states to host memory (DeepSpeedCPUAdam's job)."""
    return "offload_optimizer" in config["zero_optimization"]


def teacher_config(
    stage: int = 3, dtype: torch.dtype = torch.float32, config_dir: Path = DEEPSPEED_DIR
) -> dict[str, Any]:
    config = json.loads((config_dir / "teacher_zero3.json").read_text())
    config["zero_optimization"]["stage"] = stage
    config["bf16"]["enabled"] = dtype == torch.bfloat16
    return config


def means_over_ranks(values: Sequence[float], device="cpu") -> list[float]:
    """Each value averaged over the ranks (as given without a process group); every rank must call it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [float(v) for v in values]
    # On the given device: NCCL (GPU workers) reduces only CUDA tensors.
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return (total / dist.get_world_size()).tolist()


def mean_over_ranks(value: float, device="cpu") -> float:
    return means_over_ranks([value], device)[0]


class DeepSpeedBackend:
    """The loop's backend over a DeepSpeed engine: it owns the optimizer, clipping and ZeRO."""

    def __init__(self, engine, lr: float):
        self.engine = engine
        self.device = engine.device
        self.scheduled = ScheduledOptimizer(torch_optimizer(engine.optimizer), lr)
        engine.train()

    def forward(self, batch) -> torch.Tensor:
        return self.engine(
            input_ids=batch["input_ids"].to(self.device), attention_mask=batch["attention_mask"].to(self.device)
        ).logits

    def mean_over_ranks(self, values: Sequence[float]) -> list[float]:
        return means_over_ranks(values, self.device)

    def backward_step(self, loss: torch.Tensor, lr_scale: float = 1.0) -> float:
        self.engine.backward(loss)
        self.scheduled.set_lr_scale(lr_scale)
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def restart(self) -> None:
        self.scheduled.restart()


def teacher_reference(engine, layer: int | None = None):
    """Reference outputs from a frozen ZeRO-3 teacher engine, with ``layer``'s hidden states where
    the method reads them (every rank must call in step)."""
    from unlearn_search.models.trainable import probe_layer

    probe = probe_layer(engine.module, layer)

    @torch.no_grad()
    def reference(batch):
        logits = engine(
            input_ids=batch["input_ids"].to(engine.device), attention_mask=batch["attention_mask"].to(engine.device)
        ).logits
        hidden = probe.take() if probe is not None else None
        return Reference.from_logits(logits, batch["labels"].to(logits.device), hidden=hidden)

    return reference


def adapter_reference(engine, probe=None):
    """Reference outputs of a LoRA student's teacher: the student itself with its adapters off.

    The frozen base of a LoRA student is the original model, so it is the teacher, and no
    second copy is loaded (at 7B, 14 GB of bf16 shards fewer per trial). ``probe``: the student's
    own ``LayerProbe``, which this pass also goes through. Every rank must call in step.
    """

    @torch.no_grad()
    def reference(batch):
        with engine.module.disable_adapter():
            logits = engine.module(
                input_ids=batch["input_ids"].to(engine.device), attention_mask=batch["attention_mask"].to(engine.device)
            ).logits
        hidden = probe.take() if probe is not None else None
        return Reference.from_logits(logits, batch["labels"].to(logits.device), hidden=hidden)

    return reference


def padded_parts(indices: Sequence[int], length: Callable[[int], int], world: int) -> list[tuple[int, ...]]:
    """``indices`` in ``world`` non-empty parts, with the largest padded size (rows times the
    part's longest row) as small as it gets.

    A part costs what its longest row costs each of its rows, so long rows go together: sorted
    longest first, the parts are runs of that order, cut greedily under the smallest cap that
    needs no more than ``world`` runs. With fewer indices than parts, the parts after the first
    ``len(indices)`` repeat an item (``shard_steps`` gives them no share).
    """
    if not indices:
        return [()] * world
    order = sorted(indices, key=lambda i: (-length(i), i))
    if len(order) <= world:
        return [(order[r % len(order)],) for r in range(world)]
    size = [max(1, length(i)) for i in order]

    def runs(cap: int) -> list[list[int]]:
        cut, start = [], 0
        while start < len(order):
            end = min(len(order), start + max(1, cap // size[start]))
            cut.append(order[start:end])
            start = end
        return cut

    low, high = size[0], len(order) * size[0]
    while low < high:
        cap = (low + high) // 2
        low, high = (low, cap) if len(runs(cap)) <= world else (cap + 1, high)
    parts = runs(low)
    while len(parts) < world:  # halving a run never raises the largest cost
        longest = max(range(len(parts)), key=lambda p: len(parts[p]))
        run = parts.pop(longest)
        parts[longest:longest] = [run[: len(run) // 2], run[len(run) // 2 :]]
    return [tuple(p) for p in parts]


def shard_steps(steps: Sequence[Step], rank: int, world: int, data: TrainData) -> list[Step]:
    """This rank's part of every step (data parallel), with its ``Step.shares``.

    Ranks wait for each other at every ZeRO collective, so a step takes as long as its slowest
    part: parts are balanced by padded size, not by rows (SemEval mixes 16-token QA items with
    250-token passages: a rank holding one passage and three short rows pads all four to 250).
    Every rank gets at least one forget and one retain item when the step has any, since ZeRO-3
    gathers parameters collectively inside each forward and every rank must run the same ones.
    """
    # Per example, once: the padded length that balancing weighs (the forget rows' substitute
    # answers pad too) and the scored tokens that token shares count.
    kinds = ["forget", "retain"] + (["alternative"] if data.alternative is not None else [])
    lengths = {which: [len(e.input_ids) for e in getattr(data, which)] for which in kinds}
    if data.alternative is not None:
        lengths["forget"] = [f + a for f, a in zip(lengths["forget"], lengths["alternative"])]
    scored = {
        which: [sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in getattr(data, which)]
        for which in kinds
    }

    def cost(which: str, part: tuple[int, ...]) -> int:
        return len(part) * max((lengths[which][i] for i in part), default=0)

    def split(which: str, indices: tuple[int, ...], longest_first: bool) -> list[tuple[tuple[int, ...], bool]]:
        """(part, counts) per rank: a part that only repeats an item to keep its rank in step counts for nothing."""
        parts = padded_parts(indices, lengths[which].__getitem__, world)
        counted = [(part, r < len(indices)) for r, part in enumerate(parts)]
        return sorted(counted, key=lambda pc: cost(which, pc[0]) * (-1 if longest_first else 1))

    sharded = []
    for step in steps:
        # The longest forget part goes with the shortest retain part.
        parts = {"forget": split("forget", step.forget, True), "retain": split("retain", step.retain, False)}
        if data.alternative is not None:
            parts["alternative"] = parts["forget"]
        shares = []
        for which, each in parts.items():
            for unit, count in (
                ("rows", len),
                ("tokens", lambda part, which=which: sum(scored[which][i] for i in part)),
            ):
                total = sum(count(part) for part, counts in each if counts)
                if total:
                    mine, counts = each[rank]
                    shares.append(((which, unit), world * count(mine) / total if counts else 0.0))
        sharded.append(
            dataclasses.replace(
                step, forget=parts["forget"][rank][0], retain=parts["retain"][rank][0], shares=tuple(shares)
            )
        )
    return sharded


def zero3_enabled(ds_config: dict) -> bool:
    return ds_config.get("zero_optimization", {}).get("stage") == 3


def load_partitioned(path: str | Path, ds_config: dict, dtype: torch.dtype):
    """The checkpoint at ``path`` built straight into ZeRO-3 partitions: ``(model, handle)``.

    No rank ever holds the whole model: transformers builds it under ``deepspeed.zero.Init``
    (the ``HfDeepSpeedConfig`` handle tells it to; keep the handle while the model is used, since
    generation reads it too), then each tensor is read from its safetensors file on rank 0 alone,
    one at a time, and scattered into the partitions. transformers' own ``from_pretrained``
    under ZeRO-3 maps every shard at once on rank 0, a whole extra copy at 7B.
    """
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    handle = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    files = safetensors_index(Path(path))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, parameter in model.named_parameters():  # the same order on every rank: each gather is collective
        if name not in files:
            raise UnlearnSearchError(
                f"checkpoint {path}: no tensor {name!r} in its safetensors files "
                f"(expected a checkpoint saved by save_pretrained for {type(model).__name__})"
            )
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
            if rank == 0:
                copy_tensor(files[name], name, parameter.data)
    model.eval()
    release_freed_memory()
    return model, handle


def _glibc():
    import ctypes
    import ctypes.util

    library = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(library) if library else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_large_frees(threshold_bytes: int = 8 << 20) -> None:
    """Have host allocations of ``threshold_bytes`` and more mapped apart, so that freeing one gives
    its memory back to the system (glibc only; elsewhere nothing).

    Building and stepping a ZeRO-3 model allocates each layer whole and frees it again: weight
    matrices of 8 MiB and more from OLMo-1B up (in bfloat16), under glibc's adaptive mmap threshold
    (up to 32 MiB), whose pages would otherwise stay in the heap, fragmented: measured on OLMo-1B,
    1 to 2 GB more per worker. Not lower: a mapped allocation is page-faulted and zeroed afresh each
    time, and the evaluation's and the steps' activations (a few MiB each) come and go at every
    call (a threshold of 1 MiB made the evaluation 1.34x slower on ``small``; docs/results.md).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes))


def release_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc only; elsewhere nothing)."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def safetensors_index(path: Path) -> dict[str, Path]:
    """Each tensor's file in a Hugging Face checkpoint (one ``model.safetensors`` or shards with an index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise UnlearnSearchError(
            f"checkpoint {path}: no model.safetensors or model.safetensors.index.json "
            f"(expected safetensors weights; convert .bin checkpoints with save_pretrained)"
        )
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def copy_tensor(file: Path, name: str, into: torch.Tensor) -> None:
    """One checkpoint tensor copied into ``into`` (converting its dtype) straight from the file's
    memory map, which is closed again at once: an open map would keep every page it served
    resident in this process, and a copy of the tensor would double it."""
    from safetensors import safe_open

    with safe_open(file, "pt") as handle:
        into.copy_(handle.get_tensor(name))


def trained_parameters(module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in module.named_parameters() if p.requires_grad]


def gather_trained(module, rank: int, group_bytes: int = 256 * 2**20) -> dict[str, torch.Tensor] | None:
    """The trained parameters (LoRA adapters, the last k layers, or every weight), whole, on
    rank 0's CPU in the dtype they train in; None on other ranks. Every rank must call it.

    Frozen weights never move, so they are never gathered: with LoRA or last_k a boundary moves
    a small part of the model. The gathers go in groups of about ``group_bytes``, so no rank
    holds more than one group beyond its own partitions.
    """
    import deepspeed

    state: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for group in byte_groups(trained_parameters(module), group_bytes):
        with deepspeed.zero.GatheredParameters([p for _, p in group]):
            if state is not None:
                state.update((name, p.detach().to("cpu", copy=True)) for name, p in group)
    return state


def byte_groups(named: list[tuple[str, torch.nn.Parameter]], limit: int) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """``named`` in order, cut into runs of at most ``limit`` bytes (a larger tensor alone)."""
    groups, size = [[]], 0
    for name, parameter in named:
        nbytes = full_numel(parameter) * parameter.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append((name, parameter))
        size += nbytes
    return [g for g in groups if g]


def full_numel(parameter: torch.nn.Parameter) -> int:
    """A parameter's element count, also while ZeRO-3 holds it as an empty partition placeholder."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))
