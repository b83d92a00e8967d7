"""Schedules: which forget and retain items each optimization step sees, and with what scale.

A schedule only plans indices; the method's loss turns each step into a number. ``boundary``
marks the steps after which intermediate metrics are reported (end of an epoch or a chunk),
the points where a search may prune.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from unlearn_search.methods.base import Knob, check_params


@dataclass(frozen=True)
class Step:
    forget: tuple[int, ...]
    retain: tuple[int, ...]
    forget_scale: float = 1.0
    retain_scale: float = 1.0
    phase: str = "joint"
    boundary: str | None = None  # e.g. "epoch 1" or "chunk 3"
    lr_scale: float = 1.0  # this step's learning rate, as a fraction of the trial's lr
    restart: bool = False  # a fresh optimizer (no Adam moments) from this step on
    # On a data-parallel rank holding part of the step: how much its means count, as
    # ((batch, unit), share) pairs (see ``StepInputs.share``); empty on one process.
    shares: tuple[tuple[tuple[str, str], float], ...] = ()


class RetainCycle:
    """Retain indices in a shuffled order, cycled forever: every retain item is used in turn."""

    def __init__(self, n_retain: int, rng: random.Random):
        self.order = list(range(n_retain))
        rng.shuffle(self.order)
        self.position = 0

    def take(self, count: int) -> tuple[int, ...]:
        if not self.order:
            return ()
        taken = [self.order[(self.position + i) % len(self.order)] for i in range(count)]
        self.position = (self.position + count) % len(self.order)
        return tuple(taken)


class Schedule:
    name: ClassVar[str]
    summary: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    needs_retain: ClassVar[bool] = False

    def __init__(self, **params: Any):
        self.params = check_params(f"schedule {self.name}", self.knobs, params)

    def plan(self, n_forget: int, n_retain: int, batch_size: int, epochs: int, seed: int) -> list[Step]:
        raise NotImplementedError


def batches(indices: list[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(indices[i : i + size]) for i in range(0, len(indices), size)]


class Joint(Schedule):
    name = "joint"
    summary = "each step pairs a forget batch with the next retain batch (retain cycled)"
    reference_paper = "the usual paired forget/retain loop (TOFU, open-unlearning)"

    def plan(self, n_forget, n_retain, batch_size, epochs, seed):
        rng = random.Random(seed)
        retain = RetainCycle(n_retain, rng)
        steps = []
        for epoch in range(1, epochs + 1):
            order = list(range(n_forget))
            rng.shuffle(order)
            epoch_steps = [Step(b, retain.take(len(b))) for b in batches(order, batch_size)]
            epoch_steps[-1] = replace(epoch_steps[-1], boundary=f"epoch {epoch}")
            steps += epoch_steps
        return steps


def chunks(n_forget: int, chunk_size: int) -> list[list[int]]:
    """The forget set in order, cut into disjoint chunks of ``chunk_size``."""
    return [list(range(i, min(i + chunk_size, n_forget))) for i in range(0, n_forget, chunk_size)]


def own_run(steps: list[Step]) -> list[Step]:
    """``steps`` trained as one Hugging Face ``Trainer`` run trains them (the SemEval winners' code
    makes one per chunk or phase): a fresh AdamW at the first step and the Trainer's default
    learning rate, decaying linearly from ``lr`` to 0 (step k of T: (T - k) / T)."""
    total = len(steps)
    return [replace(step, lr_scale=(total - k) / total, restart=k == 0) for k, step in enumerate(steps)]


class SUGD(Schedule):
    """Sequential unlearning with gradient difference (AILS-NTUA, SemEval-2025 Task 4 winners).

    Forget chunks are taken in dataset order. Each chunk becomes one interleaved sequence,
    every forget item (weight -1) followed by ``positive_ratio`` retain items (weight
    ``positive_factor``), retain items cycled across chunks; the sequence is trained in order
    (no shuffling) for ``epochs_per_chunk`` epochs. With ``split_retain: false`` a chunk is instead
    trained with the whole retain set, reshuffled for each chunk and spread evenly: each forget
    item followed by ``n_retain // chunk_size`` retain items, the remainder after the chunk's
    last item (``positive_ratio`` is then unused). A batch's loss is the weighted mean over
    its items, which the step's scales express for a forget/retain method: forget scale =
    n_forget / n, retain scale = positive_factor * n_retain / n (each part a token-mean CE).
    With ``restart_per_chunk`` each chunk is its own fine-tuning run, as the authors' code makes
    a new Hugging Face ``Trainer`` per chunk: a fresh AdamW and the Trainer's default learning
    rate, decaying linearly from ``lr`` to 0 over the chunk's steps (step k of T: (T - k) / T).
    Follows the authors' code (iraklis07/llm-unlearning, methods/sequential.py).
    """

    name = "sugd"
    summary = "forget chunks in order, each item followed by positive_ratio weighted retain items"
    reference_paper = (
        "Premptis et al. 2025, SemEval-2025 Task 4 winner (arXiv 2503.02443); their code iraklis07/llm-unlearning"
    )
    knobs = (
        Knob("chunk_size", 32, "forget items per chunk", low=1),
        Knob("positive_ratio", 7, "retain items after each forget item", low=0),
        Knob("positive_factor", 0.5, "weight of each retain item (forget items weigh -1)", low=0),
        Knob("epochs_per_chunk", 7, "passes over each chunk before the next", low=1),
        Knob(
            "split_retain",
            True,
            "cycle disjoint retain items across chunks, positive_ratio after each forget "
            "item (else the whole retain set with each chunk, reshuffled, spread evenly "
            "after its forget items; positive_ratio unused)",
        ),
        Knob(
            "restart_per_chunk",
            True,
            "each chunk its own run, as the authors train it: a fresh AdamW and "
            "the lr decaying linearly to 0 over the chunk (else one optimizer "
            "at a constant lr)",
        ),
    )
    needs_retain = True

    def plan(self, n_forget, n_retain, batch_size, epochs, seed):
        p = self.params
        rng = random.Random(seed)
        retain = RetainCycle(n_retain, rng)
        steps = []
        for number, chunk in enumerate(chunks(n_forget, p["chunk_size"]), start=1):
            stream = []  # (kind, index) in the order the item weights are defined
            if p["split_retain"]:
                for index in chunk:
                    stream.append(("f", index))
                    stream += [("r", i) for i in retain.take(p["positive_ratio"])]
            else:
                # The whole retain set, reshuffled for each chunk, spread evenly: each forget item
                # followed by n_retain // chunk items, the rest after the last (the authors' code).
                order = list(range(n_retain))
                random.Random(f"{seed}/{number}").shuffle(order)  # seed s, chunk k+1 != seed s+1, chunk k
                ratio = n_retain // len(chunk)
                for position, index in enumerate(chunk):
                    stream.append(("f", index))
                    stream += [("r", i) for i in order[position * ratio : (position + 1) * ratio]]
                stream += [("r", i) for i in order[len(chunk) * ratio :]]
            chunk_steps = []
            for _ in range(p["epochs_per_chunk"] * epochs):
                for start in range(0, len(stream), batch_size):
                    items = stream[start : start + batch_size]
                    forget = tuple(i for k, i in items if k == "f")
                    kept = tuple(i for k, i in items if k == "r")
                    chunk_steps.append(
                        Step(
                            forget,
                            kept,
                            len(forget) / len(items),
                            p["positive_factor"] * len(kept) / len(items),
                            "sugd",
                        )
                    )
            if p["restart_per_chunk"]:
                chunk_steps = own_run(chunk_steps)
            chunk_steps[-1] = replace(chunk_steps[-1], boundary=f"chunk {number}")
            steps += chunk_steps
        return steps


class AGAD(Schedule):
    """Alternating gradient ascent / descent over forget chunks (AILS-NTUA's AGAD).

    Forget chunks in dataset order; each gets a forgetting phase (gradient ascent on the chunk
    alone, ``epochs`` epochs). After every ``1 / interleaving`` forgetting phases an annealing
    phase follows: descent on a fresh random ``annealing`` fraction of the retain set. Forget
    items left over after the last whole chunk get a forgetting phase and no annealing. With
    ``final_annealing`` the run ends with descent on the whole retain set. With
    ``restart_per_phase`` each phase is its own fine-tuning run, as the authors' code makes a new
    Hugging Face ``Trainer`` per phase (see ``own_run``). Follows the authors' code
    (iraklis07/llm-unlearning, methods/alternating.py).
    """

    name = "agad"
    summary = "gradient ascent per forget chunk, alternating with descent on sampled retain items"
    reference_paper = (
        "Premptis et al. 2025, SemEval-2025 Task 4 winner (arXiv 2503.02443); their code iraklis07/llm-unlearning"
    )
    knobs = (
        Knob("chunk_size", 64, "forget items per chunk", low=1),
        Knob(
            "interleaving",
            1.0,
            "annealing phases per forgetting phase (0: none, 0.5: after every 2nd, 1: after each)",
            low=0,
            high=1,
        ),
        Knob("annealing", 0.25, "fraction of the retain set sampled for each annealing phase", high=1, positive=True),
        Knob("final_annealing", True, "end with descent on the whole retain set"),
        Knob(
            "restart_per_phase",
            True,
            "each phase its own run, as the authors train it: a fresh AdamW and "
            "the lr decaying linearly to 0 over the phase (else one optimizer "
            "at a constant lr)",
        ),
    )
    needs_retain = True

    def plan(self, n_forget, n_retain, batch_size, epochs, seed):
        p = self.params
        rng = random.Random(seed)

        def phase(indices: list[int], kind: str, boundary: str) -> list[Step]:
            out = []
            for _ in range(epochs):
                order = list(indices)
                rng.shuffle(order)
                out += [
                    Step(b, (), phase=kind) if kind == "ascent" else Step((), b, phase=kind)
                    for b in batches(order, batch_size)
                ]
            if p["restart_per_phase"]:
                out = own_run(out)
            out[-1] = replace(out[-1], boundary=boundary)
            return out

        steps, count = [], 0
        for number, chunk in enumerate(chunks(n_forget, p["chunk_size"]), start=1):
            steps += phase(chunk, "ascent", f"chunk {number} forgetting")
            count += 1
            remainder = len(chunk) < p["chunk_size"]  # the authors' "final forgetting": no annealing after it
            if p["interleaving"] > 0 and count >= 1 / p["interleaving"] and not remainder and n_retain:
                sample = rng.sample(range(n_retain), max(1, int(p["annealing"] * n_retain)))
                steps += phase(sample, "annealing", f"chunk {number} annealing")
                count = 0
        if p["final_annealing"] and n_retain:
            steps += phase(list(range(n_retain)), "final-annealing", "final annealing")
        return steps
