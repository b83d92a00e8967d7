"""What a loss sees at one step, and what it returns.

Losses are small pure functions of logits (see ``functional``); a method wires them to the
batches of a step. The student forward pass and the reference model's outputs are reached
through callables, so the same method runs with a live teacher or a teacher-output cache, in a
plain PyTorch loop or inside a DeepSpeed engine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from unlearn_search.data.tokenize import IGNORE_INDEX
from unlearn_search.errors import UnlearnSearchError, one_of
from unlearn_search.methods import functional as F

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Reference:
    """The frozen original model's outputs on one batch.

    ``logprobs`` is the full log-softmax ``[B, T, V]`` (exact); when only the top-k was kept
    (a cache for a large vocabulary) ``topk_ids``/``topk_logprobs`` hold it instead.
    ``label_logprobs [B, T-1]`` is always the log-prob of each label token, so sequence
    log-likelihoods (NPO) are exact in both forms. ``hidden [B, T, D]`` is the output of the
    decoder layer the method probes (``Method.probed_layer``; RMU), where it probes one.
    """

    label_logprobs: torch.Tensor
    logprobs: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @classmethod
    def from_logits(
        cls,
        logits: torch.Tensor,
        labels: torch.Tensor,
        top_k: int | None = None,
        hidden: torch.Tensor | None = None,
    ) -> Reference:
        logits = logits.detach().float()
        hidden = hidden.detach() if hidden is not None else None
        label_logprobs, _ = F.token_logprobs(logits, labels)
        if top_k is None or top_k >= logits.shape[-1]:
            return cls(label_logprobs, logprobs=torch.log_softmax(logits, dim=-1), hidden=hidden)
        ids, logprobs = F.topk_reference(logits, top_k)
        return cls(label_logprobs, topk_ids=ids, topk_logprobs=logprobs, hidden=hidden)

    def kl(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """KL(reference || student) over the scored positions."""
        if self.logprobs is not None:
            return F.kl_full(student_logits, self.logprobs.to(student_logits.device), labels)
        return F.kl_topk(
            student_logits,
            self.topk_ids.to(student_logits.device),
            self.topk_logprobs.to(student_logits.device),
            labels,
        )

    def undial(self, student_logits: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
        """UNDIAL's distillation loss towards this distribution with each label lowered by ``beta``."""
        device = student_logits.device
        if self.logprobs is not None:
            return F.undial_loss(student_logits, self.logprobs.to(device), labels, beta)
        ids, logprobs, label = (t.to(device) for t in (self.topk_ids, self.topk_logprobs, self.label_logprobs))
        return F.undial_loss_topk(student_logits, ids, logprobs, label, labels, beta)

    def sequence_logprob(self, labels: torch.Tensor) -> torch.Tensor:
        mask = labels[:, 1:] != IGNORE_INDEX
        return (self.label_logprobs.to(labels.device) * mask).sum(-1)


@dataclass
class StepInputs:
    """One optimization step: batches, the schedule's scales, and access to the models.

    ``forget``/``retain``/``alternative`` hold ``input_ids``, ``attention_mask`` and
    answer-masked ``labels``; any may be None when the schedule's phase has no such batch.
    ``alternative`` pairs the forget prompts with substitute answers (refusals, random retain
    answers) for the methods that train towards them. ``hidden`` gives a batch's hidden states
    at the layer the method probes, from the same student pass as its logits.
    """

    forget: Batch | None
    retain: Batch | None
    student: Callable[[Batch], torch.Tensor]
    reference: Callable[[str], Reference] | None = None
    hidden: Callable[[Batch], torch.Tensor] | None = None
    alternative: Batch | None = None
    forget_scale: float = 1.0
    retain_scale: float = 1.0
    forget_loss_bound: float | None = None  # ascent stops while the forget CE is above it
    # A value's mean over the data-parallel ranks (identity on one process): decisions every rank
    # must take alike, since a rank that skips its backward leaves the others' ZeRO collectives hanging.
    mean_over_ranks: Callable[[float], float] = lambda value: value
    shares: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def share(self, batch: str, unit: str) -> float:
        """How much this rank's mean over ``batch``'s ``unit`` (``rows`` or ``tokens``) counts.

        Data-parallel ranks hold unequal parts of a step (split by padded length, not by rows)
        and their gradients are averaged, so a mean over this rank's rows or scored tokens, times
        its share, makes that average the whole step's mean, as on one process (share 1).
        """
        return self.shares.get((batch, unit), 1.0)


UNITS = ("rows", "tokens")  # what a term's mean averages over
BATCHES = ("forget", "retain", "alternative")  # StepInputs' batches


@dataclass(frozen=True)
class Term:
    """One mean in a loss: ``value`` averages over ``batch``'s ``unit`` (``rows`` or ``tokens``)
    on this rank. ``compose`` weights it by the rank's share of that batch (``StepInputs.share``),
    so that a loss file holds only its formula and cannot leave the share out."""

    value: torch.Tensor
    batch: str
    unit: str

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"Term.unit: expected one of {', '.join(UNITS)} (got {self.unit!r})")
        if self.batch not in BATCHES:
            raise ValueError(f"Term.batch: expected one of {', '.join(BATCHES)} (got {self.batch!r})")


# What a method's forget function returns: one term, or a weighted sum of terms.
Terms = Term | tuple[tuple[float, Term], ...]


def shared_value(step: StepInputs, terms: Terms) -> torch.Tensor:
    """The weighted sum of ``terms``, each times this rank's share of what it averages over: the
    mean over the ranks of this value is the whole step's, as on one process."""
    weighted = terms if isinstance(terms, tuple) else ((1.0, terms),)  # anything but a Term is refused below
    total = torch.zeros(())
    for weight, term in weighted:
        if not isinstance(term, Term):
            raise TypeError(
                f"a loss term must be a methods.base.Term naming the batch and unit of its mean (got {type(term)})"
            )
        total = total + weight * term.value * step.share(term.batch, term.unit)
    return total


@dataclass
class LossOutput:
    loss: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Knob:
    """One setting's declaration: name, default, help, and its valid values (choices, or bounds
    for a number). Methods and schedules declare their knobs with it, and the trial's own
    settings (``training.config.TrialConfig``) their fields; validation, the CLI's and the
    generated docs' words and the MLflow params all read it."""

    name: str
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    positive: bool = False  # strictly above 0
    below: float | None = None  # exclusive upper bound
    kind: type | None = None  # the value's type where the default is None
    nullable: bool = False  # None (null in YAML) is a value

    @property
    def value_type(self) -> type:
        """bool, int, float or str: what a value is read as."""
        if self.kind is not None:
            return self.kind
        return type(self.default) if self.default is not None else str

    def check(self, owner: str, value: Any) -> Any:
        """``value`` if it is valid for this knob, else one clear error naming ``owner`` and the knob."""

        def fail(expected: str) -> UnlearnSearchError:
            return UnlearnSearchError(f"{owner}: {self.name}={value!r} (expected {expected})")

        if value is None and self.nullable:
            return value
        if self.choices:
            if value not in self.choices:
                raise fail(f"one of {', '.join(map(str, self.choices))}")
            return value
        kind = self.value_type
        if kind is bool:
            if not isinstance(value, bool):
                raise fail("true or false")
            return value
        if kind in (int, float):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise fail("a number")
            if not math.isfinite(value):
                raise fail("a finite number")
            if kind is int and not float(value).is_integer():
                raise fail("an integer")
            if self.problem(value):
                raise fail(self.valid_range())
            return int(value) if kind is int else value
        return value

    def problem(self, value: Any) -> str | None:
        """The valid values in words when ``value`` (of the right type) is outside them, else None."""
        if value is None:
            return None if self.nullable else (self.valid_range() or "a value")
        if self.choices:
            return None if value in self.choices else f"one of {', '.join(map(str, self.choices))}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return None
        outside = (
            (self.positive and not value > 0)
            or (self.low is not None and value < self.low)
            or (self.high is not None and value > self.high)
            or (self.below is not None and value >= self.below)
        )
        return self.valid_range() if outside else None

    def valid_range(self) -> str:
        """The bounds in words (``a value in (0, 1]``, ``an integer >= 1 or null``); empty for an
        unbounded knob."""
        kind = "an integer" if self.value_type is int else "a value"
        upper = self.high if self.high is not None else self.below
        if self.low is None and upper is None and not self.positive:
            return ""
        if upper is None:
            words = f"{kind} > 0" if self.positive else f"{kind} >= {self.low}"
        else:
            lower = "(0" if self.positive else f"[{self.low}" if self.low is not None else "(-inf"
            words = f"{kind} in {lower}, {upper}{']' if self.high is not None else ')'}"
        return words + " or null" if self.nullable else words


def setting(default: Any, help: str, **valid: Any) -> Any:
    """A dataclass field that carries its own declaration, as TRL's config fields carry their
    help: ``valid`` holds ``Knob``'s choices, bounds, ``kind`` and ``nullable``."""
    return field(default=default, metadata={"help": help, **valid})


def declared(cls) -> dict[str, Knob]:
    """Each field of dataclass ``cls`` declared with ``setting``, as a ``Knob``."""
    import dataclasses

    return {f.name: Knob(f.name, f.default, **f.metadata) for f in dataclasses.fields(cls) if "help" in f.metadata}


def check_params(owner: str, knobs: tuple[Knob, ...], params: dict[str, Any]) -> dict[str, Any]:
    """Every knob's value (given or default), each checked; an unknown name is an error."""
    known = {k.name: k for k in knobs}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UnlearnSearchError(f"{owner}: unknown setting {unknown[0]!r} (expected {one_of(unknown[0], known)})")
    return {k.name: k.check(owner, params.get(k.name, k.default)) for k in knobs}


class Method:
    """A registered unlearning loss. Subclasses set the class attributes and ``loss``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    reference_paper: ClassVar[str]
    knobs: ClassVar[tuple[Knob, ...]] = ()
    needs_retain: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    alternative: ClassVar[str | None] = None  # "refusal" or "random" substitute answers
    reads_hidden: ClassVar[bool] = False  # one layer's hidden states (``probed_layer``), not only logits

    def __init__(self, **params: Any):
        self.params = check_params(f"method {self.name}", self.knobs, params)

    def uses_reference(self) -> bool:
        return self.needs_reference

    def student_batches(self) -> tuple[str, ...]:
        """The batches whose student logits ``loss`` reads; the loop computes them in one forward pass.

        Substitute answers when the method has them, the forget answers, and the retain set
        unless the retain term is ``none``. A method that reads other batches says so here.
        """
        batches = ("alternative",) * bool(self.alternative) + ("forget",)
        if self.needs_retain and self.params.get("retain_loss", "ce") != "none":
            batches += ("retain",)
        return batches

    def reference_batches(self) -> tuple[str, ...]:
        """The batches whose reference outputs ``loss`` reads; the loop computes them first.

        The retain set when the method uses the reference (its KL term). A method that reads
        others (NPO: the forget answers) says so here.
        """
        return ("retain",) if self.uses_reference() else ()

    def probed_layer(self, layers: int) -> int | None:
        """The decoder layer (0-based, of a model with ``layers``) whose output ``loss`` reads
        through ``StepInputs.hidden`` and ``Reference.hidden``; None: it reads no hidden states."""
        return None

    def trained_modules(self, layers: int) -> tuple[tuple[int, str], ...] | None:
        """With ``trainable=method``: the (layer index, module path in the layer) pairs trained in
        a model of ``layers`` decoder layers; None: this method names none."""
        return None

    def loss(self, step: StepInputs) -> LossOutput:
        raise NotImplementedError


def forget_ce(step: StepInputs) -> Term:
    return Term(F.cross_entropy(step.student(step.forget), step.forget["labels"]), "forget", "tokens")


def retain_term(step: StepInputs, kind: str) -> tuple[torch.Tensor, float]:
    """The retain loss of ``kind`` (``ce``, ``kl`` or ``none``) on the step's retain batch, shared."""
    if kind == "none" or step.retain is None:
        return torch.zeros(()), 0.0
    logits = step.student(step.retain)
    if kind == "ce":
        value = F.cross_entropy(logits, step.retain["labels"])
    else:
        value = step.reference("retain").kl(logits, step.retain["labels"])
    value = shared_value(step, Term(value, "retain", "tokens"))  # both are means over the scored tokens
    return value, float(value.detach())


RETAIN_KINDS = ("ce", "kl", "none")


def compose(
    step: StepInputs,
    forget_name: str,
    forget_fn: Callable[[StepInputs], Terms] | None,
    forget_weight: float,
    retain_kind: str,
    retain_weight: float,
) -> LossOutput:
    """``forget_weight * forget_fn(step) + retain_weight * retain term``, each scaled by the schedule.

    ``forget_fn`` returns the terms to minimize (``Term``: negated cross-entropy for ascent), each
    weighted here by this rank's share of what it averages over; it is skipped when the step has
    no forget batch. The parts reported are the shared values, whose mean over ranks is the step's.
    """
    total, parts = torch.zeros(()), {}
    if forget_fn is not None and step.forget is not None:
        value = shared_value(step, forget_fn(step))
        total = total + forget_weight * step.forget_scale * value
        parts[forget_name] = float(value.detach())
    if step.retain is not None and retain_kind != "none":
        value, parts[f"retain_{retain_kind}"] = retain_term(step, retain_kind)
        total = total + retain_weight * step.retain_scale * value
    return LossOutput(total, parts)


def ascent(step: StepInputs) -> Term:
    """Negated forget cross-entropy; zero (no gradient) while the CE is above the bound.

    Unbounded ascent runs away: the CE grows without limit and drags the retain set along. With
    several ranks the bound applies to the whole step's CE (the mean of their shared CEs).
    """
    ce = forget_ce(step)
    bound = step.forget_loss_bound  # checked first: the mean over ranks is a collective
    if bound is not None and step.mean_over_ranks(float(shared_value(step, ce).detach())) > bound:
        return Term(-ce.value.detach(), ce.batch, ce.unit)
    return Term(-ce.value, ce.batch, ce.unit)
