"""The shared unlearning loop: a schedule's steps, a method's loss, guards, and reports.

The loop does not know how parameters are updated: a ``Backend`` does (a plain optimizer here,
a DeepSpeed engine on Ray Train workers), so every method runs the same way in both.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from unlearn_search.data import Encoded, collate
from unlearn_search.data.benchmark import Item
from unlearn_search.data.tokenize import IGNORE_INDEX, encode_all
from unlearn_search.errors import UnlearnSearchError
from unlearn_search.methods.base import Batch, Method, Reference, StepInputs
from unlearn_search.methods.schedules import Step
from unlearn_search.models.trainable import LayerProbe


class DivergedError(UnlearnSearchError):
    """The loss became NaN or infinite: the run ends and no model is written."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step  # the step (1-based) whose loss was not finite, where known


class Backend(Protocol):
    def forward(self, batch: Batch) -> torch.Tensor: ...

    def backward_step(self, loss: torch.Tensor, lr_scale: float = 1.0) -> float: ...

    def restart(self) -> None:
        """Drop the optimizer's state (Adam moments and step count): a new run from here."""

    def mean_over_ranks(self, values: Sequence[float]) -> list[float]:
        """Each value's mean over the data-parallel ranks; every rank must call it.

        Decisions every rank must take alike go through it: a rank that stops or skips its
        backward alone leaves the others waiting in a ZeRO collective.
        """


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer holding the moments and learning rates, under DeepSpeed's wrappers."""
    while not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class ScheduledOptimizer:
    """A step's learning rate as a fraction of the base one, and restarts, on any torch optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float):
        # The trial's lr, not the groups' current one: a checkpoint restores the last scaled value.
        # Every group gets it (a trial's optimizer has one group).
        self.optimizer, self.lr = optimizer, lr

    def set_lr_scale(self, scale: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * scale

    def restart(self) -> None:
        # In place, not by emptying the state: ZeRO 1/2 and DeepSpeed's bf16 optimizer keep views
        # into the moments (linked once, after the first step), which would then hold the old
        # ones forever. Zero moments and step 0 are what a new Adam starts from.
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.zero_()
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    state[key] = type(value)(0)
        for group in self.optimizer.param_groups:
            if "step" in group:  # DeepSpeed's FusedAdam counts steps per group
                group["step"] = 0


class TorchBackend:
    """AdamW with gradient clipping over the parameters that require grad."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0):
        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise UnlearnSearchError("no trainable parameters (check trainable / last_k / LoRA settings)")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=lr, weight_decay=weight_decay)
        self.scheduled = ScheduledOptimizer(self.optimizer, lr)
        self.max_grad_norm = max_grad_norm
        model.train()

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def backward_step(self, loss: torch.Tensor, lr_scale: float = 1.0) -> float:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.scheduled.set_lr_scale(lr_scale)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def restart(self) -> None:
        self.scheduled.restart()

    def mean_over_ranks(self, values: Sequence[float]) -> list[float]:
        return list(values)  # one process


@dataclass
class TrainData:
    """Encoded forget and retain items, and substitute answers aligned with the forget items."""

    forget: list[Encoded]
    retain: list[Encoded]
    pad_token_id: int
    alternative: list[Encoded] | None = None

    def batch(self, which: str, indices: Sequence[int]) -> Batch | None:
        examples = getattr(self, which)
        if not indices or examples is None:
            return None
        return collate([examples[i] for i in indices], self.pad_token_id)


def alternative_answers(
    kind: str | None,
    forget: Sequence[Item],
    retain: Sequence[Item],
    tokenizer,
    refusals: Sequence[str] | None,
    random_source: str,
    seed: int,
) -> list[str] | None:
    """Substitute answers for the forget prompts: template refusals or random answers."""
    if kind is None:
        return None
    rng = random.Random(seed)
    if kind == "refusal":
        if not refusals:
            raise UnlearnSearchError("this method needs refusal templates (option refusals: a CSV path)")
        return [rng.choice(list(refusals)) for _ in forget]
    if random_source == "retain":
        return [rng.choice(list(retain)).output for _ in forget]
    # Sorted: a fast tokenizer's vocabulary comes in a hash order that differs between processes,
    # and every worker of a trial must draw the same answers (their lengths decide its part).
    vocab = sorted(t for t in tokenizer.get_vocab().values() if t not in tokenizer.all_special_ids)
    return [tokenizer.decode([rng.choice(vocab) for _ in tokenizer(item.output)["input_ids"]]) for item in forget]


def encode_items(
    tokenizer, items: Sequence[Item], max_length: int, answers: Sequence[str] | None = None, cache: Path | None = None
) -> list[Encoded]:
    """Each item's prompt with its answer (or ``answers``' substitute), encoded; ``cache``: a
    folder where the encodings are kept for the next call (``data.tokenize.encode_all``)."""
    answers = answers if answers is not None else [i.output for i in items]
    return encode_all(tokenizer, [i.input for i in items], answers, max_length, cache)


@dataclass
class Report:
    """Posted at each schedule boundary; a callback may compute metrics and ask to stop."""

    boundary: str
    step: int
    losses: dict[str, float]


@dataclass
class TrainResult:
    steps: int
    losses: list[dict[str, float]]
    reports: list[Report]
    stopped_early: bool = False


def joint_forward(
    forward: Callable[[Batch], tuple[torch.Tensor, ...]], batches: Sequence[Batch]
) -> list[tuple[torch.Tensor, ...]]:
    """Each batch's outputs (logits, and hidden states where probed: each ``[rows, width, ...]``)
    from one forward pass over all their rows, right-padded to one width.

    One graph for one backward: under ZeRO-3 more passes of the same layers before a backward
    make it keep the layers' gathered parameters, at OLMo-1B's shape a whole fp32 copy more per
    worker (docs/results.md). Right padding leaves a causal model's outputs at the real positions
    unchanged.
    """
    if len(batches) == 1:
        return [forward(batches[0])]
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    together = {
        key: torch.cat([torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in batches])
        for key, value in fill.items()
    }
    outputs = forward(together)
    ends = itertools.accumulate(b["input_ids"].shape[0] for b in batches)
    return [
        tuple(output[end - b["input_ids"].shape[0] : end, : b["input_ids"].shape[1]] for output in outputs)
        for b, end in zip(batches, ends)
    ]


def probed_forward(forward: Callable[[Batch], torch.Tensor], probe: LayerProbe | None) -> Callable:
    """``forward`` giving ``(logits,)``, or ``(logits, hidden states)`` at the probe's layer."""

    def outputs(batch: Batch) -> tuple[torch.Tensor, ...]:
        logits = forward(batch)
        return (logits,) if probe is None else (logits, probe.take())

    return outputs


def step_inputs(
    method: Method,
    step: Step,
    data: TrainData,
    forward: Callable[[Batch], torch.Tensor],
    reference: Callable[[Batch], Reference] | None = None,
    forget_loss_bound: float | None = None,
    mean_over_ranks: Callable[[float], float] = lambda value: value,
    probe: LayerProbe | None = None,
) -> StepInputs:
    """What ``method.loss`` sees at ``step``: its batches, and each model's outputs computed once
    (with ``probe``, the hidden states at its layer from the same student pass as the logits)."""
    batches = {
        "forget": data.batch("forget", step.forget),
        "retain": data.batch("retain", step.retain),
        "alternative": data.batch("alternative", step.forget),
    }
    student_cache: dict[int, tuple[torch.Tensor, ...]] = {}
    reference_cache: dict[str, Reference] = {}
    joined = [batches[name] for name in method.student_batches() if batches.get(name) is not None]
    outputs = probed_forward(forward, probe)

    def student_outputs(batch: Batch) -> tuple[torch.Tensor, ...]:
        if not student_cache and any(batch is b for b in joined):
            # The reference's passes first: under ZeRO-3 (a LoRA student's teacher is its own
            # base) a pass between the student's forward and backward made that backward hold
            # the whole gathered model (OLMo-1B, 2 ranks: 1.6x a fp32 copy, against 0.9x).
            for name in method.reference_batches():
                if batches.get(name) is not None:
                    reference_of(name)
            student_cache.update(zip(map(id, joined), joint_forward(outputs, joined)))
        if id(batch) not in student_cache:  # a batch the method did not declare: correct, one more graph
            student_cache[id(batch)] = outputs(batch)
        return student_cache[id(batch)]

    def student(batch: Batch) -> torch.Tensor:
        return student_outputs(batch)[0]

    def hidden(batch: Batch) -> torch.Tensor:
        if probe is None:
            raise UnlearnSearchError(f"method {method.name} reads hidden states, but no layer is probed")
        return student_outputs(batch)[1]

    def reference_of(which: str) -> Reference:
        if reference is None:
            raise UnlearnSearchError(f"method {method.name} needs the original model's outputs (no teacher given)")
        if which not in reference_cache:
            reference_cache[which] = reference(batches[which])
        return reference_cache[which]

    return StepInputs(
        forget=batches["forget"],
        retain=batches["retain"],
        student=student,
        reference=reference_of,
        hidden=hidden,
        alternative=batches["alternative"],
        forget_scale=step.forget_scale,
        retain_scale=step.retain_scale,
        forget_loss_bound=forget_loss_bound,
        mean_over_ranks=mean_over_ranks,
        shares=dict(step.shares),
    )


def run(
    method: Method,
    steps: Sequence[Step],
    data: TrainData,
    backend: Backend,
    reference: Callable[[Batch], Reference] | None = None,
    forget_loss_bound: float | None = None,
    on_boundary: Callable[[Report], bool | None] | None = None,
    progress: bool = False,
    start_step: int = 0,
    probe: LayerProbe | None = None,
) -> TrainResult:
    """Run ``steps[start_step:]``; ``on_boundary`` returning True stops the run (pruning). ``probe``
    keeps the student's hidden states at the layer the method reads (``Method.probed_layer``)."""
    if method.reads_hidden and probe is None:  # at once, not at the first step on every worker
        raise UnlearnSearchError(f"method {method.name} reads one layer's hidden states: run needs its LayerProbe")
    losses: list[dict[str, float]] = []
    reports: list[Report] = []
    window: list[dict[str, float]] = []
    bar = tqdm(range(start_step, len(steps)), desc=f"unlearning ({method.name})", disable=not progress)
    for index in bar:
        step_started = time.perf_counter()
        step = steps[index]
        inputs = step_inputs(
            method,
            step,
            data,
            backend.forward,
            reference,
            forget_loss_bound,
            lambda value: backend.mean_over_ranks([value])[0],
            probe,
        )
        if step.restart:
            backend.restart()
        output = method.loss(inputs)
        # Each rank's shared values average to the whole step's; one reduction for all of them. A
        # non-finite loss on any rank makes the mean non-finite, so every rank stops at this step.
        names = sorted(output.parts)
        value, *parts = backend.mean_over_ranks([float(output.loss.detach())] + [output.parts[n] for n in names])
        if not math.isfinite(value):
            raise DivergedError(
                f"loss is {value} at step {index + 1} ({step.phase}): the run diverged; "
                f"lower lr or the forget weight, or set forget_loss_bound",
                step=index + 1,
            )
        # A bounded ascent with no retain term can leave nothing to differentiate this step.
        grad_norm = backend.backward_step(output.loss, step.lr_scale) if output.loss.requires_grad else 0.0
        record = {
            "loss": value,
            "grad_norm": grad_norm,
            **dict(zip(names, parts)),
            "step_seconds": time.perf_counter() - step_started,
        }
        losses.append(record)
        window.append(record)
        bar.set_postfix(loss=f"{value:.3f}")
        if step.boundary:
            mean = {
                k: sum(r[k] for r in window if k in r) / sum(1 for r in window if k in r)
                for k in {k for r in window for k in r}
            }
            report = Report(step.boundary, index + 1, mean)
            window = []
            reports.append(report)
            if on_boundary is not None and on_boundary(report):
                return TrainResult(index + 1, losses, reports, stopped_early=True)
    return TrainResult(len(steps), losses, reports)
