"""A trial's settings: one flat namespace shared by the CLI, the YAML spaces and MLflow params."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unlearn_search.data.benchmark import SPLITS
from unlearn_search.errors import UnlearnSearchError, one_of
from unlearn_search.methods import METHODS, SCHEDULES, get_method, get_schedule
from unlearn_search.methods.base import Knob, declared, setting
from unlearn_search.models.loading import DTYPES
from unlearn_search.models.trainable import TRAINABLE

TEACHERS = ("live", "cached")


@dataclass(frozen=True)
class TrialConfig:
    method: str = setting("gd", "the unlearning loss (table above)", choices=tuple(METHODS))
    schedule: str = setting(
        "joint", "the order and weights of forget and retain batches (table above)", choices=tuple(SCHEDULES)
    )
    lr: float = setting(1e-4, "learning rate (AdamW)", positive=True)
    epochs: int = setting(
        1,
        "passes over the forget set; chunked schedules make them over each chunk (SUGD: times epochs_per_chunk)",
        low=1,
    )
    batch_size: int = setting(8, "items per optimizer step, across all of a trial's workers", low=1)
    max_length: int = setting(512, "tokens per item (prompt, answer and end token); longer items lose their end", low=2)
    max_grad_norm: float = setting(1.0, "gradient clipping", positive=True)
    weight_decay: float = setting(0.0, "AdamW weight decay", low=0)
    forget_loss_bound: float | None = setting(
        None,
        "gradient ascent pauses while the forget cross-entropy is above it (null: never)",
        positive=True,
        kind=float,
        nullable=True,
    )
    trainable: str = setting(
        "full",
        "what is trained: every weight, LoRA adapters, the last k decoder layers, or the modules the method "
        "names (RMU: the MLP output projections up to its steered layer)",
        choices=TRAINABLE,
    )
    last_k: int = setting(8, "decoder layers trained with trainable=last_k", low=1)
    lora_rank: int = setting(16, "LoRA rank with trainable=lora", low=1)
    lora_alpha: float = setting(32.0, "LoRA scaling numerator", positive=True)
    lora_dropout: float = setting(0.0, "LoRA dropout", low=0, below=1)
    train_split: str = setting("train", "the benchmark split unlearned", choices=SPLITS)
    refusals: str | None = setting(None, "a CSV of refusal templates (null: the data root's)", nullable=True)
    teacher: str = setting(
        "live",
        "the original model's outputs: a frozen ZeRO-3 copy on the workers, or the cache built once per search",
        choices=TEACHERS,
    )
    teacher_top_k: int | None = setting(
        None,
        "log-probs kept per position in the cache (null: all for vocabularies up to 8192, else 128)",
        low=1,
        kind=int,
        nullable=True,
    )
    seed: int = setting(0, "data order, substitute answers, and random initialization (LoRA adapters)")
    dtype: str = setting(
        "auto",
        "what the student, the teacher and the evaluations run in: auto is bfloat16 on GPU workers "
        "(DeepSpeed bf16), float32 on CPU",
        choices=DTYPES,
    )
    keep_best: bool = setting(
        False,
        "end with the weights of the schedule boundary whose quick aggregate estimate was highest "
        "(ties: the later), not the last step's",
    )
    method_params: dict[str, Any] = field(default_factory=dict)
    schedule_params: dict[str, Any] = field(default_factory=dict)

    def flat(self) -> dict[str, Any]:
        """Every setting under its own name, as logged and as written in search spaces."""
        values = {name: getattr(self, name) for name in TRIAL_SETTINGS}
        return {
            **values,
            **get_method(self.method, **self.method_params).params,
            **get_schedule(self.schedule, **self.schedule_params).params,
        }


TRIAL_FIELDS = {
    f.name: f for f in dataclasses.fields(TrialConfig) if f.name not in ("method_params", "schedule_params")
}
# Each trial field's declaration, the same spec as a method's knobs.
TRIAL_SETTINGS: dict[str, Knob] = declared(TrialConfig)
FIELD_HELP = {name: knob.help for name, knob in TRIAL_SETTINGS.items()}
FIELD_TYPES = {name: knob.value_type for name, knob in TRIAL_SETTINGS.items()}
FIELD_OPTIONAL = {name for name, knob in TRIAL_SETTINGS.items() if knob.nullable}


_KIND_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _coerce(name: str, value: Any, kind: type) -> Any:
    """``value`` as a setting of type ``kind``; a fractional value for an integer is refused, not cut."""
    if value is None or kind is str:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise UnlearnSearchError(f"{name}={value!r}: expected true or false")
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise UnlearnSearchError(f"{name}={value!r}: expected {_KIND_WORDS[kind]}") from None
    if not math.isfinite(number):
        raise UnlearnSearchError(f"{name}={value!r}: expected a finite number")
    if kind is int:
        if not number.is_integer():
            raise UnlearnSearchError(f"{name}={value!r}: expected an integer")
        return int(number)
    return number


def setting_values(name: str) -> str:
    """A trial field's valid values in words, as its errors say them (empty when any value goes)."""
    knob = TRIAL_SETTINGS[name]
    return "one of " + ", ".join(map(str, knob.choices)) if knob.choices else knob.valid_range()


def setting_type(name: str, method: str | None = None, schedule: str | None = None) -> type | None:
    """The type a setting takes (int, float, bool or str); None for a name nothing here knows."""
    if name in FIELD_TYPES:
        return FIELD_TYPES[name]
    for registry, key in ((METHODS, method), (SCHEDULES, schedule)):
        for knob in registry[key].knobs if key in registry else ():
            if knob.name == name:
                return knob.value_type
    return None


def trial_config(settings: dict[str, Any]) -> TrialConfig:
    """Split flat settings into the trial's own fields and its method's and schedule's knobs."""
    method = settings.get("method", TrialConfig.method)
    schedule = settings.get("schedule", TrialConfig.schedule)
    for name, value in (("method", method), ("schedule", schedule)):
        if not isinstance(value, str):
            raise UnlearnSearchError(f"{name}={value!r}: expected a name")
    if method not in METHODS:
        raise UnlearnSearchError(f"method {method!r}: expected {one_of(method, METHODS)}")
    if schedule not in SCHEDULES:
        raise UnlearnSearchError(f"schedule {schedule!r}: expected {one_of(schedule, SCHEDULES)}")
    method_knobs = {k.name: k for k in METHODS[method].knobs}
    schedule_knobs = {k.name: k for k in SCHEDULES[schedule].knobs}
    own, method_params, schedule_params = {}, {}, {}
    for name, value in settings.items():
        if name in TRIAL_FIELDS:
            kind = FIELD_TYPES[name]
            if value is None and name not in FIELD_OPTIONAL:
                raise UnlearnSearchError(f"{name}=None: expected {_KIND_WORDS[kind]} (it has no null value)")
            if kind is str and value is not None and not isinstance(value, str):
                raise UnlearnSearchError(f"{name}={value!r}: expected a string")
            own[name] = _coerce(name, value, kind)
        elif name in method_knobs:
            method_params[name] = _coerce(name, value, method_knobs[name].value_type)
        elif name in schedule_knobs:
            schedule_params[name] = _coerce(name, value, schedule_knobs[name].value_type)
        else:
            known = sorted(set(TRIAL_FIELDS) | set(method_knobs) | set(schedule_knobs))
            raise UnlearnSearchError(
                f"setting {name!r} is not known for method {method} with schedule {schedule} "
                f"(expected {one_of(name, known)})"
            )
    config = TrialConfig(**own, method_params=method_params, schedule_params=schedule_params)
    for name, knob in TRIAL_SETTINGS.items():
        value = getattr(config, name)
        expected = knob.problem(value)
        if expected and knob.choices:
            raise UnlearnSearchError(f"{name} {value!r}: expected {expected}")
        if expected:
            raise UnlearnSearchError(f"{name}={value!r}: expected {expected}")
    get_method(method, **method_params)
    get_schedule(schedule, **schedule_params)
    if SCHEDULES[schedule].needs_retain and not METHODS[method].needs_retain:
        raise UnlearnSearchError(
            f"schedule {schedule} needs a method with a retain term; {method} has none "
            f"(expected one of {', '.join(n for n, m in METHODS.items() if m.needs_retain)})"
        )
    return config


def parse_assignments(pairs: list[str], option: str = "--set") -> dict[str, Any]:
    """``key=value`` strings (from ``--set``, ``--resources``) with values read as YAML scalars."""
    import yaml

    settings = {}
    for pair in pairs:
        if "=" not in pair:
            raise UnlearnSearchError(f"{option} {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        settings[key.strip()] = yaml.safe_load(value)
    return settings


def check_output_dir(output: str | Path, model_dir: str | Path) -> Path:
    """``output`` resolved; refused when it is the input model's directory or holds it, since a
    run replaces ``output/model`` and its own files there."""
    output, model_dir = Path(output).resolve(), Path(model_dir).resolve()
    if output == model_dir:
        raise UnlearnSearchError(f"output {output}: is the input model directory (expected another directory)")
    if output in model_dir.parents:
        raise UnlearnSearchError(
            f"output {output}: contains the input model directory {model_dir} (expected a directory outside it)"
        )
    return output
