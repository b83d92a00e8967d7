"""DeepSpeed engines for the student and the frozen teacher, on the current Ray Train worker."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods import Reference
from unlearn_search.methods.schedules import Step
from unlearn_search.training.loop import ScheduledOptimizer, torch_optimizer

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


def mean_over_ranks(value: float, device="cpu") -> float:
    """``value`` averaged over the ranks (itself without a process group); every rank must call it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    total = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


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

    def all_finite(self, value: float) -> bool:
        """Whether every rank's loss is finite: all ranks stop at the same step or none does."""
        import math

        import torch.distributed as dist

        # On the engine's device: NCCL (GPU workers) reduces only CUDA tensors.
        flag = torch.tensor([1.0 if math.isfinite(value) else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def mean_over_ranks(self, value: float) -> float:
        return mean_over_ranks(value, self.device)

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


def shard_steps(steps: list[Step], rank: int, world: int) -> list[Step]:
    """This rank's share of every step (data parallel); each rank gets at least one item.

    ZeRO-3 gathers parameters collectively inside each forward, so every rank must run the
    same forwards: a step smaller than the world repeats items rather than leaving a rank idle.
    """
    def part(indices: tuple[int, ...]) -> tuple[int, ...]:
        if not indices:
            return ()
        mine = indices[rank::world]
        return mine if mine else (indices[rank % len(indices)],)
    return [dataclasses.replace(s, forget=part(s.forget), retain=part(s.retain)) for s in steps]


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); every rank must call it."""
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    if zero == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return {k: v.float().cpu() for k, v in state.items()} if state is not None else None
    if int(os.environ.get("RANK", "0")) == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    return None

