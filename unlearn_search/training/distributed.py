"""DeepSpeed engines for the student and the frozen teacher, on the current Ray Train worker."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

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


def deepspeed_config(stage: int, offload: bool, lr: float, weight_decay: float, max_grad_norm: float,
                     micro_batch: int, config_dir: Path = DEEPSPEED_DIR) -> dict[str, Any]:
    """One of ``cluster/deepspeed/*.json`` with its ``auto`` fields filled from the trial."""
    if stage not in ZERO_CONFIGS:
        raise UnlearnSearchError(f"zero_stage={stage}: expected one of 0, 2, 3")
    name = "zero3_offload.json" if offload and stage == 3 else ZERO_CONFIGS[stage]
    config = json.loads((config_dir / name).read_text())
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_clipping"] = max_grad_norm
    config["optimizer"]["params"].update(lr=lr, weight_decay=weight_decay)
    config["bf16"]["enabled"] = on_gpu() and torch.cuda.is_bf16_supported()
    if offload and stage == 2:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu()}
    if not on_gpu():  # pinned host memory needs a GPU driver
        for key in ("offload_optimizer", "offload_param"):
            if key in config["zero_optimization"]:
                config["zero_optimization"][key]["pin_memory"] = False
    return config


def teacher_config(stage: int = 3, config_dir: Path = DEEPSPEED_DIR) -> dict[str, Any]:
    config = json.loads((config_dir / "teacher_zero3.json").read_text())
    config["zero_optimization"]["stage"] = stage
    config["bf16"]["enabled"] = on_gpu() and torch.cuda.is_bf16_supported()
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
        return self.engine(input_ids=batch["input_ids"].to(self.device),
                           attention_mask=batch["attention_mask"].to(self.device)).logits

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


def teacher_reference(engine):
    """Reference outputs from a frozen ZeRO-3 teacher engine (every rank must call in step)."""
    @torch.no_grad()
    def reference(batch):
        logits = engine(input_ids=batch["input_ids"].to(engine.device),
                        attention_mask=batch["attention_mask"].to(engine.device)).logits
        return Reference.from_logits(logits, batch["labels"].to(logits.device))
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
        parts[longest:longest] = [run[:len(run) // 2], run[len(run) // 2:]]
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
    scored = {which: [sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in getattr(data, which)]
              for which in kinds}

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
            for unit, count in (("rows", len), ("tokens", lambda part: sum(scored[which][i] for i in part))):
                total = sum(count(part) for part, counts in each if counts)
                if total:
                    mine, counts = each[rank]
                    shares.append(((which, unit), world * count(mine) / total if counts else 0.0))
        sharded.append(dataclasses.replace(step, forget=parts["forget"][rank][0], retain=parts["retain"][rank][0],
                                           shares=tuple(shares)))
    return sharded


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); every rank must call it."""
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if zero == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.float().cpu() for k, v in state.items()} if state is not None else None
    if int(os.environ.get("RANK", "0")) == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    return None

